"""DPPO (Qi et al. 2026, arXiv 2602.04879): a divergence mask in place of ratio clipping.

A token's gradient is masked iff the update moves it away from mu in the direction its
advantage pushes AND the divergence D_t already exceeds the threshold:

    (A > 0 and r > 1 and D > delta) or (A < 0 and r < 1 and D > delta)

``delta`` may be a float or a [B, T] tensor of per-token thresholds (AV-DPPO, see
``tokentrust.thresholds``). Kept tokens get the gradient weight min(r, C) * A, with C = ``is_cap``
defaulting to ``IS_CAP`` = 3.0 as verl runs ``dppo_tv`` / ``dppo_kl`` (``is_cap=None``: uncapped).
"""

from __future__ import annotations

import torch

from tokentrust.losses.core import (LossOutput, PolicyInputs, aggregate, as_threshold, check_agg, prepare,
                                    standard_metrics, surrogate, truncated_weight)
from tokentrust.losses.registry import register_loss

SURROGATES = ("ratio", "logp")
# verl (verl/trainer/ppo/core_algos.py, compute_policy_loss_dppo_tv / _kl) truncates the detached ratio at
# config.clip_ratio_c, whose ActorConfig default is 3.0 (verl/workers/config/actor.py, actor.yaml).
IS_CAP = 3.0


def binary_tv(x: PolicyInputs) -> torch.Tensor:
    """|pi_t - mu_t| on the sampled token."""
    return (x.pi - x.mu).abs()


def binary_kl(x: PolicyInputs) -> torch.Tensor:
    """KL(Bernoulli(mu_t) || Bernoulli(pi_t)), computed in log space."""
    logp, logmu = x.logp.detach(), x.behavior_logp
    # (1-mu) log((1-mu)/(1-pi)) = (1-mu) log1p((pi-mu)/(1-pi)): one log instead of two, and the
    # clamp keeps pi -> 1 finite. Cheap matters: this runs on every token of every update.
    # In-place on fresh temporaries: the result is >= 0 up to rounding, which no delta > 0 notices.
    tail = (x.pi - x.mu).div_((1 - x.pi).clamp_(min=1e-7)).log1p_().mul_(1 - x.mu)
    return (logmu - logp).mul_(x.mu).add_(tail)


