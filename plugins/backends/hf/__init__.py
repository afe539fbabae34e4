"""The `hf` backend: `backend.py` is the Policy, `models.py` loads models (a folder or the embedded GGUF) and checks
them, `kernels.py` holds its tensor routines (sampler, chunked LM-head log-probs, CPU attention), each tested against
the plain computation."""
