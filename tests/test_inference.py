"""Inference functions against independent references: hand-computed t-intervals, exact sign-flip
enumeration, statsmodels' Holm and power, the noncentral t, and Monte-Carlo power."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from tokentrust.study import inference as I

T975 = {3: 4.303, 4: 3.182, 5: 2.776, 7: 2.447, 8: 2.365}  # t_{0.975, n-1} from a table, n -> t


def test_paired_t_interval_hand_computed():
    x = np.array([3.0, 5.0, 4.0, 6.0])
    y = np.array([2.5, 4.0, 3.8, 5.0])
    d = x - y  # 0.5, 1.0, 0.2, 1.0
    mean = sum(d) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 3)
    r = I.paired_test(x, y)
    assert r.n == 4 and r.diff == pytest.approx(mean) and r.sd == pytest.approx(sd)
    half = T975[4] * sd / 2
    assert r.lo == pytest.approx(mean - half, abs=1e-3) and r.hi == pytest.approx(mean + half, abs=1e-3)
    t = mean / (sd / 2)
    assert r.p == pytest.approx(2 * (1 - stats.t.cdf(t, 3)))
    assert r.d_z == pytest.approx(mean / sd)
    assert r.g_z == pytest.approx(mean / sd * (1 - 3 / (4 * 3 - 1)))
    assert r.test == "paired t" and r.p_floor == 0.125


def test_paired_test_drops_nonfinite_pairs_and_needs_two():
    r = I.paired_test([1.0, 2.0, float("nan"), 4.0], [0.0, 1.5, 1.0, 3.0])
    assert r.n == 3 and r.diff == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    one = I.paired_test([1.0], [0.0])
    assert one.n == 1 and math.isnan(one.p) and not one.significant()
    with pytest.raises(ValueError, match="equal length"):
        I.paired_test([1.0, 2.0], [1.0])


def test_zero_spread_falls_back_to_the_sign_flip_p():
    # every seed gains exactly 0.2: the t statistic is undefined, the exact sign-flip p is 2/2^n
    for n in (3, 8):
        r = I.paired_test(np.arange(n) + 0.2, np.arange(n, dtype=float))
        assert r.p == pytest.approx(2 / 2**n) and r.lo == r.hi == pytest.approx(0.2)
        assert math.isnan(r.mde)
    same = I.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.p == 1.0 and same.diff == 0.0


def _enumerated_sign_flip(d):
    d = np.asarray(d, dtype=float)
    obs = abs(d.mean())
    flips = [abs((d * np.array(s)).mean()) for s in itertools.product((1, -1), repeat=d.size)]
    return sum(f >= obs - 1e-12 for f in flips) / len(flips)


@pytest.mark.parametrize("d", [[0.3, 0.1, 0.4, -0.05], [1.0, 2.0, 3.0, -0.5, 0.7], [0.2, -0.1, 0.5, 0.3, 0.1, 0.6, -0.2, 0.4]])
def test_sign_flip_matches_exact_enumeration(d):
    assert I.sign_flip_pvalue(d) == pytest.approx(_enumerated_sign_flip(d))


def test_sign_flip_floor():
    for n, floor in ((3, 0.25), (4, 0.125), (5, 0.0625), (6, 0.03125), (8, 0.0078125)):
        assert I.min_signflip_p(n) == floor
        assert I.sign_flip_pvalue(np.arange(1.0, n + 1)) == pytest.approx(floor)  # all the same sign
    assert I.min_signflip_p(5) > 0.05 > I.min_signflip_p(6)


def test_mde_against_the_formula_statsmodels_and_monte_carlo():
    for n, rel in ((4, 0.025), (8, 0.01), (12, 0.01)):  # the formula is a little low at tiny n
        exact = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8)
        assert I.mde(1.0, n) == pytest.approx(exact, rel=rel) and I.mde(1.0, n) < exact
    # with the table's t quantiles: (2.365 + t_{0.8,7} = 0.896) / sqrt(8)
    assert I.mde(2.0, 8) == pytest.approx(2.0 * (T975[8] + 0.896) / math.sqrt(8), rel=1e-3)
    # a Monte-Carlo paired t-test at an effect of one MDE rejects about 80% of the time
    rng = np.random.default_rng(0)
    d = rng.normal(I.mde(1.0, 8), 1.0, size=(4000, 8))
    power = np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
    assert power == pytest.approx(0.8, abs=0.03)
    assert math.isnan(I.mde(1.0, 1)) and math.isnan(I.mde(0.0, 5))


def test_seeds_needed_against_noncentral_t_power():
    def power(d, n, alpha=0.05):  # exact paired t power from the noncentral t
        c = stats.t.ppf(1 - alpha / 2, n - 1)
        return stats.nct.sf(c, n - 1, d * math.sqrt(n)) + stats.nct.cdf(-c, n - 1, d * math.sqrt(n))

    for effect in (0.5, 1.0, 2.0):
        n = I.seeds_needed(effect, 1.0)
        assert power(effect, n) >= 0.79 and power(effect, n - 1) < 0.8
    assert I.seeds_needed(1.0, 1.0, alpha=0.0125) > I.seeds_needed(1.0, 1.0)
    assert I.seeds_needed(0.0, 1.0) is None and I.seeds_needed(1e-4, 1.0) is None


def test_holm_and_bh_against_references():
    p = [0.01, 0.04, float("nan"), 0.03, 0.2]
    holm = I.adjust(p, "holm")
    # by hand over the 4 finite p: sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.09, 0.09 (running max), 0.2
    assert holm[[0, 3, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert math.isnan(holm[2])
    rng = np.random.default_rng(1)
    for _ in range(3):  # multipletests runs gc.collect() on every call: slow
        q = rng.random(7) ** 3
        assert I.adjust(q, "holm") == pytest.approx(multipletests(q, method="holm")[1])
        assert I.adjust(q, "bh") == pytest.approx(multipletests(q, method="fdr_bh")[1])
    assert np.isnan(I.adjust([float("nan")])).all()
    with pytest.raises(ValueError, match="unknown correction"):
        I.adjust([0.1], "bonf")


def test_accuracy_test_is_the_cluster_level_test_of_per_seed_differences():
    rng = np.random.default_rng(2)
    a = (rng.random((5, 30)) < 0.6).astype(float)
    b = (rng.random((5, 30)) < 0.5).astype(float)
    r = I.accuracy_test(a, b, n_boot=500)
    per_seed = [a[s].mean() - b[s].mean() for s in range(5)]
    ref = stats.ttest_1samp(per_seed, 0.0)
    assert r.n == 5 and r.diff == pytest.approx(a.mean() - b.mean())
    assert r.p == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (r.lo, r.hi) == pytest.approx((ci.low, ci.high))
    assert r.p_signflip == pytest.approx(_enumerated_sign_flip(per_seed))
    assert r.extra["better"] == np.sum(a > b) and r.extra["worse"] == np.sum(a < b)
    assert r.extra["boot_lo"] < r.diff < r.extra["boot_hi"]
    with pytest.raises(ValueError, match="seeds, problems"):
        I.accuracy_test(a, b[:, :10])


def test_cluster_bootstrap_se_recovers_each_variance_component():
    rng = np.random.default_rng(3)
    # only seed-level variation (constant within a row): SE -> sd(rows) / sqrt(S)
    rows = rng.normal(size=6)
    D = np.repeat(rows[:, None], 50, axis=1)
    assert I.cluster_bootstrap_se(D, n_boot=20000) == pytest.approx(rows.std(ddof=1) / math.sqrt(6), rel=0.05)
    # only problem-level variation (the same in every seed): SE -> sd(cols) sqrt((P-1)/P) / sqrt(P),
    # times the sqrt(S/(S-1)) small-sample factor
    cols = rng.normal(size=40)
    D = np.repeat(cols[None, :], 4, axis=0)
    expect = cols.std(ddof=0) / math.sqrt(40) * math.sqrt(4 / 3)
    assert I.cluster_bootstrap_se(D, n_boot=20000) == pytest.approx(expect, rel=0.05)


def test_mean_interval_and_percentile_bootstrap():
    v = [1.0, 2.0, 4.0]
    m, lo, hi = I.mean_interval(v)
    sd = np.std(v, ddof=1)
    assert m == pytest.approx(7 / 3)
    assert (lo, hi) == pytest.approx((7 / 3 - T975[3] * sd / math.sqrt(3), 7 / 3 + T975[3] * sd / math.sqrt(3)), abs=1e-3)
    assert I.mean_interval([2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert math.isnan(I.mean_interval([2.0])[1]) and math.isnan(I.mean_interval([])[0])
    # the percentile bootstrap of two values is their range (why it is not used for decisions)
    assert I.bootstrap_ci([1.0, 3.0], n_boot=4000)[1:] == (1.0, 3.0)
    x = np.random.default_rng(1).normal(size=2000)
    point, lo, hi = I.bootstrap_ci(x, n_boot=4000, seed=0)
    assert point == pytest.approx(x.mean()) and (hi - lo) == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.15)
    p, lo, hi = I.bootstrap_ci([1.0, 2.0, 3.0, 4.0], stat=lambda a: float(max(a)), n_boot=300)
    assert p == 4.0 and 1.0 <= lo <= hi <= 4.0
    assert I.bootstrap_ci([2.5]) == (2.5, 2.5, 2.5) and all(math.isnan(v) for v in I.bootstrap_ci([]))


def test_rounding_noise_is_no_difference():
    """Differences at the level of float32 rounding (about 6e-8 of the values) are no evidence of an
    effect: before the relative rule, float32 ulps gave p = 0.0016 and a 1e-9 shift with 2e-12
    jitter gave p ~ 1e-20. The exact sign-flip test could never go below 2/2^8 = 0.0078 here."""
    ones = np.ones(8)
    rounded = np.array([float(np.float32(1 - e)) for e in (6e-8, 1.2e-7, 6e-8, 6e-8, 1.2e-7, 6e-8, 0, 6e-8)])
    assert (ones - rounded).max() > 0  # the inputs do differ, by float32 ulps
    r = I.paired_test(ones, rounded)
    assert r.p == 1.0 and r.p >= I.min_signflip_p(8)
    level = np.full(8, 0.9)
    r = I.paired_test(level, level - 1e-9 * (1 + 1e-3 * np.arange(8)))
    assert r.p == 1.0
    m, lo, hi = I.mean_interval(rounded)
    assert lo == hi == m
    # a real shift with no spread still gets the exact sign-flip p (2/2^n), not 1
    shift = I.paired_test(level + 0.01, level)
    assert shift.p == pytest.approx(2 / 2**8)


def test_tost_and_shifted_null_against_statsmodels():
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(4)
    x, y = rng.normal(0.1, 1, 8), rng.normal(0.0, 1, 8)
    r = I.paired_test(x, y)
    for m in (0.3, 1.0, 2.5):
        ref = ttost_paired(x, y, -m, m)[0]
        assert I.tost_pvalue(r, m) == pytest.approx(ref, rel=1e-9)
    d = x - y
    for null in (-0.5, 0.0, 0.7):  # the two-sided one-sample t-test of mean(d) = null
        assert I.shifted_pvalue(r, null) == pytest.approx(stats.ttest_1samp(d, null).pvalue, rel=1e-9)
    lo, hi = I.interval(r, 0.10)  # the 90% interval TOST uses at alpha 0.05
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.90)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    # equivalence at 0.05 iff the 90% interval lies inside [-m, m]
    for m in np.linspace(0.05, 3, 30):
        assert (I.tost_pvalue(r, m) < 0.05) == (-m < lo and hi < m)
    flat = I.paired_test(np.arange(4.0) + 0.01, np.arange(4.0))  # no spread
    assert I.tost_pvalue(flat, 0.05) == 0.5**4 and I.tost_pvalue(flat, 0.005) == 1.0
    assert math.isnan(I.tost_pvalue(I.paired_test([1.0], [0.0]), 0.1))


def test_tost_seeds_needed_against_the_notes_and_monte_carlo():
    # the statistics notes' example: s = 0.106, m = 0.05, alpha 0.05, 80% power. Their formula with
    # t_{0.95,40} = 1.684 and t_{0.90,40} = 1.303 (tables): (2.987)^2 x (0.106 / 0.05)^2 = 40.1 -> 41
    # pairs (the notes' "about 28" gives 57% power: see the Monte Carlo below at n = 41)
    n = I.tost_seeds_needed(0.106, 0.05)
    assert n == 41
    rng = np.random.default_rng(8)  # at that n, TOST on a true difference of 0 succeeds ~80% of the time
    d = rng.normal(0.0, 0.106, size=(4000, n))
    se = d.std(axis=1, ddof=1) / math.sqrt(n)
    p = np.maximum(stats.t.sf((d.mean(1) + 0.05) / se, n - 1), stats.t.cdf((d.mean(1) - 0.05) / se, n - 1))
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.04)
    assert I.tost_seeds_needed(0.0, 0.05) is None and I.tost_seeds_needed(1.0, 1e-4) is None
