"""Statistical inference for comparing methods over few seeds (pure functions, no I/O).

Why these procedures (see docs/statistics.md and the project's statistics notes):

- Paired comparison over seeds: the paired t-test (`scipy.stats.ttest_1samp` on the differences)
  and its t-interval keep their level and coverage at small n under roughly normal differences.
  The percentile bootstrap does not: with n = 3 its 95% interval is exactly [min, max].
- The exact sign-flip permutation test (`scipy.stats.permutation_test`) is distribution-free but
  cannot give p below 2 / 2^n, so it cannot reach 0.05 with fewer than 6 seeds. It is reported
  beside the t-test as a robustness check; the t-test decides.
- Accuracy on shared problems: outcomes are paired by (seed, problem). Training randomness shifts
  whole runs, so the seed is the unit of replication: the test is a cluster-level t-test on the
  per-seed paired differences (each the mean over the common problems of method - baseline), with
  n_seeds - 1 degrees of freedom. Pooling the problems as independent would be anti-conservative.
  A two-stage cluster bootstrap (seed pairs, then problems shared across the resampled seeds)
  gives a wider interval that also generalises over the choice of problems.
- Multiple comparisons: Holm controls the family-wise error rate (checked against statsmodels'
  `multipletests`); Benjamini-Hochberg (`scipy.stats.false_discovery_control`) the FDR.
- Margins: equivalence within +/- m by two one-sided tests (TOST, `tost_pvalue`); non-inferiority
  as a two-sided test of diff = -m (`shifted_pvalue`), whose direction says "not worse by more than
  m" or "worse by more than m". Checked by simulation at the margin in tests/test_calibration.py.
- Rounding noise: differences and spreads below NUMERIC_RTOL of the values' magnitude are noise
  (`negligible`), so float32 ulps never become p = 1e-18.
- Power: the minimum detectable effect at 80% power, (t_{1-a/2,n-1} + t_{0.8,n-1}) sd / sqrt(n),
  and the seeds needed for an observed effect (checked against statsmodels' `TTestPower`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray
POWER = 0.8
MAX_SEEDS = 1000  # seeds_needed gives up beyond this
# differences and spreads below this share of the values' magnitude are rounding noise: logged
# metrics are often float32 means (one ulp near 1 is 6e-8), so 1e-6 sits above their noise and far
# below any effect worth reporting
NUMERIC_RTOL = 1e-6


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of a method with a baseline (difference = method - baseline).

    `p` is the two-sided p-value of the deciding test (`test`); `lo`/`hi` its (1 - alpha) interval.
    `p_signflip` is the exact sign-flip permutation p over the per-seed differences, whose floor is
    `p_floor` = 2 / 2^n. `d_z` = diff / sd of the per-seed differences, `g_z` its small-sample
    (Hedges) correction. `mde`: the difference the test detects with 80% power at this n, in
    the metric's units; `seeds_needed`: seeds for 80% power at the observed d_z (None if > 1000
    or undefined). `extra` holds test-specific numbers (e.g. the cluster-bootstrap interval)."""

    n: int
    diff: float
    lo: float
    hi: float
    sd: float
    p: float
    p_signflip: float
    p_floor: float
    d_z: float
    g_z: float
    mde: float
    seeds_needed: int | None
    test: str
    extra: dict[str, float]

    def significant(self, alpha: float = 0.05) -> bool:
        return bool(math.isfinite(self.p) and self.p < alpha)


