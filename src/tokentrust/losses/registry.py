"""The loss registry: one name -> one pure function, like verl's ``register_policy_loss``."""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch

from tokentrust.losses.core import LossOutput


class PolicyLoss(Protocol):
    def __call__(self, logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, **params) -> LossOutput: ...


_REGISTRY: dict[str, PolicyLoss] = {}


def register_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: make a loss available as ``get_loss(name)``."""

    def deco(fn: PolicyLoss) -> PolicyLoss:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_loss(name: str) -> PolicyLoss:
    """Look up a registered loss; an unknown name lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses())}") from None


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def default_delta(loss: str) -> float | None:
    """The loss's own default threshold (its signature's ``delta``), None if it has no delta."""
    p = inspect.signature(get_loss(loss)).parameters.get("delta")
    return None if p is None or p.default is inspect.Parameter.empty else float(p.default)


def default_is_cap(loss: str) -> float | None:
    """The loss's own default truncated-IS cap (its signature's ``is_cap``), None if uncapped."""
    p = inspect.signature(get_loss(loss)).parameters.get("is_cap")
    return None if p is None or p.default in (None, inspect.Parameter.empty) else float(p.default)
