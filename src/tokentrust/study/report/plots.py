"""Report plots (object-oriented matplotlib, no pyplot: never touches the global backend)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tokentrust.study.metrics import curve


def _aligned(
    records: dict[Any, list[dict[str, Any]]], key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and a [seeds, steps] matrix (NaN where a seed did not log the step)."""
    curves = [curve(r, key) for r in records.values()]
    curves = [c for c in curves if c[0].size]
    if not curves:
        return None
    steps = np.unique(np.concatenate([c[0] for c in curves]))
    mat = np.full((len(curves), steps.size), np.nan)
    for i, (s, v) in enumerate(curves):
        mat[i, np.searchsorted(steps, s)] = v
    return steps, mat


def panel_groups(
    methods: Sequence[str], families: dict[str, str], baseline: str | None, max_per_panel: int = 6
) -> dict[str, list[str]]:
    """Small multiples: {panel title: methods}, one panel per family (grid.json's `family`, in order
    of first appearance), split into panels of at most `max_per_panel` methods. The baseline is
    drawn in every panel as the reference, so it does not get a panel of its own unless alone."""
    fams: dict[str, list[str]] = {}
    for m in methods:
        if m != baseline:
            fams.setdefault(families.get(m) or "methods", []).append(m)
    if not fams and baseline is not None:
        fams = {families.get(baseline) or "methods": []}
    out = {}
    for fam, ms in fams.items():
        chunks = [ms[i : i + max_per_panel] for i in range(0, len(ms), max_per_panel)] or [[]]
        for j, chunk in enumerate(chunks):
            title = fam if len(chunks) == 1 else f"{fam} ({j + 1}/{len(chunks)})"
            out[title] = ([baseline] if baseline in methods else []) + chunk
    return out


def _grid_axes(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_curves(
    records: dict[str, dict[Any, list[dict[str, Any]]]],
    keys: Sequence[str],
    ylabel: str,
    path: Path,
    groups: dict[str, list[str]] | None = None,
) -> Path | None:
    """One panel per key and group of methods (`panel_groups`; default: all methods in one);
    per method the mean over seeds with a min-max band. The first method of a group that is shared
    by all groups (the baseline) is drawn in grey."""
    data = {k: {m: _aligned(r, k) for m, r in records.items()} for k in keys}
    keys = [k for k in keys if any(v is not None for v in data[k].values())]
    if not keys:
        return None
    groups = groups or {"": list(records)}
    shared = set.intersection(*(set(g) for g in groups.values())) if len(groups) > 1 else set()
    panels = [(k, title, ms) for k in keys for title, ms in groups.items()]
    fig, axes = _grid_axes(len(panels))
    for ax, (k, title, ms) in zip(axes, panels, strict=True):
        for m in ms:
            al = data[k].get(m)
            if al is None:
                continue
            steps, mat = al
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(mat, 0)
                lo, hi = np.nanmin(mat, 0), np.nanmax(mat, 0)
            style = {"color": "0.45", "linestyle": "--"} if m in shared else {}
            (line,) = ax.plot(steps, mean, label=f"{m} (n={mat.shape[0]})", **style)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(" · ".join(t for t in (title, k) if t), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_bars(
    groups: Sequence[str],
    series: dict[str, list[tuple[float, float, float]]],
    ylabel: str,
    title: str,
    path: Path,
    panels: dict[str, list[str]] | None = None,
) -> Path | None:
    """Grouped bars: x = groups, one bar per series; values are (center, lo, hi). With `panels`
    ({title: series names}, e.g. `panel_groups`), one panel each (small multiples)."""
    if not groups or not series:
        return None
    panels = panels or {title: list(series)}
    shared = set.intersection(*(set(g) for g in panels.values())) if len(panels) > 1 else set()
    fig, axes = _grid_axes(len(panels), width=max(5.0, 0.9 * len(groups) + 2.5))
    for ax, (ptitle, names) in zip(axes, panels.items(), strict=True):
        names = [n for n in names if n in series]
        width = 0.8 / max(1, len(names))
        x = np.arange(len(groups))
        for j, name in enumerate(names):
            vals = series[name]
            c = np.array([v[0] for v in vals], dtype=np.float64)
            lo = np.array([v[1] for v in vals], dtype=np.float64)
            hi = np.array([v[2] for v in vals], dtype=np.float64)
            err = np.nan_to_num(np.vstack([c - lo, hi - c]), nan=0.0).clip(min=0)
            ax.bar(x + (j - (len(names) - 1) / 2) * width, np.nan_to_num(c), width, yerr=err, capsize=3,
                   label=name, **({"color": "0.6"} if name in shared else {}))
        ax.set_xticks(x, list(groups))
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle if len(panels) > 1 else title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_forest(
    panels: dict[str, list[tuple[str, float, float, float, bool]]],
    title: str,
    path: Path,
    margins: dict[str, float] | None = None,
) -> Path | None:
    """One panel per metric; rows are methods, each a point (method - baseline) with its interval.

    `panels`: {metric: [(method, diff, lo, hi, primary)]}; primary comparisons are drawn filled.
    `margins`: {metric: m} draws the declared margin at +/- m (dotted)."""
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    rows = max(len(v) for v in panels.values())
    fig = Figure(figsize=(4.2 * len(panels), 1.2 + 0.45 * rows))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, items) in zip(axes, panels.items(), strict=True):
        y = np.arange(len(items))[::-1]
        for yi, (_, diff, lo, hi, primary) in zip(y, items, strict=True):
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [yi, yi], color="C0", linewidth=2)
            ax.plot([diff], [yi], "o", color="C3" if primary else "C0",
                    markerfacecolor="C3" if primary else "white")
        ax.axvline(0.0, color="0.4", linewidth=1, linestyle="--")
        m = (margins or {}).get(metric)
        if m is not None and np.isfinite(m):
            for x in (-m, m):
                ax.axvline(x, color="C2", linewidth=1, linestyle=":")
        ax.set_yticks(y, [name for name, *_ in items])
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_dose(
    panels: dict[str, dict[str, list[tuple[float, float, float, float]]]],
    xlabel: str,
    path: Path,
) -> Path | None:
    """One panel per metric; per series the mean with its interval at each dose.

    `panels`: {metric: {series: [(dose, mean, lo, hi)]}}."""
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (metric, series) in zip(axes, panels.items()):
        for label, pts in series.items():
            x = np.array([p[0] for p in pts])
            c, lo, hi = (np.array([p[i] for p in pts], dtype=np.float64) for i in (1, 2, 3))
            err = np.nan_to_num(np.vstack([c - lo, hi - c]), nan=0.0).clip(min=0)
            ax.errorbar(x, c, yerr=err, marker="o", capsize=3, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
