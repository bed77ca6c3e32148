"""Policy losses with per-token trust regions, behind one registry.

    from tokentrust.losses import get_loss, available_losses
    out = get_loss("dppo-tv")(logp, behavior_logp, advantages, mask, delta=0.15)
    out.loss, out.keep, out.metrics
"""

from tokentrust.losses.core import AGGREGATIONS, LossOutput, aggregate
from tokentrust.losses.registry import available_losses, get_loss, register_loss

# Importing the modules registers their losses.
from tokentrust.losses import ppo, dppo, cppo, drpo  # noqa: E402,F401

__all__ = ["AGGREGATIONS", "LossOutput", "aggregate", "available_losses", "get_loss", "register_loss"]
