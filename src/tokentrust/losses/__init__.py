"""Policy losses with per-token trust regions, behind one registry.

    from tokentrust.losses import get_loss, available_losses
    out = get_loss("dppo-tv")(logp, behavior_logp, advantages, mask, delta=0.15)
    out.loss, out.keep, out.metrics

Losses named in ``NEEDS_PROX_LOGP`` (``needs_prox_logp(name)``) also take ``prox_logp=``: the
log-probs recomputed with the weights before this step's update (decoupled PPO).
"""

from tokentrust.losses.core import AGGREGATIONS, CALLER_PARAMS, LossOutput, aggregate
from tokentrust.losses.registry import available_losses, default_delta, default_is_cap, get_loss, register_loss

# Importing the modules registers their losses.
from tokentrust.losses import ppo, dppo, cppo, drpo, pg, decoupled, bandpo  # noqa: E402,F401
from tokentrust.losses.decoupled import NEEDS_PROX_LOGP, needs_prox_logp  # noqa: E402

__all__ = ["AGGREGATIONS", "CALLER_PARAMS", "LossOutput", "NEEDS_PROX_LOGP", "aggregate", "available_losses",
           "default_delta", "default_is_cap", "get_loss", "needs_prox_logp", "register_loss"]
