"""AReaL's decoupled PPO: clip against a recomputed proximal policy, reweight by pi_prox / mu.

    L = -E[ w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) ],
    r_t = pi_t / pi_prox_t,   w_t = pi_prox_t / mu_t (the behaviour weight, no gradient)

pi_prox is the policy of the weights before this step's update (log-probs recomputed with one
extra no-grad forward), mu the policy that sampled the batch (possibly several versions stale,
or a numerically different engine). The clip bounds the update against pi_prox, and w_t corrects
the off-policy gap mu -> pi_prox by importance sampling (Hilton et al. 2021, arXiv 2110.00641;
AReaL docs/en/best_practices/algo_perf.md, ``actor.use_decoupled_loss``; verl's decoupled
rollout-correction mode, docs/algo/rollout_corr_math.md s1.3).

The loss needs ``prox_logp`` (log pi_prox, [B, T]) from the trainer: see :data:`NEEDS_PROX_LOGP`.
With ``prox_logp == behavior_logp`` it is the "ppo" loss exactly.
"""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LOG_RATIO_CLAMP, LossOutput, aggregate, check_agg, prepare, standard_metrics,
                                    surrogate, truncated_weight)
from tokentrust.losses.registry import register_loss

#: Registered losses that must be called with ``prox_logp=`` (log-probs of the pre-update weights).
NEEDS_PROX_LOGP: frozenset[str] = frozenset({"decoupled-ppo"})
BEHAVE_CAP_MODES = ("mask", "clamp")


def needs_prox_logp(name: str) -> bool:
    """True if loss ``name`` must be given ``prox_logp`` (the trainer recomputes it per step)."""
    return name in NEEDS_PROX_LOGP


def _check_prox(prox_logp: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if prox_logp is None:
        raise ValueError("prox_logp is required by decoupled-ppo: log-probs of the sampled tokens under the "
                         "weights before this step's update ([B, T]), supplied by the trainer")
    if prox_logp.shape != like.shape:
        raise ValueError(f"prox_logp shape {tuple(prox_logp.shape)} != logp shape {tuple(like.shape)}")
    return prox_logp.detach().to(like.dtype)


def _behaviour_weight(log_w: torch.Tensor, behave_cap: float | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_prox/mu after the cap, tokens over the cap). "mask" zeroes them (AReaL's
    ``behav_imp_weight_cap``), "clamp" truncates them to the cap."""
    if mode not in BEHAVE_CAP_MODES:
        raise ValueError(f"behave_cap_mode must be one of {BEHAVE_CAP_MODES}, got {mode!r}")
    w = log_w.exp()
    if behave_cap is None:
        return w, torch.zeros_like(w, dtype=torch.bool)
    if not behave_cap > 1:
        raise ValueError(f"behave_cap must be > 1 or None (AReaL requires > 1.0), got {behave_cap}")
    over = w > behave_cap
    return (w.masked_fill(over, 0.0) if mode == "mask" else w.clamp(max=behave_cap)), over


@torch.no_grad()
def _decoupled_metrics(mask: torch.Tensor, r: torch.Tensor, w_behave: torch.Tensor, clipped: torch.Tensor,
                       over: torch.Tensor, is_cap: float | None) -> dict[str, float]:
    """AReaL's importance_weight (pi/pi_prox) and behave_imp_weight (pi_prox/mu, before the cap),
    the clip fraction against pi_prox and the share over the behaviour cap, with one host sync."""
    m = mask.to(r.dtype)
    n = m.sum().clamp(min=1.0)
    low = torch.finfo(r.dtype).min

    def masked_max(v: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, v, low).max() if mask.any() else m.sum() * 0

    vals = [(r * m).sum() / n, masked_max(r), (w_behave * m).sum() / n, masked_max(w_behave),
            (clipped * m).sum() / n, (over * m).sum() / n,
            ((r > is_cap) * m).sum() / n if is_cap is not None else m.sum() * 0]
    names = ["importance_weight_mean", "importance_weight_max", "behave_imp_weight_mean", "behave_imp_weight_max",
             "clip_frac", "behave_over_cap_frac", "over_cap_frac"]
    return dict(zip(names, torch.stack(vals).tolist()))


@register_loss("decoupled-ppo")
def decoupled_ppo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, *, prox_logp: torch.Tensor | None = None, eps_low: float = 0.2,
                       eps_high: float | None = None, agg: str = "token-mean", is_cap: float | None = None,
                       behave_cap: float | None = None, behave_cap_mode: str = "mask", horizon: int | None = None,
                       global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
    """-(pi_prox/mu) min(r A, clip(r, 1-eps_low, 1+eps_high) A) with r = pi/pi_prox.

    ``prox_logp`` is required (the trainer's recomputed log pi_prox). Kept tokens: the PPO clip
    against pi_prox does not zero the gradient and the behaviour weight is not rejected; there the
    gradient weight is (pi_prox/mu) * min(r, C) * A (C = ``is_cap`` truncates r as in "ppo").
    ``behave_cap`` (default None = no cap, AReaL's current default; its older default was a token
    mask at 5.0) caps pi_prox/mu: ``behave_cap_mode="mask"`` drops tokens above it from the loss
    (they stay in the normaliser, as in AReaL's ``behav_imp_weight_cap``), "clamp" truncates.
    Standard metrics are taken against mu (comparable across losses), except ``over_cap_frac``,
    which counts r = pi/pi_prox over C, where the cap acts.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    prox = _check_prox(prox_logp, logp)
    a = x.advantages
    r = (x.logp.detach() - prox).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    w_raw_log = (prox - x.behavior_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w_behave, over = _behaviour_weight(w_raw_log, behave_cap, behave_cap_mode)
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    rejected = over if behave_cap_mode == "mask" else torch.zeros_like(over)
    keep = x.mask & ~clipped & ~rejected
    w = truncated_weight(r, is_cap)
    value = -w_behave * torch.where(clipped, r.clamp(1 - eps_low, 1 + eps_high), w) * a
    weight = -(keep * w_behave * w * a)
    loss = aggregate(surrogate(x.logp, value, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    metrics = standard_metrics(x, keep, None)
    metrics.update(_decoupled_metrics(x.mask, r, w_raw_log.exp(), clipped, over, is_cap))
    return LossOutput(loss, keep, metrics)
