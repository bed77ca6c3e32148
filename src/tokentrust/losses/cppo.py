"""CPPO (arXiv 2606.10968): a DPPO-TV region that varies with position and prefix drift.

Per sequence of T valid tokens (t = 1..T):
    w_t = w_min + (1 - w_min) (T - t) / (T - 1)         (early tokens weigh more)
    Z_t = w_t D_t,  D_t = |pi_t - mu_t|
    S_{t-1} = sum_{j<t} Z_j,  W_{t-1} = sum_{j<t} w_j
    b = clamp(P90 of D over the sequence, delta_b, 2 delta_b)
    c_t = min(delta, delta + b W_{t-1} - S_{t-1})
    keep t iff A_t (r_t - 1) <= 0 or Z_t <= c_t
A prefix that already drifted more than its budget b W tightens the threshold of later tokens.
"""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LossOutput, aggregate, check_agg, prepare, standard_metrics, surrogate,
                                    truncated_weight)
from tokentrust.losses.registry import register_loss


def cppo_thresholds(divergence: torch.Tensor, mask: torch.Tensor, *, delta: float, w_min: float,
                    delta_b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (Z_t, c_t) as [B, T] tensors; positions off the mask are ignored by the caller."""
    m = mask.to(divergence.dtype)
    length = m.sum(-1, keepdim=True)  # T per sequence
    t = m.cumsum(-1)  # 1-based index among valid tokens
    frac = ((length - t) / (length - 1).clamp(min=1.0)).clamp(min=0.0)
    w = torch.where(length > 1, w_min + (1 - w_min) * frac, torch.ones_like(frac)) * m
    z = w * divergence * m
    s_prev = z.cumsum(-1) - z
    w_prev = w.cumsum(-1) - w
    d_nan = torch.where(mask, divergence, torch.full_like(divergence, float("nan")))
    p90 = torch.nanquantile(d_nan.float(), 0.9, dim=-1, keepdim=True).to(divergence.dtype)
    b = torch.nan_to_num(p90, nan=delta_b).clamp(delta_b, 2 * delta_b)
    c = torch.clamp(delta + b * w_prev - s_prev, max=delta)
    return z, c


@register_loss("cppo")
def cppo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              delta: float = 0.15, w_min: float = 0.8, delta_b: float = 0.02, agg: str = "token-mean",
              is_cap: float | None = None, horizon: int | None = None, global_tokens: float | None = None,
              global_seqs: float | None = None) -> LossOutput:
    """CPPO with the Binary-TV divergence; see the module docstring."""
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if not 0 <= w_min <= 1:
        raise ValueError(f"w_min must be in [0, 1], got {w_min}")
    if not delta_b > 0:
        raise ValueError(f"delta_b must be > 0, got {delta_b}")
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    z, c = cppo_thresholds((x.pi - x.mu).abs(), x.mask, delta=delta, w_min=w_min, delta_b=delta_b)
    toward_mu = x.advantages * (x.ratio - 1) <= 0
    keep = x.mask & (toward_mu | (z <= c))
    w = truncated_weight(x.ratio, is_cap)
    weight = -(keep * w * x.advantages)
    loss = aggregate(surrogate(x.logp, weight, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    metrics = standard_metrics(x, keep, is_cap, delta)
    metrics["cppo_threshold_mean"] = float((c * x.mask).sum() / x.mask.sum().clamp(min=1))
    return LossOutput(loss, keep, metrics)
