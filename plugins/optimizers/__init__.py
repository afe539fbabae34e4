"""Optimizers: `grpo` (rewards), `dpo` (pairs), `mix` (a per-role objective, one update) and `adamw.py`, the AdamW
step with non-finite checks that all three share. A new optimizer is a module here or in its own package."""