def topk_divergence(behavior_topk_logp: torch.Tensor, topk_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """TV or KL between mu and pi reduced to mu's top-K ids plus one "other" bucket.

    Both inputs are [B, T, K] log-probs on the same ids (chosen from mu at sampling time, the
    sampled token among them). With K = V this is the full-vocabulary divergence; with K < V
    lumping can only lower it (data-processing inequality).
    """
    if behavior_topk_logp.shape != topk_logp.shape or behavior_topk_logp.dim() != 3:
        raise ValueError("behavior_topk_logp and topk_logp must both be [B, T, K], got "
                         f"{tuple(behavior_topk_logp.shape)} and {tuple(topk_logp.shape)}")
    lq, lp = behavior_topk_logp.detach().float(), topk_logp.detach().float()
    q, p = lq.exp(), lp.exp()
    q_other = (1 - q.sum(-1)).clamp(min=0.0)
    p_other = (1 - p.sum(-1)).clamp(min=0.0)
    if kind == "tv":
        return 0.5 * ((q - p).abs().sum(-1) + (q_other - p_other).abs())
    if kind == "kl":
        kl_top = (q * (lq - lp)).sum(-1)
        tiny = torch.finfo(torch.float32).tiny
        kl_other = torch.where(q_other > 0, q_other * (q_other.clamp(min=tiny).log() - p_other.clamp(min=tiny).log()),
                               torch.zeros_like(q_other))
        return (kl_top + kl_other).clamp(min=0.0)
    raise ValueError(f"kind must be 'tv' or 'kl', got {kind!r}")


def divergence_mask_loss(x: PolicyInputs, divergence: torch.Tensor, delta: float | torch.Tensor, *, agg: str,
                         is_cap: float | None, surrogate_kind: str, horizon: int | None,
                         global_tokens: float | None, global_seqs: float | None,
                         also_masked: torch.Tensor | None = None) -> LossOutput:
    """The DPPO objective for any per-token divergence D_t (shared by all DPPO variants).

    ``also_masked``: [B, T] bool, tokens masked in addition to the divergence mask (the hybrid)."""
    if surrogate_kind not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate_kind!r}")
    a, r = x.advantages, x.ratio
    over = divergence.to(r.dtype) > delta
    masked = over & (((a > 0) & (r > 1)) | ((a < 0) & (r < 1)))
    if also_masked is not None:
        masked = masked | also_masked
    keep = x.mask & ~masked
    w = truncated_weight(r, is_cap)
    weight = -(keep * w * a)
    # "ratio": the value is the (truncated) DPPO objective; "logp": verl's convention -A w logp.
    value = weight if surrogate_kind == "ratio" else weight * x.logp.detach()
    loss = aggregate(surrogate(x.logp, value, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    return LossOutput(loss, keep, standard_metrics(x, keep, is_cap, delta))


def _binary(kind: str):
    def loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             delta: float | torch.Tensor = 0.15 if kind == "tv" else 0.05, agg: str = "token-mean",
             is_cap: float | None = IS_CAP, surrogate: str = "ratio", horizon: int | None = None,
             global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
        check_agg(agg)
        x = prepare(logp, behavior_logp, advantages, mask)
        delta = as_threshold(delta, x.logp)
        div = binary_tv(x) if kind == "tv" else binary_kl(x)
        return divergence_mask_loss(x, div, delta, agg=agg, is_cap=is_cap, surrogate_kind=surrogate,
                                    horizon=horizon, global_tokens=global_tokens, global_seqs=global_seqs)

    loss.__name__ = f"dppo_{kind}_loss"
    loss.__doc__ = (f"DPPO Binary-{kind.upper()}: D_t = " +
                    ("|pi_t - mu_t|" if kind == "tv" else "KL(Bern(mu_t) || Bern(pi_t))") +
                    "; see the module docstring for the mask.")
    return loss


def _topk(kind: str):
    def loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             behavior_topk_logp: torch.Tensor, topk_logp: torch.Tensor,
             delta: float | torch.Tensor = 0.15 if kind == "tv" else 0.05, agg: str = "token-mean",
             is_cap: float | None = IS_CAP, surrogate: str = "ratio", horizon: int | None = None,
             global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
        check_agg(agg)
        x = prepare(logp, behavior_logp, advantages, mask)
        delta = as_threshold(delta, x.logp)
        if behavior_topk_logp.shape[:2] != logp.shape:
            raise ValueError(f"behavior_topk_logp must be [B, T, K] with [B, T] = {tuple(logp.shape)}, "
                             f"got {tuple(behavior_topk_logp.shape)}")
        div = topk_divergence(behavior_topk_logp, topk_logp, kind)
        return divergence_mask_loss(x, div, delta, agg=agg, is_cap=is_cap, surrogate_kind=surrogate,
                                    horizon=horizon, global_tokens=global_tokens, global_seqs=global_seqs)

    loss.__name__ = f"dppo_topk_{kind}_loss"
    loss.__doc__ = (f"DPPO Top-K {kind.upper()}: D_t over mu's top-K ids plus an 'other' bucket; "
                    "see the module docstring for the mask.")
    return loss


dppo_tv_loss = register_loss("dppo-tv")(_binary("tv"))
dppo_kl_loss = register_loss("dppo-kl")(_binary("kl"))
dppo_topk_tv_loss = register_loss("dppo-topk-tv")(_topk("tv"))
dppo_topk_kl_loss = register_loss("dppo-topk-kl")(_topk("kl"))


@register_loss("dppo-tv-hybrid")
def dppo_tv_hybrid_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, delta: float | torch.Tensor = 0.15, tau: float = 0.01,
                        eps_low: float = 0.2, eps_high: float | None = None, agg: str = "token-mean",
                        is_cap: float | None = IS_CAP, surrogate: str = "ratio", horizon: int | None = None,
                        global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
    """DPPO Binary-TV whose A > 0 tokens with mu_t < ``tau`` are also ratio-bounded.

    Masked iff DPPO-TV masks the token (with ``delta`` per token, so AV-DPPO thresholds apply) or
    A > 0, mu_t < tau and r > 1 + eps_high (eps_high None = eps_low, as in ``ppo``): loose for
    plausible tokens, PPO's upper clip for improbable ones on the side that raises them.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    delta = as_threshold(delta, x.logp)
    bounded = (x.advantages > 0) & (x.mu < tau) & (x.ratio > 1 + eps_high)
    out = divergence_mask_loss(x, binary_tv(x), delta, agg=agg, is_cap=is_cap, surrogate_kind=surrogate,
                               horizon=horizon, global_tokens=global_tokens, global_seqs=global_seqs,
                               also_masked=bounded)
    out.metrics["ratio_bounded_frac"] = float((bounded & x.mask).sum() / x.mask.sum().clamp(min=1))
    return out
