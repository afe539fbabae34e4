"""Executors: where model-written code runs. `sandbox.py` is the executor arena talks to; `sandbox_worker.py` is the
standalone script (standard library only) it starts in a clean interpreter, which confines and runs each job."""
