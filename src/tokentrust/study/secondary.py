"""A declared secondary family: a few named contrasts, decided together under one Holm correction.

A grid declares it next to its primary comparison (`grid.secondary`, copied into grid.json):

    secondary:
      S1: {method: ppo, baseline: dppo-tv, metric: coherence/unseen_token_share, predict: lower}
      S2: {slope: {av-freq-inverse: -0.5, dppo-tv: 0.0, av-freq-norm: 0.5},
           metric: eval/acc_rare_answer, predict: lower}
      S3: {method: av-hybrid, baseline: av-freq-norm, metric: eval/greedy_pass@1, margin: 0.05}
      S9: {grid: sync, method: av-freq-norm, baseline: dppo-tv, metric: eval/greedy_pass@1, margin: 0.05}

- A pairwise contrast (method - baseline) is tested as the primary ones are (`verdicts.compare`):
  accuracy metrics on per-problem outcomes paired by seed and problem with the seed as the unit,
  every other metric by a paired t-test over the seeds both arms ran.
- A slope contrast fits, per seed, the OLS slope of the metric on the declared doses over the
  methods (every seed that ran all of them) and tests the mean of those slopes against 0 with a
  one-sample t-test: the seed is the unit, so dose cells of one seed are not counted as independent.
- `grid` (optional): the contrast's runs live in another grid directory, relative to this one
  (e.g. the synchronous regime's grid under GRID_DIR/sync).
- The two-sided p-values of all contrasts are Holm-adjusted together. A significant contrast is
  SUPPORTED / CONTRADICTED against its `predict` (higher / lower), or HIGHER / LOWER without one.
  Contrasts with a `margin` also get the TOST for equivalence within +/- margin, Holm-adjusted
  across those contrasts; a non-significant one whose TOST is significant is EQUIVALENT. A contrast
  whose arms have the same value on every seed (e.g. a share that is 0 in every run of both) is NOT
  TESTABLE: there is no variation to test, which is a fact about the regime, not "cannot tell".
  Everything else is INCONCLUSIVE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokentrust.study.inference import PairedResult, adjust, paired_test, tost_pvalue
from tokentrust.study.verdicts import CONTRADICTED, EQUIVALENT, INCONCLUSIVE, SUPPORTED, Problems, Summaries, compare

HIGHER, LOWER, NOT_TESTABLE = "HIGHER", "LOWER", "NOT TESTABLE"
_PREDICT = {"higher": +1, "lower": -1, None: 0}
_KEYS = {"method", "baseline", "slope", "metric", "predict", "margin", "grid", "note"}


@dataclass(frozen=True)
class Contrast:
    """One declared test: method - baseline (or the dose slope over `doses`) on `metric`."""

    key: str
    metric: str
    method: str = ""
    baseline: str = ""
    doses: tuple[tuple[str, float], ...] = ()
    predict: int = 0  # +1 higher, -1 lower (a negative slope), 0 no prediction
    margin: float | None = None
    grid: str | None = None
    note: str = ""

    @property
    def label(self) -> str:
        if self.doses:
            return "slope over " + ", ".join(f"`{m}` ({d:g})" for m, d in self.doses)
        return f"`{self.method}` − `{self.baseline}`"


@dataclass
class ContrastResult:
    contrast: Contrast
    result: PairedResult | None
    p_holm: float = math.nan
    p_equiv: float = math.nan  # TOST p, Holm-adjusted across the contrasts with a margin
    verdict: str = INCONCLUSIVE


def _field(key: str, name: str) -> str:
    return f"grid.secondary.{key}.{name}"


def _contrast(key: str, spec: Any) -> Contrast:
    if not isinstance(spec, Mapping):
        raise ValueError(f"grid.secondary.{key} must be an object, got {spec!r}")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"grid.secondary.{key}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(_KEYS))}")
    metric = spec.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"{_field(key, 'metric')} must name a summary metric, got {metric!r}")
    predict = spec.get("predict")
    if predict not in _PREDICT:
        raise ValueError(f"{_field(key, 'predict')} must be 'higher', 'lower' or absent, got {predict!r}")
    margin = spec.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0):
        raise ValueError(f"{_field(key, 'margin')} must be a positive number, got {margin!r}")
    common = dict(key=str(key), metric=metric, predict=_PREDICT[predict],
                  margin=None if margin is None else float(margin), grid=spec.get("grid"),
                  note=str(spec.get("note", "")))
    if "slope" in spec:
        doses = spec["slope"]
        if "method" in spec or "baseline" in spec or not isinstance(doses, Mapping) or len(doses) < 2:
            raise ValueError(f"{_field(key, 'slope')} must map >= 2 methods to doses, without method/baseline")
        if not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in doses.values()) \
                or len(set(doses.values())) < 2:
            raise ValueError(f"{_field(key, 'slope')}: doses must be numbers, at least two distinct, got {doses!r}")
        return Contrast(doses=tuple((str(m), float(d)) for m, d in doses.items()), **common)
    for name in ("method", "baseline"):
        if not isinstance(spec.get(name), str):
            raise ValueError(f"{_field(key, name)} must name a method, got {spec.get(name)!r}")
    return Contrast(method=spec["method"], baseline=spec["baseline"], **common)


def parse_family(spec: Any) -> list[Contrast]:
    """The contrasts of grid.secondary ({key: contrast}); [] when absent. ValueError names the field."""
    if spec is None:
        return []
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"grid.secondary must map contrast names to contrasts, got {spec!r}")
    return [_contrast(k, v) for k, v in spec.items()]


def seed_slopes(summaries: Summaries, doses: tuple[tuple[str, float], ...], metric: str) -> dict[Any, float]:
    """{seed: OLS slope of `metric` on the dose} for every seed where each dose's method has the metric."""
    per_method = [summaries.get(m, {}) for m, _ in doses]
    x = np.array([d for _, d in doses])
    out = {}
    for seed in per_method[0]:
        ys = [runs.get(seed, {}).get(metric, math.nan) for runs in per_method]
        if all(isinstance(y, (int, float)) and math.isfinite(y) for y in ys):
            out[seed] = float(np.polyfit(x, np.array(ys, dtype=np.float64), 1)[0])
    return out


