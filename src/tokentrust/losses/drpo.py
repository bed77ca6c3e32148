"""DRPO (arXiv 2606.09821): a soft version of DPPO's TV trust region."""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LossOutput, aggregate, as_threshold, check_agg, prepare, standard_metrics,
                                    surrogate, truncated_weight)
from tokentrust.losses.registry import register_loss


@register_loss("drpo")
def drpo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              delta: float | torch.Tensor = 12.5, agg: str = "token-mean", is_cap: float | None = None,
              horizon: int | None = None, global_tokens: float | None = None,
              global_seqs: float | None = None) -> LossOutput:
    """Objective r A - |A| / (2 delta) * mu * (r - 1)^2.

    Default delta = 12.5 follows the reference implementation, UniRL ``unirl/algorithms/ar_drpo.py``
    (``drpo_epsilon = 12.5``, citing the paper's section 4: "For SPO and DRPO, we set the
    regularization threshold to 12.5"), which equals verl's ``spo_adaptive_eps``. At that value
    |pi - mu| <= 1 < delta, so the damping never reverses the gradient; with DPPO's 0.15 it reverses
    once |pi - mu| > 0.15, a different method.

    Its gradient w.r.t. log pi is r A (1 - sign(A (r - 1)) |pi - mu| / delta): moving away from
    mu in the advantage's direction is damped linearly in |pi - mu| and reversed past delta,
    instead of DPPO's hard cut. With a cap C the leading r becomes min(r, C). ``keep`` marks
    tokens whose gradient still points in the advantage's direction (damping factor > 0).
    """
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    delta = as_threshold(delta, x.logp)
    a, r, mu = x.advantages, x.ratio, x.mu
    w = truncated_weight(r, is_cap)
    away = torch.sign(a * (r - 1))
    damping = 1 - away * (x.pi - mu).abs() / delta
    value = -(w * a - a.abs() / (2 * delta) * mu * (r - 1) ** 2)
    weight = -w * a * damping
    keep = x.mask & (damping > 0)
    loss = aggregate(surrogate(x.logp, value, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    return LossOutput(loss, keep, standard_metrics(x, keep, is_cap, delta))
