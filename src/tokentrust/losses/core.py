"""Shared pieces of every policy loss: input preparation, aggregation, the surrogate, metrics.

Every loss in this package is written as two detached per-token tensors:

* ``value``: the per-token loss value that is reported (the negated objective), and
* ``weight``: d(loss_t)/d(logp_t), the per-token gradient weight,

combined by :func:`surrogate` into ``value + weight * (logp - sg(logp))``. The result has
exactly that value and exactly that gradient, so the gradient of every loss can be read
off (and tested against) its formula, and truncated importance weights ``min(r, C)`` need
no special autograd tricks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: a ratio beyond this is a numerical accident, not a signal
# Loss keywords every caller (the trainer, the engine adapters) derives from its own settings: the
# aggregation and its normalisers, the clip epsilons, the threshold. User-given loss params may not set them.
CALLER_PARAMS = ("agg", "global_tokens", "global_seqs", "horizon", "delta", "eps_low", "eps_high")


@dataclass
class LossOutput:
    """What every registered loss returns."""

    loss: torch.Tensor  # scalar, differentiable w.r.t. logp
    keep: torch.Tensor  # bool [B, T]: gradient kept by the trust region (False off the mask)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PolicyInputs:
    """Validated, broadcast inputs shared by all losses (all [B, T])."""

    logp: torch.Tensor
    behavior_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # bool
    log_ratio: torch.Tensor  # detached, clamped
    ratio: torch.Tensor  # detached
    pi: torch.Tensor  # detached probability of the sampled token under the current policy
    mu: torch.Tensor  # ... and under the behaviour policy


def prepare(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
            mask: torch.Tensor) -> PolicyInputs:
    """Check shapes, broadcast [B] advantages to [B, T], compute the detached ratio pi/mu."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if behavior_logp.shape != logp.shape:
        raise ValueError(f"behavior_logp shape {tuple(behavior_logp.shape)} != logp shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages [B] has B={advantages.shape[0]}, logp has B={logp.shape[0]}")
        advantages = advantages[:, None].expand_as(logp)
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got shape {tuple(advantages.shape)}")
    behavior_logp = behavior_logp.detach().to(logp.dtype)
    advantages = advantages.detach().to(logp.dtype)
    log_ratio = (logp.detach() - behavior_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    logp_d = logp.detach()
    return PolicyInputs(logp, behavior_logp, advantages, mask.bool(), log_ratio, log_ratio.exp(), logp_d.exp(),
                        behavior_logp.exp())


def truncated_weight(ratio: torch.Tensor, is_cap: float | None) -> torch.Tensor:
    """min(r, C): the truncated importance weight (C = None means no cap)."""
    if is_cap is None:
        return ratio
    if is_cap <= 0:
        raise ValueError(f"is_cap must be > 0 or None, got {is_cap}")
    return ratio.clamp(max=is_cap)


def surrogate(logp: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-token loss whose value is ``value`` and whose gradient w.r.t. logp is ``weight``."""
    return value + weight * (logp - logp.detach())


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, *, horizon: int | None = None,
              global_tokens: float | None = None, global_seqs: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar, as verl's ``agg_loss`` does.

    ``global_tokens`` / ``global_seqs`` replace the local counts when a batch is split into
    micro-batches whose gradients are accumulated (so the sum equals the full-batch loss).
    ``horizon`` is the fixed divisor of ``seq-mean-token-sum-norm`` (default: T).
    """
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if agg == "token-mean":
        n = global_tokens if global_tokens is not None else m.sum().clamp(min=1.0)
        return masked.sum() / n
    tokens_per_seq = m.sum(-1)
    seq_valid = (tokens_per_seq > 0).to(per_token.dtype)
    n_seq = global_seqs if global_seqs is not None else seq_valid.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        seq_loss = masked.sum(-1) / tokens_per_seq.clamp(min=1.0)
        return (seq_loss * seq_valid).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return masked.sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        h = horizon if horizon is not None else per_token.shape[-1]
        return masked.sum() / n_seq / h
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


@torch.no_grad()
def standard_metrics(x: PolicyInputs, keep: torch.Tensor, is_cap: float | None,
                     delta: torch.Tensor | float | None = None) -> dict[str, float]:
    """Trust-region diagnostics shared by all losses, computed with one host sync.

    kept/masked fraction overall and by advantage sign, mean/max |pi - mu|, ratio mean/max,
    share of tokens whose ratio exceeds the cap, and the mean threshold.
    """
    m = x.mask.to(x.ratio.dtype)
    n = m.sum().clamp(min=1.0)
    pos = m * (x.advantages > 0)
    neg = m * (x.advantages < 0)
    k = keep.to(m.dtype)
    abs_diff = (x.pi - x.mu).abs()
    inf = torch.finfo(m.dtype).max
    vals = [
        (k * m).sum() / n,
        (k * pos).sum() / pos.sum(),  # NaN (logged as null) when no token has that sign
        (k * neg).sum() / neg.sum(),
        (abs_diff * m).sum() / n,
        torch.where(x.mask, abs_diff, -inf).max() if x.mask.any() else m.sum() * 0,
        (x.ratio * m).sum() / n,
        torch.where(x.mask, x.ratio, -inf).max() if x.mask.any() else m.sum() * 0,
        ((x.ratio > is_cap) * m).sum() / n if is_cap is not None else m.sum() * 0,
        (-x.log_ratio * m).sum() / n,  # k1 estimate of KL(mu || pi) on the sampled tokens
    ]
    if isinstance(delta, torch.Tensor):
        vals.append((delta.to(m.dtype) * m).sum() / n)
    values = torch.stack(vals).tolist()
    names = ["kept_frac", "kept_frac_pos", "kept_frac_neg", "abs_diff_mean", "abs_diff_max",
             "ratio_mean", "ratio_max", "over_cap_frac", "kl_mu_pi"]
    out = dict(zip(names, values))
    if isinstance(delta, torch.Tensor):
        out["delta_mean"] = values[-1]
    elif delta is not None:
        out["delta_mean"] = float(delta)
    out["masked_frac"] = 1.0 - out["kept_frac"] if x.mask.any() else 0.0
    return out


def as_threshold(delta: float | torch.Tensor, like: torch.Tensor, name: str = "delta") -> torch.Tensor | float:
    """Validate a scalar or [B, T] threshold; return a float or a tensor on ``like``'s device."""
    if isinstance(delta, torch.Tensor):
        if delta.dim() == 0:
            delta = float(delta)
        else:
            if delta.shape != like.shape:
                raise ValueError(f"{name} tensor shape {tuple(delta.shape)} != logp shape {tuple(like.shape)}")
            delta = delta.detach().to(device=like.device, dtype=like.dtype)
            if not bool(torch.isfinite(delta).all() & (delta > 0).all()):
                raise ValueError(f"{name} tensor must hold finite values > 0 (got min {float(delta.min())})")
            return delta
    delta = float(delta)
    if not delta > 0 or math.isinf(delta):
        raise ValueError(f"{name} must be a finite number > 0, got {delta}")
    return delta
