"""Backends: a `Policy` (generate, score, train, save) over a model. `hf/` is transformers + peft; another backend
(for example one that generates with vLLM) is a sibling folder or module registered under its own name."""