def _clean(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def min_signflip_p(n: int) -> float:
    """Smallest two-sided p-value an exact sign-flip test can give with n paired seeds: 2 / 2^n."""
    return min(1.0, 2.0 / 2.0**n) if n >= 1 else 1.0


def sign_flip_pvalue(diffs: ArrayLike, *, exact_up_to: int = 16, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of mean(diffs) = 0 (exact for n <= exact_up_to).

    Uses `scipy.stats.permutation_test` with permutation_type='samples', which for one sample
    flips the signs of the observations."""
    d = _clean(diffs)
    if d.size == 0:
        return math.nan
    if not np.any(d):
        return 1.0
    res = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=np.inf if d.size <= exact_up_to else 20000,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, res.pvalue))


def mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Minimum detectable difference of a two-sided paired t-test with n pairs (metric units):
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). Slightly below the exact noncentral-t
    answer (`statsmodels.stats.power.TTestPower`): 2% at n = 4, < 1% from n = 8; cheap."""
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Smallest number of paired seeds whose `mde` is at most |effect| (None beyond 1000)."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0 or sd <= 0:
        return None
    ns = np.arange(2, MAX_SEEDS + 1)
    detectable = (stats.t.ppf(1 - alpha / 2, ns - 1) + stats.t.ppf(power, ns - 1)) * sd / np.sqrt(ns)
    hit = np.flatnonzero(detectable <= abs(effect))
    return int(ns[hit[0]]) if hit.size else None


def negligible(x: float, level: float) -> bool:
    """True when |x| is at most NUMERIC_RTOL of the measured values' level (max |value|): rounding
    noise, not an effect. Relative to the values, not to the difference, so a 1e-9 shift of values
    near 1 is noise however small its own spread."""
    return abs(x) <= NUMERIC_RTOL * level


def _result_from_seed_diffs(
    d: np.ndarray, se: float, df: int, alpha: float, test: str, extra: dict[str, float], level: float
) -> PairedResult:
    """Assemble a PairedResult from per-seed differences and the standard error of their mean.

    `level`: the magnitude of the compared values (max |value|), the scale of `negligible`."""
    n = int(d.size)
    diff = float(d.mean())
    sd = se * math.sqrt(n)
    p_flip = sign_flip_pvalue(d)
    if negligible(sd, level):
        # no spread beyond rounding: t is undefined. A difference that is itself rounding noise is
        # no difference (p = 1); a real constant shift gets the exact sign-flip p (floor 2/2^n)
        zero = negligible(diff, level)
        p, lo, hi = (1.0 if zero else p_flip), diff, diff
        dz = gz = (0.0 if zero else math.copysign(math.inf, diff))
        sd = 0.0
    else:
        t = diff / se
        p = float(2 * stats.t.sf(abs(t), df))
        half = float(stats.t.ppf(1 - alpha / 2, df)) * se
        lo, hi = diff - half, diff + half
        dz = diff / sd
        gz = dz * (1 - 3 / (4 * df - 1)) if df > 1 else dz
    return PairedResult(
        n=n,
        diff=diff,
        lo=lo,
        hi=hi,
        sd=sd,
        p=p,
        p_signflip=p_flip,
        p_floor=min_signflip_p(n),
        d_z=dz,
        g_z=gz,
        mde=mde(sd, n, alpha),
        seeds_needed=seeds_needed(diff, sd, alpha),
        test=test,
        extra=extra,
    )


def _empty(n: int, diff: float, test: str) -> PairedResult:
    nan = math.nan
    return PairedResult(n, diff, nan, nan, nan, nan, nan, min_signflip_p(n), nan, nan, nan, None, test, {})


def paired_test(method: ArrayLike, baseline: ArrayLike, alpha: float = 0.05) -> PairedResult:
    """Paired t-test and t-interval of mean(method - baseline) over seeds matched by index.

    Pairs with a non-finite side are dropped. With fewer than 2 pairs nothing is tested (p NaN)."""
    x = np.asarray(method, dtype=np.float64).ravel()
    y = np.asarray(baseline, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired inputs need equal length, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    if d.size < 2:
        return _empty(int(d.size), float(d.mean()) if d.size else math.nan, "paired t")
    se = float(np.std(d, ddof=1) / math.sqrt(d.size))
    level = float(max(np.abs(x[ok]).max(), np.abs(y[ok]).max()))
    return _result_from_seed_diffs(d, se, d.size - 1, alpha, "paired t", {}, level)


def _resample_counts(rng: np.random.Generator, n_boot: int, k: int) -> np.ndarray:
    """[n_boot, k] counts of each unit in n_boot resamples of k units with replacement."""
    idx = rng.integers(0, k, size=(n_boot, k)) + (np.arange(n_boot) * k)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * k).reshape(n_boot, k).astype(np.float64)


def cluster_bootstrap_se(diff_matrix: np.ndarray, n_boot: int = 2000, seed: int = 0) -> float:
    """Standard error of the mean of a [seeds, problems] matrix of paired differences by a
    two-stage bootstrap: resample seeds, and problems jointly for all resampled seeds.

    Scaled by n/(n-1) in variance for the few seeds. It counts the cell-level noise in both
    stages, so it errs on the wide side; it generalises over seeds and problems."""
    D = np.asarray(diff_matrix, dtype=np.float64)
    S, P = D.shape
    if S < 2 or P < 1:
        return math.nan
    rng = np.random.default_rng(seed)
    w = _resample_counts(rng, n_boot, S) / S
    v = _resample_counts(rng, n_boot, P) / P
    boot = np.einsum("bs,sp,bp->b", w, D, v)
    return float(np.std(boot, ddof=1) * math.sqrt(S / (S - 1)))


def accuracy_test(
    method: np.ndarray,
    baseline: np.ndarray,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedResult:
    """Paired per-problem accuracy comparison over seeds.

    `method`, `baseline`: [seeds, problems] outcomes (0/1 or per-problem fractions such as
    mean@k), rows paired by seed and columns by problem. The decision is a cluster-level t-test:
    per-seed paired differences d_s = mean_p(method - baseline), tested with n_seeds - 1 degrees
    of freedom, so seed-wide shifts from training randomness are accounted for. `extra` holds the
    t-calibrated two-stage cluster-bootstrap interval (`boot_lo`, `boot_hi`), which also
    generalises over problems, and the discordant pair counts."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [seeds, problems] arrays of one shape, got {a.shape}, {b.shape}")
    D = a - b
    d = D.mean(axis=1)
    test = "cluster t (per-seed paired problem outcomes)"
    if d.size < 2:
        return _empty(int(d.size), float(d.mean()) if d.size else math.nan, test)
    se = float(np.std(d, ddof=1) / math.sqrt(d.size))
    boot_se = cluster_bootstrap_se(D, n_boot, seed)
    half = float(stats.t.ppf(1 - alpha / 2, d.size - 1)) * boot_se
    extra = {
        "boot_lo": float(d.mean()) - half,
        "boot_hi": float(d.mean()) + half,
        "problems": float(D.shape[1]),
        "better": float(np.sum(D > 0)),
        "worse": float(np.sum(D < 0)),
    }
    level = float(max(np.abs(a).max(), np.abs(b).max()))
    return _result_from_seed_diffs(d, se, d.size - 1, alpha, test, extra, level)


def mean_interval(values: ArrayLike, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean over seeds with its t-interval (NaN bounds with < 2 values or no spread)."""
    a = _clean(values)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size < 2:
        return m, math.nan, math.nan
    if negligible(float(np.std(a)), float(np.abs(a).max())):
        return m, m, m
    ci = stats.ttest_1samp(a, 0.0).confidence_interval(1 - alpha)
    return m, float(ci.low), float(ci.high)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values: max over j <= i of (m - j + 1) p_(j), capped at 1.

    Same numbers as `statsmodels.stats.multitest.multipletests(method='holm')` (the tests check
    it), without its per-call garbage collection, which dominates simulation time."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    m = p.size
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def adjust(pvalues: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjusted p-values ('holm': family-wise error rate; 'bh': false discovery rate via
    `scipy.stats.false_discovery_control`). NaN p-values (untested comparisons) stay NaN and do
    not count towards the family."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if not ok.any():
        return out
    if method == "holm":
        out[ok] = holm(p[ok])
    elif method == "bh":
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    else:
        raise ValueError(f"unknown correction {method!r}; use 'holm' or 'bh'")
    return out


# ----------------------------------------------------------------------------------------------
# margins: equivalence (TOST) and tests against a shifted null (non-inferiority)


def _se_df(r: PairedResult) -> tuple[float, int]:
    return r.sd / math.sqrt(r.n), r.n - 1


def tost_pvalue(r: PairedResult, margin: float) -> float:
    """p-value of equivalence within +/- margin by two one-sided t-tests (Schuirmann 1987): the larger
    of the one-sided p of H0: diff <= -margin and of H0: diff >= +margin, on the test's own standard
    error and n - 1 degrees of freedom. Equivalent at level alpha iff the (1 - 2 alpha) interval
    lies inside [-margin, margin]. No spread: 1/2^n (the exact one-sided sign-flip p) if
    |diff| < margin, else 1. NaN if nothing was tested."""
    if r.n < 2 or not (math.isfinite(r.diff) and math.isfinite(r.sd)) or margin <= 0:
        return math.nan
    if r.sd == 0:
        return 0.5**r.n if abs(r.diff) < margin else 1.0
    se, df = _se_df(r)
    p_low = stats.t.sf((r.diff + margin) / se, df)
    p_high = stats.t.cdf((r.diff - margin) / se, df)
    return float(max(p_low, p_high))


def shifted_pvalue(r: PairedResult, null: float) -> float:
    """Two-sided p of H0: diff = null, on the test's standard error and n - 1 degrees of freedom.

    With null = -margin (higher is better) it is a non-inferiority test: p < alpha with
    diff > null means the (1 - alpha) interval's lower bound is above -margin (one-sided level
    alpha / 2, the ICH E9 convention); p < alpha with diff < null means worse by more than the
    margin. No spread: 2/2^n (exact sign flip) if diff != null, else 1."""
    if r.n < 2 or not (math.isfinite(r.diff) and math.isfinite(r.sd)):
        return math.nan
    if r.sd == 0:
        return 1.0 if r.diff == null else min_signflip_p(r.n)
    se, df = _se_df(r)
    return float(2 * stats.t.sf(abs(r.diff - null) / se, df))


def tost_seeds_needed(sd: float, margin: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Smallest n of paired seeds at which TOST shows equivalence within +/- margin with `power`
    when the true difference is 0 and the paired sd is `sd`: n >= (t_{1-alpha,n-1} +
    t_{1-(1-power)/2,n-1})^2 sd^2 / margin^2 (None beyond 1000 or undefined)."""
    if not (math.isfinite(sd) and math.isfinite(margin)) or sd <= 0 or margin <= 0:
        return None
    ns = np.arange(2, MAX_SEEDS + 1)
    need = (stats.t.ppf(1 - alpha, ns - 1) + stats.t.ppf(1 - (1 - power) / 2, ns - 1)) ** 2 * sd**2 / margin**2
    hit = np.flatnonzero(ns >= need)
    return int(ns[hit[0]]) if hit.size else None


def interval(r: PairedResult, alpha: float) -> tuple[float, float]:
    """The (1 - alpha) t-interval of the difference at any level (e.g. 1 - 2 alpha for TOST)."""
    if r.n < 2 or not math.isfinite(r.sd):
        return math.nan, math.nan
    se, df = _se_df(r)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return r.diff - half, r.diff + half


# ----------------------------------------------------------------------------------------------
# descriptive bootstrap (kept for callers that want it; not used for decisions)


def bootstrap_ci(
    values: ArrayLike,
    stat: Callable[..., Any] = np.mean,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap: (stat(values), lo, hi) with a (1 - alpha) interval.

    Descriptive only: with few values (2-3 seeds) the percentile interval is [min, max]-like and
    undercovers. Non-finite values are dropped; one value gives (v, v, v); none gives NaNs."""
    a = _clean(values)
    if a.size == 0:
        return (math.nan,) * 3
    point = float(stat(a))
    if a.size == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    stats_ = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // a.size)
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        samples = a[rng.integers(0, a.size, size=(m, a.size))]
        try:
            stats_[s : s + m] = stat(samples, axis=1)
        except TypeError:
            stats_[s : s + m] = [stat(row) for row in samples]
    lo, hi = np.quantile(stats_, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)
