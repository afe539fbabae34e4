"""arena: a plugin-based framework in which a language model improves by playing games against itself.

A plugin needs nothing but this package's top level: `from arena import hookimpl, Game, Role, Sample, ...`.
Importing it stays light (no torch), so `arena list` and a plugin's module import fast.
"""

from arena.hookspecs import hookimpl, hookspec
from arena.interfaces import Backend, Env, Executor, Game, Judge, Logger, Optimizer, Policy, RoundContext
from arena.types import Execution, Generation, Job, JudgeItem, Role, Sample, Verdict, chat

__version__ = "0.1.0"

__all__ = [
    "Backend", "Env", "Execution", "Executor", "Game", "Generation", "Job", "Judge", "JudgeItem", "Logger",
    "Optimizer", "Policy", "Role", "RoundContext", "Sample", "Verdict", "__version__", "chat", "hookimpl",
    "hookspec",
]
