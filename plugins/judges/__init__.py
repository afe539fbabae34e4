"""Judges: `general.py` holds the game-agnostic ones (self_reward, llm_judge, pairwise, reward_model, exact_match,
mix) and the prompted-judge base; `rubric.py` grades an answer criterion by criterion against a rubric."""
