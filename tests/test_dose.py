"""Dose-response trends: the seed is the unit (per-seed slopes decide), against scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tokentrust.study.report.sections import trend

DOSES = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def test_trend_is_decided_by_per_seed_slopes():
    """Slopes that differ between seeds: OLS with seed fixed effects pools the 24 runs as
    independent and calls the trend significant; the one-sample t on the 4 per-seed slopes does not."""
    rng = np.random.default_rng(5)
    seed_slopes = (0.9, -0.3, 0.8, -0.1)
    pts = [(x, s, b * x + 0.5 * s + rng.normal(0, 0.02)) for s, b in enumerate(seed_slopes) for x in DOSES]
    slope, lo, hi, p = trend(pts)
    per_seed = [stats.linregress([x for x, t, _ in pts if t == s], [y for _, t, y in pts if t == s]).slope
                for s in range(4)]
    ref = stats.ttest_1samp(per_seed, 0.0)
    ci = ref.confidence_interval(0.95)
    assert slope == pytest.approx(np.mean(per_seed), rel=1e-9)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=1e-9) and p > 0.2


def test_trend_needs_two_seeds_with_two_doses():
    assert all(math.isnan(v) for v in trend([(0, 0, 1.0), (1, 0, 2.0)]))  # one seed: no spread of slopes
    assert all(math.isnan(v) for v in trend([(0, 0, 1.0), (0, 1, 2.0)]))  # one dose: no slope
    # a seed run at one dose only carries no slope and is left out
    pts = [(x, s, (1 + s) * x) for s in range(3) for x in (0.0, 1.0)] + [(0.5, 9, 4.0)]
    slope, *_ = trend(pts)
    assert slope == pytest.approx(2.0)


def test_dose_section_reports_the_per_seed_trend(tmp_path):
    from types import SimpleNamespace

    from tokentrust.study.report.sections import section_dose

    doses = {"dppo-tv-delta0.05": 0.05, "dppo-tv-delta0.1": 0.1, "dppo-tv": 0.15, "dppo-tv-delta0.3": 0.3}
    methods = {m: {"loss": "dppo-tv", "delta": x} for m, x in doses.items()}
    slopes = (-1.0, 0.2, -0.6)
    summaries = {m: {s: {"eval/greedy_pass@1": 0.5 + b * x} for s, b in enumerate(slopes)} for m, x in doses.items()}
    d = SimpleNamespace(grid={"methods": methods}, summaries=summaries, metric_keys=["eval/greedy_pass@1"],
                        path=tmp_path)
    text = "\n".join(section_dose(d))
    ref = stats.ttest_1samp(slopes, 0.0)  # exact lines: each seed's slope is its b
    ci = ref.confidence_interval(0.95)
    row = next(line for line in text.splitlines() if line.startswith("| eval/greedy_pass@1"))
    assert f"| {np.mean(slopes):.4f} [{ci.low:.4f}, {ci.high:.4f}] | {ref.pvalue:.3f} |" in row
    assert "per-seed slope [95%]" in text and "pooled FE slope (descr.)" in text
