"""Headline verdicts on hand-made summaries: guards, margins and equivalence against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from tokentrust.study.verdicts import (
    CONTRADICTED,
    DEFAULT_MARGINS,
    EQUIVALENT,
    HYPOTHESES,
    INCONCLUSIVE,
    SUPPORTED,
    Plan,
    evaluate_hypotheses,
    resolve_plan,
)

AV, BASE = "av", "base"
PLAN = Plan({h.key: (AV, BASE) for h in HYPOTHESES}, True, "declared")
H3 = next(h for h in HYPOTHESES if h.key == "H3")


def _summaries(rare_gain, acc_diffs):
    """H3's primary metric rises in every seed by about `rare_gain`; greedy accuracy moves by `acc_diffs`."""
    rare, acc = H3.primary[0], H3.guard[0]
    base = {s: {rare: 0.04 + 0.001 * s, acc: 0.5 + 0.01 * s} for s in range(len(acc_diffs))}
    av = {s: {rare: base[s][rare] + rare_gain + 0.001 * (-1) ** s, acc: base[s][acc] + d}
          for s, d in enumerate(acc_diffs)}
    return {AV: av, BASE: base}


def _h3(summaries):
    return next(v for v in evaluate_hypotheses(summaries, None, PLAN) if v.hypothesis.key == "H3")


def test_rare_gain_with_an_unshown_accuracy_guard_is_not_supported():
    """Mean accuracy drop 7.5 points, not significant (p ~ 0.3): the old guard only blocked a
    significant drop and let SUPPORTED through. Non-inferiority within the 0.05 margin is not shown."""
    v = _h3(_summaries(0.02, [-0.2, 0.05, -0.15, 0.0]))
    assert v.result.p < 0.01 and v.result.diff > 0  # the rare-token gain itself is clear
    assert v.guard.diff == pytest.approx(-0.075) and v.guard.p > 0.05
    assert v.label != SUPPORTED
    assert any("non-inferiority" in n for n in v.notes)


def test_rare_gain_with_accuracy_shown_non_inferior_is_supported():
    d = np.array([0.01, -0.01, 0.0, 0.005])
    v = _h3(_summaries(0.02, d))
    lower = d.mean() - 3.182 * d.std(ddof=1) / 2  # two-sided 95% t-interval, t_{0.975, 3} from a table
    assert lower > -0.05
    assert v.label == SUPPORTED


def test_rare_gain_with_accuracy_worse_beyond_the_margin_is_contradicted():
    v = _h3(_summaries(0.02, [-0.2, -0.21, -0.19, -0.2]))
    assert v.label == CONTRADICTED


def _scalar(metric, diffs, base_level=1.0):
    base = {s: {metric: base_level + 0.1 * s} for s in range(len(diffs))}
    return {AV: {s: {metric: base[s][metric] + d} for s, d in enumerate(diffs)}, BASE: base}


def _verdict(key, summaries, margins=None):
    plan = Plan(PLAN.comparisons, True, "declared", {**DEFAULT_MARGINS, **(margins or {})})
    return next(v for v in evaluate_hypotheses(summaries, None, plan) if v.hypothesis.key == key)


def test_no_difference_within_the_margin_is_equivalent_and_wider_is_not():
    h2 = next(h for h in HYPOTHESES if h.key == "H2")
    d = np.array([0.01, -0.012, 0.004, 0.0, -0.006, 0.008, 0.003, -0.002])
    half = 1.895 * d.std(ddof=1) / np.sqrt(8)  # t_{0.95, 7} from a table: the 90% interval
    assert abs(d.mean()) + half < 0.05  # inside +/- 0.05
    v = _verdict("H2", _scalar(h2.primary[0], d))
    assert v.label == EQUIVALENT and v.p_equiv < 0.05 and v.margin == 0.05
    # the same data against a margin the 90% interval crosses: no detectable difference, no equivalence
    v = _verdict("H2", _scalar(h2.primary[0], d), {"H2": abs(d.mean()) + half / 2})
    assert v.label == INCONCLUSIVE


def test_h4_is_non_inferiority_with_the_declared_margin():
    nll = next(h for h in HYPOTHESES if h.key == "H4").primary[0]
    worse_within = [0.02, 0.03, 0.025, 0.035, 0.02, 0.03]  # NLL up ~0.027 nats, margin 0.1
    assert _verdict("H4", _scalar(nll, worse_within)).label == SUPPORTED
    assert _verdict("H4", _scalar(nll, worse_within), {"H4": 0.02}).label == CONTRADICTED
    assert _verdict("H4", _scalar(nll, [0.3, -0.2, 0.1, -0.15])).label == INCONCLUSIVE


def test_margins_are_declared_in_the_grid_and_checked():
    grid = {"primary": {"method": AV, "baseline": BASE, "margins": {"H2": 0.03}}}
    plan = resolve_plan(grid, [AV, BASE], BASE)
    assert plan.margins == {**DEFAULT_MARGINS, "H2": 0.03} and plan.margins_declared == ("H2",)
    old = resolve_plan({"primary": {"method": AV, "baseline": BASE}}, [AV, BASE], BASE)  # committed grid.json
    assert old.margins == DEFAULT_MARGINS
    for bad, field in (({"H9": 0.1}, "unknown key 'H9'"), ({"H2": -0.1}, r"margins\.H2"), ({"H2": "x"}, r"margins\.H2")):
        with pytest.raises(ValueError, match=field):
            resolve_plan({"primary": {"method": AV, "margins": bad}}, [AV, BASE], BASE)


def test_guard_held_back_gain_is_not_called_undetected(tmp_path):
    """An H3 gain that its accuracy guard holds back is INCONCLUSIVE, but the sentence must not say
    'no detectable improvement' (the gain was detected)."""
    from tokentrust.study.report.build import _verdict_sentence

    v = _h3(_summaries(0.02, [-0.2, 0.05, -0.15, 0.0]))
    text = _verdict_sentence(v)
    assert "no detectable improvement" not in text and "non-inferiority within 0.05 not shown" in text
