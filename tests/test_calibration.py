"""Calibration of the headline verdicts by simulation (synthetic metrics, no training).

Grids are simulated the way training randomness acts: every run (method x seed) gets its own
noise on the scalar metrics, and a run-wide logit offset on top of per-problem difficulty for the
evaluation outcomes. Under the null both methods are the same distribution; the real verdict
code (`tokentrust.study.verdicts.evaluate_hypotheses`) judges each grid. Rates are printed (run with -s)
so they can be quoted.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tokentrust.study.inference import accuracy_test, interval, paired_test, shifted_pvalue, tost_pvalue
from tokentrust.study.verdicts import (
    CONTRADICTED,
    DEFAULT_MARGINS,
    EQUIVALENT,
    HYPOTHESES,
    NON_INFERIORITY,
    SUPPORTED,
    Plan,
    evaluate_hypotheses,
)

AV, BASE = "av", "base"
N_PROBLEMS = 40
RUN_OFFSET_SD = 0.4  # logit shift of a whole run's answers (training randomness)
SCALAR_SD = 1.0
PLAN = Plan({h.key: (AV, BASE) for h in HYPOTHESES}, True, "declared")
SCALAR_PRIMARIES = {h.primary[0]: h.primary[1] for h in HYPOTHESES if h.primary[0] != "eval/greedy_pass@1"}
H1_METRIC = next(h.primary[0] for h in HYPOTHESES if h.key == "H1")


def _false_verdict(v) -> bool:
    """A verdict that is wrong when the methods do not differ: a significant superiority headline,
    or a non-inferiority hypothesis called worse by more than its margin (non-inferior or
    EQUIVALENT is true then)."""
    if v.hypothesis.kind == NON_INFERIORITY:
        return v.label == CONTRADICTED
    return v.label in (SUPPORTED, CONTRADICTED)


def _upper(rate: float, grids: int, q: float = 0.99) -> float:
    """Upper q binomial bound of the observed false-verdict fraction when the true rate is `rate`."""
    return stats.binom.ppf(q, grids, rate) / grids


def simulate_grid(rng: np.random.Generator, n_seeds: int, effect_sd: dict[str, float] | None = None,
                  shift: dict[str, float] | None = None):
    """Summaries and per-problem outcomes of a 2-method grid; `effect_sd` plants a favourable shift
    of that many standard deviations of the paired difference on a primary metric, `shift` an
    absolute one (metric units, added as given)."""
    effect_sd, shift = effect_sd or {}, shift or {}
    difficulty = rng.normal(size=N_PROBLEMS)
    summaries = {AV: {}, BASE: {}}
    problems = {AV: {}, BASE: {}}
    for method in (AV, BASE):
        for s in range(n_seeds):
            run = {k: rng.normal(0.0, SCALAR_SD) for k in SCALAR_PRIMARIES}
            if method == AV:  # 1 SD of a paired difference is sqrt(2) SD of one run
                for k, d in SCALAR_PRIMARIES.items():
                    run[k] += d * effect_sd.get(k, 0.0) * SCALAR_SD * np.sqrt(2) + shift.get(k, 0.0)
            logit = rng.normal(0.0, RUN_OFFSET_SD) - difficulty
            greedy = rng.random(N_PROBLEMS) < 1 / (1 + np.exp(-logit))
            summaries[method][s] = run
            problems[method][s] = {i: (float(greedy[i]), float(greedy[i])) for i in range(N_PROBLEMS)}
    return summaries, problems


def _headline(rng, n_seeds, effect_sd=None, shift=None, plan=PLAN):
    summaries, problems = simulate_grid(rng, n_seeds, effect_sd, shift)
    return evaluate_hypotheses(summaries, problems, plan)


@pytest.mark.parametrize("n_seeds,grids", [(4, 250), (8, 250), (24, 150)])
def test_null_grids_rarely_get_a_headline_verdict(n_seeds, grids):
    rng = np.random.default_rng(1000 + n_seeds)
    false_grids = 0
    per_hypothesis = dict.fromkeys((h.key for h in HYPOTHESES), 0)
    for _ in range(grids):
        verdicts = _headline(rng, n_seeds)
        false_grids += any(_false_verdict(v) for v in verdicts)
        for v in verdicts:
            per_hypothesis[v.hypothesis.key] += _false_verdict(v)
    rate = false_grids / grids
    print(f"\nnull, {n_seeds} seeds: {false_grids}/{grids} grids ({rate:.3f}) with a false "
          f"headline; per hypothesis {per_hypothesis}")
    assert rate <= _upper(0.05, grids)


def test_planted_one_sd_effect_is_detected_at_eight_seeds():
    """A 1-SD (d_z = 1) effect on H1's primary metric with 8 seeds: the primary test (alpha 0.05)
    finds it in most grids (theory: power 0.68). The headline also needs the Holm step over the
    four hypotheses, i.e. p < 0.0125 for a lone effect (theory: power 0.39)."""
    rng = np.random.default_rng(7)
    grids = 250
    primary_hits = headline_hits = 0
    for _ in range(grids):
        v = {x.hypothesis.key: x for x in _headline(rng, 8, {H1_METRIC: 1.0})}["H1"]
        primary_hits += v.result.p < 0.05 and v.result.diff < 0
        headline_hits += v.label == "SUPPORTED"
    primary, headline = primary_hits / grids, headline_hits / grids
    print(f"\n1-SD effect, 8 seeds: primary test (alpha 0.05) detects {primary:.3f}; headline "
          f"SUPPORTED after Holm over {len(HYPOTHESES)} hypotheses {headline:.3f}")
    assert primary > 0.5
    assert 0.25 < headline <= primary


@pytest.mark.parametrize("n_seeds", [4, 8, 28])  # the confirmatory study runs 8 and 28
def test_interval_coverage_under_the_null(n_seeds):
    rng = np.random.default_rng(50 + n_seeds)
    reps = 400
    t_cover = acc_cover = boot_cover = 0
    for _ in range(reps):
        x, y = rng.normal(size=n_seeds), rng.normal(size=n_seeds)
        r = paired_test(x, y)
        t_cover += r.lo <= 0 <= r.hi
        _, problems = simulate_grid(rng, n_seeds)
        a = np.array([[problems[AV][s][i][0] for i in range(N_PROBLEMS)] for s in range(n_seeds)])
        b = np.array([[problems[BASE][s][i][0] for i in range(N_PROBLEMS)] for s in range(n_seeds)])
        acc = accuracy_test(a, b, n_boot=500)
        acc_cover += acc.lo <= 0 <= acc.hi
        boot_cover += acc.extra["boot_lo"] <= 0 <= acc.extra["boot_hi"]
    rates = [c / reps for c in (t_cover, acc_cover, boot_cover)]
    print(f"\ncoverage of 95% intervals, {n_seeds} seeds: paired t {rates[0]:.3f}, accuracy cluster t "
          f"{rates[1]:.3f}, accuracy cluster bootstrap {rates[2]:.3f}")
    lower = stats.binom.ppf(0.01, reps, 0.95) / reps
    assert all(r >= lower for r in rates)


def test_pooling_problems_as_independent_would_be_anti_conservative():
    """The reason for the seed-level test: McNemar's test over all seed x problem pairs treats them
    as independent, ignores the run-wide offsets and rejects far too often under the null."""
    rng = np.random.default_rng(3)
    reps, naive, ours = 300, 0, 0
    for _ in range(reps):
        _, problems = simulate_grid(rng, 4)
        a = np.array([[problems[AV][s][i][0] for i in range(N_PROBLEMS)] for s in range(4)])
        b = np.array([[problems[BASE][s][i][0] for i in range(N_PROBLEMS)] for s in range(4)])
        better, worse = np.sum(a > b), np.sum(a < b)  # McNemar over all seed x problem pairs
        z = (better - worse) / np.sqrt(better + worse)
        naive += 2 * stats.norm.sf(abs(z)) < 0.05
        ours += accuracy_test(a, b, n_boot=200).p < 0.05
    print(f"\nnull accuracy, 4 seeds: pooled McNemar rejects {naive / reps:.3f}, cluster test {ours / reps:.3f}")
    assert naive / reps > 0.15
    assert ours / reps <= _upper(0.05, reps)


@pytest.mark.parametrize("n_seeds,reps", [(4, 600), (8, 600), (24, 250)])
def test_margin_tests_keep_their_level_at_the_margin(n_seeds, reps):
    """Paired differences whose true mean is exactly the margin m (here 0.5 sd, as a 0.05 accuracy
    margin against a 0.1 sd of paired differences): TOST may call them equivalent in at most alpha
    of cases; the non-inferiority test (lower is better, so the boundary is +m) calls them
    non-inferior in about alpha / 2 (one-sided 0.025); the 90% interval TOST uses covers the
    true mean in about 90%."""
    rng = np.random.default_rng(900 + n_seeds)
    m, alpha = 0.5, 0.05
    equivalent = non_inferior = covered = 0
    for _ in range(reps):
        r = paired_test(rng.normal(m, 1.0, n_seeds), np.zeros(n_seeds))
        equivalent += tost_pvalue(r, m) < alpha
        non_inferior += shifted_pvalue(r, m) < alpha and r.diff < m
        lo, hi = interval(r, 2 * alpha)
        covered += lo <= m <= hi
    rates = equivalent / reps, non_inferior / reps, covered / reps
    print(f"\nat the margin, {n_seeds} seeds: TOST equivalent {rates[0]:.3f}, non-inferior {rates[1]:.3f}, "
          f"90% interval coverage {rates[2]:.3f}")
    assert rates[0] <= _upper(alpha, reps) and rates[1] <= _upper(alpha / 2, reps)
    assert stats.binom.ppf(0.005, reps, 0.9) / reps <= rates[2] <= stats.binom.ppf(0.995, reps, 0.9) / reps


def test_equivalence_headline_at_the_margin_and_at_zero():
    """Through the verdict code, 8 seeds, H1's margin declared as 2 sd of a run (1.41 sd of the
    paired difference): a true difference exactly at the margin gives EQUIVALENT in at most alpha of
    grids; a true difference of 0 gives it in most. TOST is Holm-corrected across the 3 superiority
    hypotheses, so a lone equivalence needs p < 0.0167."""
    rng = np.random.default_rng(11)
    margin = 2 * SCALAR_SD
    plan = Plan(PLAN.comparisons, True, "declared", {**DEFAULT_MARGINS, "H1": margin})
    grids = 200
    at_margin = at_zero = 0
    for _ in range(grids):
        h1 = {v.hypothesis.key: v for v in _headline(rng, 8, shift={H1_METRIC: margin}, plan=plan)}["H1"]
        at_margin += h1.label == EQUIVALENT
        h1 = {v.hypothesis.key: v for v in _headline(rng, 8, plan=plan)}["H1"]
        at_zero += h1.label == EQUIVALENT
    print(f"\nH1 EQUIVALENT, 8 seeds, margin 1.41 sd of the paired difference: true difference at the "
          f"margin {at_margin / grids:.3f}, at 0 {at_zero / grids:.3f}")
    assert at_margin / grids <= _upper(0.05, grids)
    assert at_zero / grids > 0.5