def _test(c: Contrast, summaries: Summaries, problems: Problems | None, alpha: float) -> PairedResult | None:
    if c.doses:
        slopes = list(seed_slopes(summaries, c.doses, c.metric).values())
        return paired_test(slopes, [0.0] * len(slopes), alpha) if slopes else None
    return compare(summaries, problems, c.method, c.baseline, c.metric, alpha)


def contrast_verdict(c: Contrast, r: PairedResult | None, p_holm: float, p_equiv: float, alpha: float) -> str:
    if r is not None and r.n >= 2 and r.diff == 0 and r.sd == 0:
        return NOT_TESTABLE  # every per-seed difference is exactly 0
    if r is not None and math.isfinite(p_holm) and p_holm < alpha and r.diff != 0:
        sign = 1 if r.diff > 0 else -1
        if c.predict:
            return SUPPORTED if sign == c.predict else CONTRADICTED
        return HIGHER if sign > 0 else LOWER
    if math.isfinite(p_equiv) and p_equiv < alpha:
        return EQUIVALENT
    return INCONCLUSIVE


GridLoader = Callable[[str | None], tuple[Summaries, Problems | None]]


def evaluate_family(contrasts: list[Contrast], load: GridLoader, alpha: float = 0.05) -> list[ContrastResult]:
    """Test every contrast on the runs `load(contrast.grid)` returns, Holm across the family."""
    out = [ContrastResult(c, _test(c, *load(c.grid), alpha)) for c in contrasts]
    p = adjust([r.result.p if r.result is not None else math.nan for r in out], "holm")
    with_margin = [r for r in out if r.contrast.margin is not None]
    q = adjust([tost_pvalue(r.result, r.contrast.margin) if r.result is not None else math.nan
                for r in with_margin], "holm")
    for r, pe in zip(with_margin, q, strict=True):
        r.p_equiv = float(pe)
    for r, ph in zip(out, p, strict=True):
        r.p_holm = float(ph)
        r.verdict = contrast_verdict(r.contrast, r.result, r.p_holm, r.p_equiv, alpha)
    return out
