"""Backends: a `Policy` (generate, score, train, save) over a model. `hf/` is transformers + peft; `vllm_backend.py`
is the hf backend with generation on vLLM's engine. Another backend is a sibling folder or module registered under
its own name."""
