"""Probability-aware ratio bounds from the old probability p = mu_t: BandPO (KL ball) and DCPO.

Both compute per-token bounds [low_t, high_t] from p alone and use them in the PPO clipped
surrogate (:func:`tokentrust.losses.ppo.clipped_ratio_loss`), so an improbable token gets a wide
ratio window, as under DPPO's divergence masks.

* BandPO (OpenMOSS/BandPO, ``verl/bandpo/kl2clipbound/bandkl.py``): the upper bound u(p) solves
  (1-p)[log(1-p) - log(1-p u)] - p log u = delta for u in (1, 1/p), i.e. the binary
  KL(pi_old || pi) at pi = p u equals delta; the lower bound is the mirror
  l(p) = [1 - (1-p) u(1-p)] / p.
* DCPO (arXiv 2509.02333; lime-RL/DCPO ``get_clip_low_high``):
  high = 1/2 + 1/2 sqrt(1 + 4 eps_high / p), low = 1/2 + 1/2 sqrt(max(1 - 4 eps_low / p, 0)).

Then (:func:`relax_and_limit`): optionally relax towards the constant clip
(high = max(high, 1 + eps_high), low = min(low, 1 - eps_low)), and limit high to [1, upper_max],
low to [0, 1]. Defaults follow each method's published recipe (see docs/methods.md).
"""

from __future__ import annotations

import math

import torch

from tokentrust.losses.core import LossOutput, as_threshold, check_agg, prepare
from tokentrust.losses.ppo import check_eps, clipped_ratio_loss
from tokentrust.losses.registry import register_loss

