"""The Plots section of a grid report.

With many methods one axis becomes unreadable (24 curves under a legend that covers them), so
curves and bars are small multiples: one panel per method family of grid.json, at most 6 methods a
panel, the baseline drawn in every panel as the reference (`plots.panel_groups`). Means are
over the matched seeds (`tables.matched_view`). The forest plot shows each method's paired
difference from the baseline on the hypotheses' primary metrics, one row per method.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust.study.report import plots as plots
from tokentrust.study.inference import mean_interval
from tokentrust.study.report.sections import bucket_ids
from tokentrust.study.report.tables import _level, _short, per_seed
from tokentrust.study.verdicts import HYPOTHESES

Panel = list[tuple[str, float, float, float, bool]]


def forest_panels(d: Any) -> dict[str, Panel]:
    """{hypothesis: [(method, diff, lo, hi, primary)]} from the primary and secondary tests."""
    primary = {(v.method, v.hypothesis.primary[0]): v.result for v in d.verdicts if v.result is not None}
    panels: dict[str, Panel] = {}
    for h in HYPOTHESES:
        k = h.primary[0]
        items = [(f"{m} (primary)", r.diff, r.lo, r.hi, True) for (m, metric), r in primary.items() if metric == k]
        items += [(s.method, s.result.diff, s.result.lo, s.result.hi, False) for s in d.secondary if s.metric == k]
        panels[f"{h.key}: {_short(k)}"] = items
    return panels


def _forest_margins(d: Any) -> dict[str, float]:
    """{forest panel: declared margin of its hypothesis}."""
    return {f"{h.key}: {_short(h.primary[0])}": d.plan.margins[h.key] for h in HYPOTHESES if h.key in d.plan.margins}


def _mean_range(v: list[float]) -> tuple[float, float, float]:
    return (float(np.mean(v)), float(np.min(v)), float(np.max(v))) if v else (math.nan,) * 3


def _groups(d: Any) -> dict[str, list[str]]:
    meta = d.grid.get("methods", {})
    families = {m: str(meta.get(m, {}).get("family", "")) for m in d.methods}
    return plots.panel_groups(d.methods, families, d.baseline)


def _bar_plots(d: Any, tv: Any, pdir: Path, groups: dict[str, list[str]]) -> list[tuple[str, Path | None]]:
    out: list[tuple[str, Path | None]] = []
    kept = bucket_ids(d.metric_keys, r"trust_region/kept_frac/bucket_(\d+)")
    if kept:
        series = {m: [_mean_range(per_seed(tv, m, f"trust_region/kept_frac/bucket_{i}")) for i in kept]
                  for m in d.methods}
        out.append(("Kept fraction per frequency bucket (bars: mean over seeds, whiskers: min..max)",
                    plots.plot_bars([f"b{i}" for i in kept], series, "kept fraction",
                                    "trust_region/kept_frac per bucket", pdir / "kept_frac_buckets.png", groups)))
    acc = [k for k in ("eval/greedy_pass@1", "eval/mean@k", "eval/pass@k") if k in d.metric_keys]
    if acc:
        series = {m: [mean_interval(per_seed(tv, m, k), d.alpha) for k in acc] for m in d.methods}
        out.append((f"Eval accuracy (mean over seeds, {_level(d.alpha)} t-interval)",
                    plots.plot_bars([_short(k) for k in acc], series, "accuracy", "eval accuracy",
                                    pdir / "accuracy.png", groups)))
    return out


def section_plots(d: Any, tv: Any) -> list[str]:
    """Forest plot of the tests, then per-family small multiples of curves and bars (matched seeds)."""
    pdir = d.path / "plots"
    pdir.mkdir(exist_ok=True)
    groups = _groups(d)
    where = f"one panel per method family, `{d.baseline}` dashed grey in each; mean over matched seeds"
    out: list[tuple[str, Path | None]] = [
        (f"Primary metrics: method − `{d.baseline}` (primary comparison filled) with {_level(d.alpha)} intervals",
         plots.plot_forest(forest_panels(d), "difference vs baseline (dotted: declared margins)",
                           pdir / "forest.png", _forest_margins(d))),
        (f"Reward per step ({where}, band = min..max)",
         plots.plot_curves(tv.records, ["reward/mean"], "mean reward", pdir / "reward.png", groups)),
        (f"Policy entropy per step ({where})",
         plots.plot_curves(tv.records, ["actor/entropy"], "entropy (nats)", pdir / "entropy.png", groups)),
    ]
    rare_keys = sorted({k for rs in tv.records.values() for r in rs.values() for rec in r for k in rec
                        if re.fullmatch(r"rare/share/bucket_\d+", k)}, key=lambda k: int(k.rsplit("_", 1)[1]))
    out.append((f"Share of generated tokens in the rarest frequency buckets ({where})",
                plots.plot_curves(tv.records, rare_keys[-2:], "share of tokens", pdir / "rare_share.png", groups)))
    out += _bar_plots(d, tv, pdir, groups)
    return ["## Plots"] + [f"{c}\n\n![{c}](plots/{p.name})" for c, p in out if p is not None]
