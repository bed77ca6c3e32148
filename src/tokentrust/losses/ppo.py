"""PPO / GRPO ratio clipping (and DAPO clip-higher when eps_high > eps_low)."""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LossOutput, aggregate, check_agg, prepare, standard_metrics, surrogate,
                                    truncated_weight)
from tokentrust.losses.registry import register_loss


@register_loss("ppo")
def ppo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             eps_low: float = 0.2, eps_high: float | None = None, agg: str = "token-mean",
             is_cap: float | None = None, horizon: int | None = None, global_tokens: float | None = None,
             global_seqs: float | None = None, dual_clip: float | None = None) -> LossOutput:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    The gradient flows only where the clip is inactive: kept unless (A > 0 and r > 1+eps_high)
    or (A < 0 and r < 1-eps_low). On kept tokens the gradient weight is min(r, C) * A.
    ``dual_clip`` = c > 1 (dual-clip PPO, Ye et al. 2020; verl's ``clip_ratio_c``): for A < 0 the
    loss is at most -c A, so tokens with A < 0 and r > c are dropped (no gradient).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    a, r = x.advantages, x.ratio
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    dual = (a < 0) & (r > dual_clip) if dual_clip is not None else torch.zeros_like(clipped)
    keep = x.mask & ~clipped & ~dual
    w = truncated_weight(r, is_cap)
    value = -torch.where(clipped, r.clamp(1 - eps_low, 1 + eps_high), torch.where(dual, dual_clip or 1.0, w)) * a
    weight = -(keep * w * a)
    loss = aggregate(surrogate(x.logp, value, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    return LossOutput(loss, keep, standard_metrics(x, keep, is_cap))