BISECT_ITERS = 64  # on log u in [0, -log p] (<= 100 wide): 100 / 2^64 ~ 5e-18, at float64 resolution
LOGP_MIN = -100.0  # p below e^-100 gives u(p) ~ (1 - e^-delta) / p, far above any upper_max, and l(p) = 0
P_MAX = 1.0 - 1e-12  # p = 1 exactly has no interval (1, 1/p); u -> 1 and l -> e^-delta as p -> 1


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def kl_gap(logp: torch.Tensor, log_u: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """(1-p)[log(1-p) - log(1-p u)] - p log u - delta, from log p and log u (float64)."""
    return _KLGap(logp, delta)(log_u)


class _KLGap:
    """:func:`kl_gap` at a fixed p with the terms that do not depend on u computed once.

    log(1 - p u) is taken as log(-expm1(log p + log u)): where e^(log p + log u) is tiny this is
    off by at most ~1e-16 in absolute terms, and it is multiplied by 1 - p <= 1.
    """

    def __init__(self, logp: torch.Tensor, delta: float | torch.Tensor):
        self.logp, self.p = logp, logp.exp()
        self.one_minus_p = -torch.expm1(logp)
        self.const = self.one_minus_p * _log1mexp(logp) - delta

    def __call__(self, log_u: torch.Tensor) -> torch.Tensor:
        return self.const - self.one_minus_p * torch.log(-torch.expm1(self.logp + log_u)) - self.p * log_u


def kl_upper_log(logp: torch.Tensor, delta: float | torch.Tensor, iters: int = BISECT_ITERS) -> torch.Tensor:
    """log u(p): the root of :func:`kl_gap` in (0, -log p), by a fixed number of bisection steps.

    The gap is 0 - delta < 0 at u = 1 and tends to +inf as u -> 1/p, increasing in between, so the
    bracket always holds the unique root.
    """
    gap = _KLGap(logp, delta)
    lo = torch.zeros_like(logp)
    hi = -logp
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = gap(mid) > 0
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


@torch.no_grad()
def bandkl_bounds(behavior_logp: torch.Tensor, delta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of BandPO's KL ball around p = exp(behavior_logp), float64, before relax/limit."""
    lp = behavior_logp.detach().double().clamp(LOGP_MIN, math.log(P_MAX))
    d = delta.double() if isinstance(delta, torch.Tensor) else float(delta)
    high = kl_upper_log(lp, d).exp()
    lq = _log1mexp(lp)  # log(1 - p)
    # mirror: low = [1 - (1-p) u(1-p)] / p, the numerator as -expm1(log(1-p) + log u(1-p)) (no cancellation)
    low = -torch.expm1(lq + kl_upper_log(lq, d)) / lp.exp()
    return low, high


@torch.no_grad()
def dcpo_bounds(behavior_logp: torch.Tensor, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of DCPO's dynamic adaptive clipping, float64, before relax/limit."""
    p = behavior_logp.detach().double().clamp(max=0.0).exp().clamp(min=torch.finfo(torch.float64).tiny)
    high = 0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high / p)
    low = 0.5 + 0.5 * torch.sqrt((1 - 4 * eps_low / p).clamp(min=0.0))
    return low, high


def relax_and_limit(low: torch.Tensor, high: torch.Tensor, *, eps_low: float, eps_high: float, relax: bool,
                    upper_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Optionally widen to the constant clip, then keep high in [1, upper_max] and low in [0, 1]."""
    if not upper_max >= 1:
        raise ValueError(f"upper_max must be >= 1, got {upper_max}")
    if relax:
        high = high.clamp(min=1 + eps_high)
        low = low.clamp(max=1 - eps_low)
    return low.clamp(0.0, 1.0), high.clamp(1.0, upper_max)


def _bounded_loss(x, low: torch.Tensor, high: torch.Tensor, **kw) -> LossOutput:
    """The clipped surrogate with these bounds plus their means over valid tokens as metrics."""
    dtype = x.ratio.dtype
    out = clipped_ratio_loss(x, low.to(dtype), high.to(dtype), **kw)
    m = x.mask.to(torch.float64)
    n = m.sum().clamp(min=1.0)
    low_mean, high_mean = torch.stack([(low * m).sum() / n, (high * m).sum() / n]).tolist()
    out.metrics.update(bound_low_mean=low_mean, bound_high_mean=high_mean)
    return out


@register_loss("bandpo")
def bandpo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                delta: float | torch.Tensor = 0.05, eps_low: float = 0.2, eps_high: float | None = None,
                relax: bool = False, upper_max: float = 10.0, dual_clip: float | None = 10.0,
                agg: str = "token-mean", is_cap: float | None = None, horizon: int | None = None,
                global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
    """BandPO-KL: the PPO clip with bounds from the KL ball of radius ``delta`` around mu_t.

    Defaults are BandPO's main recipe (``bandpo__grpo_plus_ray_bandkl005.sh``): delta 0.05, no
    relaxation, upper bound limited to 10, dual clip 10. ``eps_low``/``eps_high`` matter only with
    ``relax=True``. ``delta`` may be a [B, T] tensor.
    """
    eps_high = check_eps(eps_low, eps_high)
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    delta = as_threshold(delta, x.logp)
    low, high = relax_and_limit(*bandkl_bounds(x.behavior_logp, delta), eps_low=eps_low, eps_high=eps_high,
                                relax=relax, upper_max=upper_max)
    return _bounded_loss(x, low, high, agg=agg, is_cap=is_cap, dual_clip=dual_clip, horizon=horizon,
                         global_tokens=global_tokens, global_seqs=global_seqs)


@register_loss("dcpo")
def dcpo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps_low: float = 0.2, eps_high: float | None = None, relax: bool = False, upper_max: float = 10.0,
              dual_clip: float | None = 10.0, agg: str = "token-mean", is_cap: float | None = None,
              horizon: int | None = None, global_tokens: float | None = None,
              global_seqs: float | None = None) -> LossOutput:
    """DCPO's dynamic adaptive clipping in the PPO clip.

    Defaults are DCPO's (lime-RL/DCPO ``clip_type="dynamic"``): no relaxation, upper bound limited
    to 10 (``max(clip_ratio_c, 10)`` with clip_ratio_c = 10), dual clip 10.
    """
    eps_high = check_eps(eps_low, eps_high)
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    low, high = relax_and_limit(*dcpo_bounds(x.behavior_logp, eps_low, eps_high), eps_low=eps_low,
                                eps_high=eps_high, relax=relax, upper_max=upper_max)
    return _bounded_loss(x, low, high, agg=agg, is_cap=is_cap, dual_clip=dual_clip, horizon=horizon,
                         global_tokens=global_tokens, global_seqs=global_seqs)
