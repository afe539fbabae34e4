"""Built-in plugins: the hf backend, the grpo optimizer, the judges and the loggers. Each registers through the
`arena` entry-point group exactly as a third-party plugin does."""
