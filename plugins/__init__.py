"""Built-in plugins, one folder or module per component kind, as `arena list` shows them. Each registers through the
`arena` entry-point group exactly as a third-party plugin does, and imports only the core (`arena.*`), never a game.

  backends/    how a model generates and trains: `hf/` (transformers + peft: the backend, model loading, kernels),
               `vllm_backend.py` (the hf backend, generating on vLLM's engine)
  optimizers/  how a round's samples change the weights: `grpo`, `dpo`, `mix` and their shared AdamW base
  judges/      how an answer is scored: `general` (self_reward, llm_judge, pairwise, reward_model, exact_match,
               mix) and `rubric`
  executors/   where model-written code runs: `sandbox` and the standalone worker script it starts
  loggers.py   where a run's metrics go: console, plain, csv, tensorboard, wandb
  commands.py  the commands beyond play/config/list: eval, export, report
"""
