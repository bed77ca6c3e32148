"""Tasks: datasets + prompt templates + verifiers behind one registry.

    task = get_task("gsm8k", data_dir=None, on_bad_line="raise", answer_fallback=False, format_reward=0.0)
    task = get_task("rg/countdown", num_train=2000, min_numbers=3)   # reasoning-gym (the `rg` extra)
    for ex in task.examples("train"): task.prompt(ex); task.score(completion, ex)
"""

from __future__ import annotations

from typing import Callable

from tokentrust.tasks.arith import Arith
from tokentrust.tasks.base import Example, Score, Task
from tokentrust.tasks.gsm8k import GSM8K
from tokentrust.tasks.math500 import Math500

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make `factory(**options)` available as ``get_task(name, **options)``."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"task {name!r} is already registered")
    _REGISTRY[name] = factory


def get_task(name: str, **options) -> Task:
    """Build a registered task (or ``rg/<dataset>``); an unknown name lists the available ones."""
    if name.startswith("rg/"):
        from tokentrust.tasks.rg import ReasoningGym

        return ReasoningGym(name[3:], **options)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}") from None
    return factory(**options)


def available_tasks() -> list[str]:
    return sorted(_REGISTRY) + ["rg/<reasoning-gym dataset>"]


register_task("gsm8k", GSM8K)
register_task("math500", Math500)
register_task("arith", Arith)

__all__ = ["Arith", "Example", "GSM8K", "Math500", "Score", "Task", "available_tasks", "get_task", "register_task"]
