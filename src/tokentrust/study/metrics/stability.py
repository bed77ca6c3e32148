"""Training-stability metrics of one run, from its per-step records (pure functions).

Which of them can carry a stability claim, and why (docs/statistics.md): a collapsing run must
score as less stable. `drawdown_smoothed` (H1's primary) and the collapse counts do; the
Bernoulli-normalised step noise (`reward_noise_normalized`) does not: a collapsed run sits near
p = 0 where its per-step noise is tiny, and it treats a prompt's G correlated samples as
independent. `reward_noise_design_effect` corrects that noise for the within-prompt correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tokentrust.study.metrics.curves import Record, _values, curve

# ----------------------------------------------------------------------------------------------
# stability


def reward_std(records: Sequence[Record], key: str = "reward/mean") -> float:
    """Sample std (ddof=1) of the per-step mean reward. Includes the learning trend."""
    v = _values(records, key)
    return float(np.std(v, ddof=1)) if v.size >= 2 else float("nan")


def reward_diff_std(records: Sequence[Record], key: str = "reward/mean") -> float:
    """Std of step-to-step changes of the mean reward: step noise with the trend removed."""
    v = _values(records, key)
    return float(np.std(np.diff(v), ddof=1)) if v.size >= 3 else float("nan")


def reward_noise_normalized(
    records: Sequence[Record], samples_per_step: int | None, key: str = "reward/mean"
) -> float:
    """Step-to-step reward noise in units of its Bernoulli sampling noise.

    A mean of m Bernoulli(p) rewards has variance p(1-p)/m, so raw noise peaks at p = 0.5 and a
    method that sits nearer 0.5 looks less stable. Here each change r_t - r_{t-1} is divided by
    sqrt(2 pbar (1 - pbar) / m), pbar = (r_t + r_{t-1}) / 2 clipped to [0.5/m, 1 - 0.5/m], and
    the std of these z-scores is returned, larger when the policy itself jumps. m =
    prompts_per_step * group_size. The G samples of one prompt are correlated (intra-prompt
    correlation rho), so pure sampling noise gives about sqrt(1 + (G - 1) rho), not 1; the metric
    compares methods run with the same G and prompts, not against an absolute scale. NaN without m
    or with < 3 steps."""
    v = _values(records, key)
    if not samples_per_step or samples_per_step < 1 or v.size < 3:
        return float("nan")
    m = float(samples_per_step)
    pbar = np.clip((v[1:] + v[:-1]) / 2, 0.5 / m, 1 - 0.5 / m)
    z = np.diff(v) / np.sqrt(2 * pbar * (1 - pbar) / m)
    return float(np.std(z, ddof=1))


def collapse_events(
    curve_values: Sequence[float] | np.ndarray,
    frac: float = 0.5,
    min_steps: int = 3,
    min_peak: float = 0.2,
) -> list[tuple[int, int]]:
    """Collapse events of a reward curve as (first index, length).

    An event is a maximal run of at least `min_steps` consecutive points below `frac` times the
    running maximum (including the current point), counted only once that maximum is at least
    `min_peak` (so a run that never learned does not "collapse")."""
    a = np.asarray(curve_values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return []
    peak = np.maximum.accumulate(a)
    below = (peak >= min_peak) & (a < frac * peak)
    events, start = [], None
    for i, b in enumerate([*below.tolist(), False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            if i - start >= min_steps:
                events.append((start, i - start))
            start = None
    return events


def time_to_collapse(
    steps: Sequence[float] | np.ndarray, curve_values: Sequence[float] | np.ndarray, **kw: float
) -> tuple[float, bool]:
    """(step of the first collapse event, True), or (last step, False) when none: censored.

    `kw` is passed to `collapse_events`."""
    s = np.asarray(steps, dtype=np.float64)
    if s.size == 0:
        return float("nan"), False
    ev = collapse_events(curve_values, **kw)  # type: ignore[arg-type]
    return (float(s[ev[0][0]]), True) if ev else (float(s[-1]), False)


def loss_variance(records: Sequence[Record], key: str = "loss/total") -> float:
    """Sample variance (ddof=1) of the per-step loss (falls back to loss/policy)."""
    v = _values(records, key)
    if v.size == 0 and key == "loss/total":
        v = _values(records, "loss/policy")
    return float(np.var(v, ddof=1)) if v.size >= 2 else float("nan")


def max_drawdown(curve_values: Sequence[float] | np.ndarray) -> float:
    """Largest drop of a curve below its running maximum (>= 0; 0 for a non-decreasing curve)."""
    a = np.asarray(curve_values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan")
    return float(np.max(np.maximum.accumulate(a) - a))


def grad_norm_p99(records: Sequence[Record], key: str = "actor/grad_norm") -> float:
    """99th percentile of the finite per-step gradient norms."""
    v = _values(records, key)
    return float(np.percentile(v, 99)) if v.size else float("nan")


def grad_spike_count(
    norms: Sequence[float] | np.ndarray,
    factor: float = 3.0,
    window: int = 20,
    min_history: int = 5,
) -> int:
    """Number of gradient-norm spikes.

    Step t is a spike if norm_t > factor * median(finite norms of steps t-window .. t-1) and that
    window holds at least `min_history` finite norms (so the first steps are never judged). A
    non-finite norm (inf / nan) always counts as a spike and is left out of later medians.
    """
    a = np.asarray(norms, dtype=np.float64).reshape(-1)
    spikes = 0
    for t in range(a.size):
        if not math.isfinite(a[t]):
            spikes += 1
            continue
        prev = a[max(0, t - window) : t]
        prev = prev[np.isfinite(prev)]
        if prev.size >= min_history and a[t] > factor * np.median(prev):
            spikes += 1
    return spikes


def entropy_trajectory(
    records: Sequence[Record], key: str = "actor/entropy", window: int = 10
) -> dict[str, float]:
    """Entropy at the start (mean of the first `window` steps), end (last `window`) and the
    least-squares slope per step over the whole run."""
    steps, v = curve(records, key)
    nan = float("nan")
    if v.size == 0:
        return {"first": nan, "last": nan, "slope": nan}
    slope = float(np.polyfit(steps, v, 1)[0]) if np.unique(steps).size >= 2 else nan
    return {"first": float(v[:window].mean()), "last": float(v[-window:].mean()), "slope": slope}


def mean_abs_pi_mu(records: Sequence[Record], key: str = "trust_region/abs_diff_mean") -> float:
    """Mean over steps of the logged mean |pi - mu| on valid tokens."""
    v = _values(records, key)
    return float(v.mean()) if v.size else float("nan")


def drawdown_smoothed(curve_values: Sequence[float] | np.ndarray, window: int = 5) -> float:
    """Worst drawdown of the `window`-step trailing mean of a curve: the largest fall of the
    smoothed curve below its running maximum (>= 0; NaN with fewer than `window` finite points).

    The moving mean divides the per-step sampling noise by sqrt(window), so a fall of this size is
    the policy losing reward, not a noisy batch: a collapse to 0 from a peak of 0.5 scores about
    0.5, a run that learns steadily about 0, a noisy but level run a few hundredths."""
    a = np.asarray(curve_values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size < window or window < 1:
        return float("nan")
    smooth = np.convolve(a, np.ones(window) / window, mode="valid")
    return float(np.max(np.maximum.accumulate(smooth) - smooth))


def uniform_group_probability(p: float, rho: float, group: int) -> float:
    """P(all `group` binary rewards of one prompt are equal) when the prompt's success rate is
    Beta-distributed with mean p and intra-class correlation rho (beta-binomial): E[q^G] +
    E[(1 - q)^G], with E[q^G] = prod_{i<G} (a + i) / (a + b + i), a = p (1 - rho) / rho,
    b = (1 - p) (1 - rho) / rho. rho = 0 gives p^G + (1 - p)^G, rho = 1 gives 1."""
    if rho <= 0:
        return p**group + (1 - p) ** group
    if rho >= 1:
        return 1.0
    a, b = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
    i = np.arange(group)
    return float(np.prod((a + i) / (a + b + i)) + np.prod((b + i) / (a + b + i)))


def _icc_from_uniform_share(p: float, uniform: float, group: int, iters: int = 50) -> float:
    """The rho in [0, 1] at which `uniform_group_probability` equals the observed share (bisection;
    the probability rises with rho)."""
    if uniform <= uniform_group_probability(p, 0.0, group):
        return 0.0
    if uniform >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if uniform_group_probability(p, mid, group) < uniform else (lo, mid)
    return (lo + hi) / 2


def reward_noise_design_effect(
    records: Sequence[Record], prompts: int | None, group: int | None, key: str = "reward/mean"
) -> float:
    """Step-to-step reward noise in units of its sampling noise, corrected for the correlation of a
    prompt's G samples.

    A step's mean over P prompts x G samples has variance p (1 - p) / (P G) x (1 + (G - 1) rho)
    (the design effect). rho is estimated per step from the logged share of prompts whose G rewards
    are all equal (`reward/zero_std_groups`, binary rewards, beta-binomial model). Each change
    r_t - r_{t-1} is divided by sqrt(v_t + v_{t-1}), v_t = p_t (1 - p_t) deff_t / (P G), p_t
    clipped to [0.5 / PG, 1 - 0.5 / PG]; the metric is the std of these z-scores (about 1 for pure
    sampling noise at any reward level and correlation). NaN without the shape, the uniform-group
    share, or 3 steps."""
    if not prompts or not group or group < 2:
        return float("nan")
    pts = [(r.get(key), r.get("reward/zero_std_groups")) for r in records]
    pts = [(float(p), float(u)) for p, u in pts if isinstance(p, (int, float)) and isinstance(u, (int, float))
           and math.isfinite(p) and math.isfinite(u)]
    if len(pts) < 3:
        return float("nan")
    m = float(prompts * group)
    r = np.array([p for p, _ in pts])
    pc = np.clip(r, 0.5 / m, 1 - 0.5 / m)
    deff = np.array([1 + (group - 1) * _icc_from_uniform_share(p, u, group) for p, (_, u) in zip(pc, pts)])
    v = pc * (1 - pc) * deff / m
    z = np.diff(r) / np.sqrt(v[1:] + v[:-1])
    return float(np.std(z, ddof=1))
