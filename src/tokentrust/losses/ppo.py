"""PPO / GRPO ratio clipping (and DAPO clip-higher when eps_high > eps_low).

:func:`clipped_ratio_loss` is the clipped surrogate with per-token bounds, shared by ``ppo``
(constant bounds 1 - eps_low, 1 + eps_high), ``ppo-lowmu-exempt`` (the converse ablation of the
hybrid: tokens with mu < tau leave the clip) and the probability-aware bounds of ``bandpo`` and
``dcpo`` (``tokentrust.losses.bandpo``).
"""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LossOutput, PolicyInputs, aggregate, check_agg, prepare, standard_metrics,
                                    surrogate, truncated_weight)
from tokentrust.losses.registry import register_loss

Bound = float | torch.Tensor
EXEMPT_SIDES = ("both", "positive", "negative")


def check_eps(eps_low: float, eps_high: float | None) -> float:
    """Validate the clip epsilons; return eps_high (None = eps_low)."""
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    return eps_high


def clipped_ratio_loss(x: PolicyInputs, low: Bound, high: Bound, *, agg: str, is_cap: float | None,
                       dual_clip: float | None, horizon: int | None, global_tokens: float | None,
                       global_seqs: float | None) -> LossOutput:
    """-min(r A, clip(r, low, high) A) with scalar or [B, T] bounds (low <= 1 <= high).

    The gradient flows only where the clip is inactive: kept unless (A > 0 and r > high) or
    (A < 0 and r < low). On kept tokens the gradient weight is min(r, C) * A. ``dual_clip`` = c > 1
    (dual-clip PPO, Ye et al. 2020; verl's ``clip_ratio_c``): for A < 0 the loss is at most -c A,
    so tokens with A < 0 and r > c are dropped (no gradient).
    """
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    a, r = x.advantages, x.ratio
    clipped = ((a > 0) & (r > high)) | ((a < 0) & (r < low))
    dual = (a < 0) & (r > dual_clip) if dual_clip is not None else torch.zeros_like(clipped)
    keep = x.mask & ~clipped & ~dual
    w = truncated_weight(r, is_cap)
    value = -torch.where(clipped, r.clamp(low, high), torch.where(dual, dual_clip or 1.0, w)) * a
    weight = -(keep * w * a)
    loss = aggregate(surrogate(x.logp, value, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    return LossOutput(loss, keep, standard_metrics(x, keep, is_cap))


@register_loss("ppo")
def ppo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             eps_low: float = 0.2, eps_high: float | None = None, agg: str = "token-mean",
             is_cap: float | None = None, horizon: int | None = None, global_tokens: float | None = None,
             global_seqs: float | None = None, dual_clip: float | None = None) -> LossOutput:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A); see :func:`clipped_ratio_loss`."""
    eps_high = check_eps(eps_low, eps_high)
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    return clipped_ratio_loss(x, 1 - eps_low, 1 + eps_high, agg=agg, is_cap=is_cap, dual_clip=dual_clip,
                              horizon=horizon, global_tokens=global_tokens, global_seqs=global_seqs)


@register_loss("ppo-lowmu-exempt")
def ppo_lowmu_exempt_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, *, tau: float = 0.01, sides: str = "both", eps_low: float = 0.2,
                          eps_high: float | None = None, agg: str = "token-mean", is_cap: float | None = None,
                          horizon: int | None = None, global_tokens: float | None = None,
                          global_seqs: float | None = None, dual_clip: float | None = None) -> LossOutput:
    """PPO whose tokens with mu < ``tau`` are exempt from the ratio clip (Stable-RL's ablations).

    ``sides``: "both" exempts them whatever the advantage sign (Stable-RL ``ppo_ablation_both``),
    "positive" only on A > 0 (``ppo_ablation_positive``: no upper bound), "negative" only on A < 0
    (``ppo_ablation_negative``: no lower bound). An exempt token behaves as in ``pg-is``.
    """
    eps_high = check_eps(eps_low, eps_high)
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if sides not in EXEMPT_SIDES:
        raise ValueError(f"sides must be one of {EXEMPT_SIDES}, got {sides!r}")
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    low_mu = x.mu < tau
    no_high = low_mu if sides in ("both", "positive") else torch.zeros_like(low_mu)
    no_low = low_mu if sides in ("both", "negative") else torch.zeros_like(low_mu)
    high = torch.full_like(x.ratio, 1 + eps_high).masked_fill_(no_high, float("inf"))
    low = torch.full_like(x.ratio, 1 - eps_low).masked_fill_(no_low, 0.0)
    out = clipped_ratio_loss(x, low, high, agg=agg, is_cap=is_cap, dual_clip=dual_clip, horizon=horizon,
                             global_tokens=global_tokens, global_seqs=global_seqs)
    out.metrics["exempt_frac"] = float((low_mu & x.mask).sum() / x.mask.sum().clamp(min=1))
    return out
