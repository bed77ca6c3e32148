"""The declared secondary family (grid.secondary): parsing, per-seed slopes, the tests it runs and
the Holm correction over it, checked against hand computations, scipy and statsmodels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from tokentrust.config import ConfigError
from tokentrust.study.compare import load_grid
from tokentrust.study.inference import tost_pvalue
from tokentrust.study.report.build import build_report
from tokentrust.study.report.data import analyse
from tokentrust.study.secondary import (
    CONTRADICTED,
    EQUIVALENT,
    HIGHER,
    INCONCLUSIVE,
    NOT_TESTABLE,
    SUPPORTED,
    evaluate_family,
    parse_family,
    seed_slopes,
)
from tests.test_report import BASE, GOOD, POOR, _make_grid, _write_run

SEEDS = range(8)


def _summaries(values: dict[str, list[float]], metric: str = "m") -> dict:
    return {name: {s: {metric: v} for s, v in enumerate(vals)} for name, vals in values.items()}


def _loader(summaries, problems=None):
    return lambda grid: (summaries, problems)


def test_per_seed_slope_is_the_hand_computed_ols_slope():
    doses = (("inv", -0.5), ("fixed", 0.0), ("norm", 0.5))
    summ = {"inv": {0: {"m": 0.3}, 1: {"m": 0.1}, 2: {"m": 0.5}},
            "fixed": {0: {"m": 0.2}, 1: {"m": 0.1}},
            "norm": {0: {"m": 0.1}, 1: {"m": 0.4}, 2: {"m": 0.5}}}
    # x has mean 0 and sum x^2 = 0.5: slope = sum(x y) / 0.5. Seed 2 lacks the fixed cell: left out.
    slopes = seed_slopes(summ, doses, "m")
    assert slopes.keys() == {0, 1}
    assert slopes[0] == pytest.approx((-0.5 * 0.3 + 0.5 * 0.1) / 0.5)  # -0.2
    assert slopes[1] == pytest.approx((-0.5 * 0.1 + 0.5 * 0.4) / 0.5)  # +0.3


def test_slope_contrast_is_a_one_sample_t_test_of_the_slopes():
    rng = np.random.default_rng(0)
    inv, fixed, norm = (rng.normal(size=8) for _ in range(3))
    norm = norm - 1.0  # a negative dose effect
    fam = parse_family({"S2": {"slope": {"inv": -0.5, "fixed": 0, "norm": 0.5}, "metric": "m", "predict": "lower"}})
    [r] = evaluate_family(fam, _loader(_summaries({"inv": inv, "fixed": fixed, "norm": norm})))
    slopes = [np.polyfit([-0.5, 0, 0.5], [a, b, c], 1)[0] for a, b, c in zip(inv, fixed, norm, strict=True)]
    ref = stats.ttest_1samp(slopes, 0.0)
    assert r.result.n == 8
    assert r.result.diff == pytest.approx(np.mean(slopes))
    assert r.result.p == pytest.approx(ref.pvalue)
    assert r.p_holm == pytest.approx(ref.pvalue)  # a family of one
    assert r.verdict == (SUPPORTED if ref.pvalue < 0.05 else INCONCLUSIVE)


def test_holm_over_the_family_and_verdicts_by_prediction():
    rng = np.random.default_rng(1)
    base = rng.normal(size=8)
    values = {"base": base, "up": base + 1.0 + 0.3 * rng.normal(size=8),
              "down": base - 1.0 + 0.3 * rng.normal(size=8), "same": base + 0.3 * rng.normal(size=8)}
    spec = {
        "A": {"method": "down", "baseline": "base", "metric": "m", "predict": "lower"},
        "B": {"method": "up", "baseline": "base", "metric": "m", "predict": "lower"},
        "C": {"method": "up", "baseline": "base", "metric": "m"},
        "D": {"method": "same", "baseline": "base", "metric": "m"},
    }
    res = evaluate_family(parse_family(spec), _loader(_summaries(values)))
    raw = [stats.ttest_rel(values[s["method"]], values[s["baseline"]]).pvalue for s in spec.values()]
    assert [r.result.p for r in res] == pytest.approx(raw)
    assert [r.p_holm for r in res] == pytest.approx(multipletests(raw, method="holm")[1])
    assert [r.verdict for r in res[:3]] == [SUPPORTED, CONTRADICTED, HIGHER]
    assert res[3].verdict == INCONCLUSIVE  # no margin declared, so no equivalence test


def test_equivalence_needs_a_margin_and_is_holm_corrected_over_the_margined_contrasts():
    rng = np.random.default_rng(2)
    base = rng.normal(size=8)
    values = {"base": base, "a": base + 0.01 * rng.normal(size=8), "b": base + 0.02 * rng.normal(size=8)}
    spec = {"E1": {"method": "a", "baseline": "base", "metric": "m", "margin": 0.05},
            "E2": {"method": "b", "baseline": "base", "metric": "m", "margin": 0.05},
            "X": {"method": "a", "baseline": "base", "metric": "m"}}
    res = evaluate_family(parse_family(spec), _loader(_summaries(values)))
    tost = [tost_pvalue(r.result, 0.05) for r in res[:2]]
    assert [r.p_equiv for r in res[:2]] == pytest.approx(multipletests(tost, method="holm")[1])
    assert math.isnan(res[2].p_equiv)
    assert [r.verdict for r in res] == [EQUIVALENT, EQUIVALENT, INCONCLUSIVE]


def test_accuracy_contrast_pairs_problems_within_seeds():
    rng = np.random.default_rng(3)
    a = rng.random((6, 50)) < 0.6
    b = rng.random((6, 50)) < 0.5
    problems = {name: {s: {f"p{i}": (float(m[s, i]), math.nan) for i in range(50)} for s in range(6)}
                for name, m in (("a", a), ("b", b))}
    summ = {name: {s: {"eval/greedy_pass@1": float(m[s].mean())} for s in range(6)} for name, m in (("a", a), ("b", b))}
    fam = parse_family({"S": {"method": "a", "baseline": "b", "metric": "eval/greedy_pass@1", "margin": 0.05}})
    [r] = evaluate_family(fam, _loader(summ, problems))
    per_seed = a.mean(1) - b.mean(1)  # the seed is the unit
    assert r.result.diff == pytest.approx(per_seed.mean())
    assert r.result.p == pytest.approx(stats.ttest_1samp(per_seed, 0.0).pvalue)


def test_missing_arm_is_untested_and_does_not_count_in_holm():
    values = {"base": [0.0, 1.0, 2.0], "x": [1.0, 2.5, 3.0]}
    spec = {"A": {"method": "x", "baseline": "base", "metric": "m"},
            "B": {"method": "absent", "baseline": "base", "metric": "m"}}
    a, b = evaluate_family(parse_family(spec), _loader(_summaries(values)))
    assert a.p_holm == pytest.approx(a.result.p)
    assert b.result is None and math.isnan(b.p_holm) and b.verdict == INCONCLUSIVE



def test_arms_equal_on_every_seed_are_not_testable_rather_than_inconclusive():
    """The confirmatory study's S1 / S4: an unseen-token share of 0 in every run of both arms. Before
    the NOT TESTABLE label this read INCONCLUSIVE ("cannot tell"), though nothing varied to test; a
    contrast with a real but small spread stays INCONCLUSIVE."""
    values = {"base": [0.0] * 8, "same": [0.0] * 8, "noisy": [0.0, 0.001, 0.0, 0.0, 0.002, 0.0, 0.0, 0.0]}
    spec = {"S1": {"method": "same", "baseline": "base", "metric": "m", "predict": "lower"},
            "S2": {"method": "noisy", "baseline": "base", "metric": "m", "predict": "lower"}}
    s1, s2 = evaluate_family(parse_family(spec), _loader(_summaries(values)))
    assert (s1.result.diff, s1.result.sd) == (0.0, 0.0)
    assert s1.verdict == NOT_TESTABLE
    assert s2.verdict == INCONCLUSIVE

@pytest.mark.parametrize(("spec", "field"), [
    ({"S1": {"method": "a", "baseline": "b"}}, "grid.secondary.S1.metric"),
    ({"S1": {"method": "a", "baseline": "b", "metric": "m", "predict": "up"}}, "grid.secondary.S1.predict"),
    ({"S1": {"method": "a", "baseline": "b", "metric": "m", "margin": -1}}, "grid.secondary.S1.margin"),
    ({"S1": {"method": "a", "metric": "m"}}, "grid.secondary.S1.baseline"),
    ({"S1": {"slope": {"a": 0.0}, "metric": "m"}}, "grid.secondary.S1.slope"),
    ({"S1": {"slope": {"a": 0.0, "b": 0.0}, "metric": "m"}}, "grid.secondary.S1.slope"),
    ({"S1": {"method": "a", "baseline": "b", "metric": "m", "alpha": 0.1}}, "grid.secondary.S1: unknown"),
    ([1, 2], "grid.secondary must map"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_family(spec)


def test_grid_loader_rejects_unknown_methods_in_the_family(tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"preset": "tiny-arith", "methods": ["ppo", "dppo-tv"], "seeds": [0],
                             "secondary": {"S1": {"method": "bandpo", "baseline": "dppo-tv", "metric": "m"}}}))
    with pytest.raises(ConfigError, match=r"grid\.secondary\.S1 names methods not in grid\.methods: \['bandpo'\]"):
        load_grid(file=str(f))


def test_report_shows_the_family_and_reads_a_second_grid(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    meta = json.loads((grid / "grid.json").read_text())
    meta["secondary"] = {
        "S1": {"method": "av-freq", "baseline": BASE, "metric": "eval/greedy_pass@1", "predict": "higher"},
        "S9": {"grid": "sync", "method": "av-freq", "baseline": BASE, "metric": "eval/greedy_pass@1", "margin": 0.05},
    }
    (grid / "grid.json").write_text(json.dumps(meta))
    sync = grid / "sync"
    for s in SEEDS:  # the second grid: two identical-quality arms
        _write_run(sync / "runs" / BASE / f"seed_{s}", BASE, s, GOOD)
        _write_run(sync / "runs" / "av-freq" / f"seed_{s}", "av-freq", s, GOOD)
    text = build_report(grid).read_text()
    assert "## Declared secondary family" in text
    assert "## Exploratory comparisons" in text and "## Secondary comparisons" not in text
    row = next(line for line in text.splitlines() if line.startswith("| S1 "))
    assert row.rstrip(" |").endswith(SUPPORTED)  # GOOD vs POOR accuracy: 0.75 vs 0.45
    row9 = next(line for line in text.splitlines() if line.startswith("| S9 "))
    assert "(grid `sync`)" in row9 and "| 8 |" in row9


def test_family_table_gives_each_contrast_its_mde_at_the_holm_level(tmp_path):
    """MDE column: (t_{1 - alpha/(2k), n-1} + t_{0.8, n-1}) sd / sqrt(n), k = the family's size,
    written here from scipy's t quantiles rather than through `inference.mde`."""
    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    meta = json.loads((grid / "grid.json").read_text())
    meta["secondary"] = {
        "S1": {"method": "av-freq", "baseline": BASE, "metric": "eval/greedy_pass@1"},
        "S2": {"method": "av-freq", "baseline": BASE, "metric": "stability/drawdown_smoothed"},
    }
    (grid / "grid.json").write_text(json.dumps(meta))
    text = build_report(grid).read_text()
    family = analyse(grid, BASE, 0.05).family
    for c in family:
        r = c.result
        expected = (stats.t.ppf(1 - 0.05 / (2 * 2), r.n - 1) + stats.t.ppf(0.8, r.n - 1)) * r.sd / math.sqrt(r.n)
        row = next(line for line in text.splitlines() if line.startswith(f"| {c.contrast.key} "))
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert float(cells[-2]) == pytest.approx(expected, rel=1e-3)
