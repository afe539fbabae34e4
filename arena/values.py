"""How a Python value is written as canonical text and read back: the contract between an executor, which reports
the values a program's calls return in this text, and a game, which compares a predicted value with it.

Standard library only: the sandbox's worker script runs without site-packages and loads this file by its path.
"""

from __future__ import annotations

import ast
import math

MAX_DEPTH = 20
HUGE_INT = 10**4000  # past this an int is written as inf: its decimal text would be too long to compare


class Unsupported(TypeError):
    """A value with no canonical text (an object of a class the program defined, a function, ...)."""


def value_text(value: object, depth: int = 0) -> str:
    """Text that two values share exactly when they are equal as plain data: dicts and sets sorted, an integral
    float written as the int it equals (1.0 == 1 in Python). Only exact built-in types: a subclass or an object
    with its own __eq__ or __repr__ is refused, so a value cannot lie about itself."""
    if depth > MAX_DEPTH:
        raise Unsupported("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is bytes:
        return repr(value)
    if kind is int:
        return str(value) if -HUGE_INT < value < HUGE_INT else repr(float("inf") if value > 0 else float("-inf"))
    if kind is float:
        return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    if kind is complex:
        return repr(value)
    if kind is list or kind is tuple:
        items = ", ".join(value_text(v, depth + 1) for v in value)
        return f"[{items}]" if kind is list else f"({items},)" if len(value) == 1 else f"({items})"
    if kind is set or kind is frozenset:
        return "{%s}" % ", ".join(sorted(value_text(v, depth + 1) for v in value)) if value else "set()"
    if kind is dict:
        pairs = sorted((value_text(k, depth + 1), value_text(v, depth + 1)) for k, v in value.items())
        return "{%s}" % ", ".join(f"{k}: {v}" for k, v in pairs)
    raise Unsupported(f"a value of type {kind.__name__} has no plain-data form")


def parse_arguments(text: str) -> tuple:
    """The arguments a call is made with, from literal text such as `3, [1, 2]` (no names, no calls: only
    Python literals, so an input cannot run code)."""
    return ast.literal_eval(f"({text},)") if text.strip() else ()
