"""Grid report: per-method bootstrap CIs over seeds, paired differences against a baseline,
hypothesis verdicts computed from the data, and plots.

Input layout (written by the grid runner):

    GRID_DIR/grid.json                {"methods": {name: {"loss", params..., "description",
                                       "family"}}, "seeds": [...], "command": "...", "config": {}}
    GRID_DIR/runs/<method>/seed_<s>/  one run directory each (see docs/architecture.md)

Output: GRID_DIR/report.md, GRID_DIR/summary.csv, GRID_DIR/plots/*.png.

Verdict rule. For each AV-DPPO method (grid.json `"family": "av-dppo"`) and each metric of a
hypothesis we take the paired difference (method - baseline) over seeds and its percentile
bootstrap CI. A metric is favourable if the CI excludes 0 in the hypothesis's direction and
unfavourable if it excludes 0 in the other. A method SUPPORTS a hypothesis if at least one metric
is favourable and none unfavourable, CONTRADICTS it in the mirror case, and is INCONCLUSIVE
otherwise (nothing excludes 0, mixed signs, or fewer than 2 paired seeds). H3 also has an accuracy
guard: a significant accuracy loss makes it CONTRADICTED. Across AV methods: SUPPORTED if some
method supports and none contradicts, CONTRADICTED in the mirror case, else INCONCLUSIVE.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tokentrust.metrics import bootstrap_ci, curve, load_metrics, paired_diff_ci, summarize_run

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE"
AV_FAMILY = "av-dppo"


@dataclass(frozen=True)
class Hypothesis:
    """A claim about AV-DPPO vs the baseline, judged on metrics with a favourable direction
    (+1: higher is better, -1: lower is better). `guard` metrics must not move unfavourably."""

    key: str
    name: str
    claim: str
    metrics: tuple[tuple[str, int], ...]
    guard: tuple[tuple[str, int], ...] = ()


MIN_PAIRS = 3  # paired seeds needed before a metric's CI may decide a verdict

HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis(
        "H1",
        "stability",
        "AV-DPPO trains more stably (lower step-to-step reward noise, reward drawdown, gradient-norm spikes)",
        (
            ("stability/reward_diff_std", -1),
            ("stability/max_drawdown", -1),
            ("stability/grad_spikes", -1),
        ),
    ),
    Hypothesis(
        "H2",
        "accuracy",
        "AV-DPPO reaches higher eval accuracy",
        (("eval/greedy_pass@1", +1), ("eval/mean@k", +1), ("eval/pass@k", +1)),
    ),
    Hypothesis(
        "H3",
        "rare-token utility",
        "AV-DPPO generates more rare tokens / rare token types without lower accuracy",
        (("rare/share_rare", +1), ("rare/distinct_rare_per_1k", +1)),
        guard=(("eval/greedy_pass@1", +1), ("eval/mean@k", +1)),
    ),
    Hypothesis(
        "H4",
        "coherence",
        "AV-DPPO generations are not less coherent (NLL under the initial model not higher)",
        (("coherence/nll", -1),),
    ),
)

# metrics shown in the tables: (name, favourable direction; 0 = descriptive only)
KEY_METRICS: tuple[tuple[str, int], ...] = (
    ("eval/greedy_pass@1", +1),
    ("eval/mean@k", +1),
    ("eval/pass@k", +1),
    ("train/reward_first10", 0),
    ("train/reward_last10", +1),
    ("stability/reward_std", -1),
    ("stability/reward_diff_std", -1),
    ("stability/max_drawdown", -1),
    ("stability/grad_spikes", -1),
    ("stability/grad_norm_p99", -1),
    ("stability/loss_var", -1),
    ("stability/entropy_first", 0),
    ("stability/entropy_last", 0),
    ("stability/entropy_slope", 0),
    ("stability/mean_abs_pi_mu", 0),
    ("rare/share_rare", +1),
    ("rare/distinct_rare_per_1k", +1),
    ("rare/distinct_2", +1),
    ("coherence/nll", -1),
    ("trust_region/kept_frac", 0),
)

Summaries = dict[str, dict[Any, dict[str, float]]]  # method -> seed -> flat metrics

# ----------------------------------------------------------------------------------------------
# loading


def _seed_key(name: str) -> Any:
    s = name[len("seed_") :]
    return int(s) if re.fullmatch(r"-?\d+", s) else s


def _seed_order(seed: Any) -> tuple[bool, int, str]:
    return (isinstance(seed, str), seed if isinstance(seed, int) else 0, str(seed))


def load_grid(grid_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[Any, Path]]]:
    """grid.json (empty dict if absent) and the run dirs found: {method: {seed: path}}."""
    g = Path(grid_dir)
    grid: dict[str, Any] = {}
    if (g / "grid.json").exists():
        grid = json.loads((g / "grid.json").read_text(encoding="utf-8"))
    runs: dict[str, dict[Any, Path]] = {}
    order = list(grid.get("methods", {}))
    root = g / "runs"
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for m in order + [m for m in found if m not in order]:
        mdir = root / m
        if not mdir.is_dir():
            continue
        seeds = {}
        for sd in mdir.iterdir():
            if sd.is_dir() and sd.name.startswith("seed_"):
                if (sd / "metrics.jsonl").exists() or (sd / "eval" / "results.json").exists():
                    seeds[_seed_key(sd.name)] = sd
        if seeds:
            runs[m] = dict(sorted(seeds.items(), key=lambda kv: _seed_order(kv[0])))
    return grid, runs


# ----------------------------------------------------------------------------------------------
# statistics over seeds


def _per_seed(summaries: Summaries, method: str, metric: str) -> dict[Any, float]:
    out = {}
    for seed, s in summaries.get(method, {}).items():
        v = s.get(metric)
        if v is not None and math.isfinite(v):
            out[seed] = v
    return out


def _seed_mean(summaries: Summaries, method: str, metric: str) -> float:
    v = list(_per_seed(summaries, method, metric).values())
    return float(np.mean(v)) if v else math.nan


def method_ci(
    summaries: Summaries, method: str, metric: str, n_boot: int = 10000, alpha: float = 0.05
) -> dict[str, float]:
    """Mean over seeds of one metric with its percentile bootstrap CI."""
    vals = list(_per_seed(summaries, method, metric).values())
    mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, alpha=alpha)
    return {"mean": mean, "lo": lo, "hi": hi, "n": float(len(vals))}


def paired_comparison(
    summaries: Summaries,
    method: str,
    baseline: str,
    metric: str,
    direction: int = 0,
    n_boot: int = 10000,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Paired (by seed) difference method - baseline with CI, wins, and the metric's verdict:
    'favourable' / 'unfavourable' (CI excludes 0) / 'neutral' / 'no data' (< MIN_PAIRS pairs:
    with two seeds a percentile bootstrap CI is just the range of two numbers)."""
    a, b = _per_seed(summaries, method, metric), _per_seed(summaries, baseline, metric)
    seeds = [s for s in a if s in b]
    x = np.array([a[s] for s in seeds], dtype=np.float64)
    y = np.array([b[s] for s in seeds], dtype=np.float64)
    diff, lo, hi = paired_diff_ci(x, y, n_boot=n_boot, alpha=alpha)
    wins = int(np.sum(direction * (x - y) > 0)) if direction else 0
    if len(seeds) < MIN_PAIRS:
        verdict = "no data"
    elif lo > 0 or hi < 0:
        sign = 1 if lo > 0 else -1
        verdict = (
            "neutral" if direction == 0 else ("favourable" if sign == direction else "unfavourable")
        )
    else:
        verdict = "neutral"
    return {"diff": diff, "lo": lo, "hi": hi, "n": len(seeds), "wins": wins, "verdict": verdict}


def judge(
    h: Hypothesis,
    summaries: Summaries,
    method: str,
    baseline: str,
    n_boot: int = 10000,
    alpha: float = 0.05,
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """Verdict of one method on one hypothesis (see the module docstring) and its evidence."""
    ev = [
        (m, paired_comparison(summaries, method, baseline, m, d, n_boot, alpha))
        for m, d in h.metrics
    ]
    guard = [
        (m, paired_comparison(summaries, method, baseline, m, d, n_boot, alpha)) for m, d in h.guard
    ]
    fav = sum(e["verdict"] == "favourable" for _, e in ev)
    unfav = sum(e["verdict"] == "unfavourable" for _, e in ev)
    guard_fail = any(e["verdict"] == "unfavourable" for _, e in guard)
    if guard_fail or (unfav and not fav):
        label = CONTRADICTED
    elif fav and not unfav:
        label = SUPPORTED
    else:
        label = INCONCLUSIVE
    return label, ev + [(f"{m} (guard)", e) for m, e in guard]


def evaluate_hypotheses(
    summaries: Summaries,
    av_methods: Sequence[str],
    baseline: str,
    n_boot: int = 10000,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """For each hypothesis: overall label and per-AV-method (label, evidence)."""
    out = []
    for h in HYPOTHESES:
        per = {m: judge(h, summaries, m, baseline, n_boot, alpha) for m in av_methods}
        labels = [lab for lab, _ in per.values()]
        if SUPPORTED in labels and CONTRADICTED not in labels:
            overall = SUPPORTED
        elif CONTRADICTED in labels and SUPPORTED not in labels:
            overall = CONTRADICTED
        else:
            overall = INCONCLUSIVE
        out.append({"hypothesis": h, "label": overall, "per_method": per})
    return out


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _verdict_paragraph(
    results: list[dict[str, Any]],
    av_methods: Sequence[str],
    baseline: str,
    n_seeds: int,
    alpha: float,
) -> str:
    level = f"{100 * (1 - alpha):g}%"
    if not av_methods:
        return (
            f'**Verdicts**: no method in grid.json has `"family": "{AV_FAMILY}"`, so nothing is '
            "compared with the baseline: "
            + "; ".join(
                f"**{r['hypothesis'].key} {r['hypothesis'].name}: {INCONCLUSIVE}**" for r in results
            )
            + "."
        )
    parts = []
    for r in results:
        h = r["hypothesis"]
        per = []
        for m, (label, ev) in r["per_method"].items():
            shown = [
                f"{_short(name)} {_fmt(e['diff'])} [{_fmt(e['lo'])}, {_fmt(e['hi'])}]"
                + (f" {e['verdict']}" if e["verdict"] in ("favourable", "unfavourable") else "")
                for name, e in ev
                if e["n"] > 0
            ]
            detail = "; ".join(shown) if shown else "no paired data"
            per.append(f"`{m}` {label.lower()} ({detail})")
        parts.append(f"**{h.key} {h.name}: {r['label']}** — " + ", ".join(per) + ".")
    head = (
        f"**Verdicts** (AV-DPPO methods {', '.join(f'`{m}`' for m in av_methods)} vs baseline "
        f"`{baseline}`; paired differences method − baseline over {n_seeds} seed(s), {level} "
        "percentile-bootstrap CIs; a hypothesis is SUPPORTED when a CI excludes 0 in the "
        "favourable direction and none in the unfavourable one, CONTRADICTED in the mirror case, "
        f"INCONCLUSIVE otherwise, and always INCONCLUSIVE with fewer than {MIN_PAIRS} paired seeds): "
    )
    return head + " ".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots (object-oriented matplotlib, no pyplot: never touches the global backend)


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


def _plot_curves(
    records: dict[str, dict[Any, list[dict[str, Any]]]],
    keys: Sequence[str],
    ylabel: str,
    path: Path,
) -> Path | None:
    """One panel per key; per method the mean over seeds with a min-max band."""
    data = {k: {m: _aligned(r, k) for m, r in records.items()} for k in keys}
    keys = [k for k in keys if any(v is not None for v in data[k].values())]
    if not keys:
        return None
    fig = Figure(figsize=(6.5 * len(keys), 4.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, k in zip(axes, keys, strict=True):
        for m, al in data[k].items():
            if al is None:
                continue
            steps, mat = al
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(mat, 0)
                lo, hi = np.nanmin(mat, 0), np.nanmax(mat, 0)
            (line,) = ax.plot(steps, mean, label=f"{m} (n={mat.shape[0]})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_bars(
    groups: Sequence[str],
    series: dict[str, list[tuple[float, float, float]]],
    ylabel: str,
    title: str,
    path: Path,
) -> Path | None:
    """Grouped bars: x = groups, one bar per series; values are (center, lo, hi)."""
    if not groups or not series:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) ** 0.5 + 3), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for j, (name, vals) in enumerate(series.items()):
        c = np.array([v[0] for v in vals], dtype=np.float64)
        lo = np.array([v[1] for v in vals], dtype=np.float64)
        hi = np.array([v[2] for v in vals], dtype=np.float64)
        err = np.nan_to_num(np.vstack([c - lo, hi - c]), nan=0.0).clip(min=0)
        ax.bar(
            x + (j - (len(series) - 1) / 2) * width,
            np.nan_to_num(c),
            width,
            yerr=err,
            capsize=3,
            label=name,
        )
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _bucket_ids(keys: Sequence[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.fullmatch(k))})


# ----------------------------------------------------------------------------------------------
# the report


def build_report(
    grid_dir: str | os.PathLike,
    *,
    baseline: str = "dppo-tv",
    n_boot: int = 10000,
    alpha: float = 0.05,
) -> Path:
    """Write GRID_DIR/report.md, summary.csv and plots/*.png; return the report path."""
    g = Path(grid_dir)
    grid, runs = load_grid(g)
    if baseline not in runs:
        raise ValueError(
            f"baseline {baseline!r} has no runs under {g / 'runs'}; have {sorted(runs)}"
        )
    meta = grid.get("methods", {})
    methods = list(runs)
    av_methods = [
        m for m in methods if m != baseline and meta.get(m, {}).get("family") == AV_FAMILY
    ]
    records = {m: {s: load_metrics(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    summaries: Summaries = {
        m: {s: summarize_run(p) for s, p in seeds.items()} for m, seeds in runs.items()
    }
    n_seeds = max(len(v) for v in runs.values())
    level = f"{100 * (1 - alpha):g}%"

    # --- csv
    all_keys = sorted({k for seeds in summaries.values() for s in seeds.values() for k in s})
    with open(g / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["kind", "method", "seed", *all_keys])
        for m, seeds in summaries.items():
            for s, d in seeds.items():
                w.writerow(["run", m, s, *[repr(d[k]) if k in d else "" for k in all_keys]])
        for m in methods:
            cis = {k: method_ci(summaries, m, k, n_boot, alpha) for k in all_keys}
            for kind in ("mean", "lo", "hi"):
                row = ["" if math.isnan(cis[k][kind]) else repr(cis[k][kind]) for k in all_keys]
                w.writerow([{"lo": "ci_lo", "hi": "ci_hi"}.get(kind, kind), m, "", *row])

    # --- verdicts
    results = evaluate_hypotheses(summaries, av_methods, baseline, n_boot, alpha)
    title = f"# Grid report: {g.resolve().name}"
    verdict = _verdict_paragraph(results, av_methods, baseline, n_seeds, alpha)
    n_runs = sum(len(v) for v in runs.values())
    not_done = [
        f"{m}/seed_{s}"
        for m, seeds in summaries.items()
        for s, d in seeds.items()
        if d.get("train/done", 0.0) < 1.0
    ]
    caveat = (
        f"Sample size: {n_runs} run(s), {n_seeds} seed(s) per method at most. Percentile bootstrap "
        "CIs over so few seeds are narrow and undercover (with 2 seeds the CI of a paired mean is "
        f"just the range of the two differences, hence no verdict below {MIN_PAIRS} seeds), so these "
        "verdicts are exploratory; the 'wins' "
        "column shows in how many seeds the method beat the baseline. `stability/reward_std` "
        "includes the learning trend (a method that improves faster has a larger value); "
        "`stability/reward_diff_std` removes it."
        + (f" Runs without a DONE marker (incomplete): {', '.join(not_done)}." if not_done else "")
    )

    sections = [title, verdict, caveat]

    # --- setup
    sections.append("## Setup")
    sections.append(f"Baseline: `{baseline}`. Grid directory: `{g}`.")
    sections.append("Command:\n\n```\n" + str(grid.get("command", "(not recorded)")) + "\n```")
    rows = []
    for m in methods:
        info = dict(meta.get(m, {}))
        desc = str(info.pop("description", ""))
        fam = str(info.pop("family", ""))
        loss = str(info.pop("loss", ""))
        params = ", ".join(f"{k}={v}" for k, v in info.items())
        rows.append([f"`{m}`", fam, loss, params, desc, str(len(runs[m]))])
    sections.append(_table(["method", "family", "loss", "params", "description", "runs"], rows))
    sections.append(f"Seeds in grid.json: {grid.get('seeds', 'n/a')}.")
    sections.append(
        "Config:\n\n```json\n"
        + json.dumps(grid.get("config", {}), indent=2, sort_keys=True)
        + "\n```"
    )

    # --- runs
    rows = []
    for m, seeds in summaries.items():
        for s, d in seeds.items():
            rows.append(
                [
                    f"`{m}`",
                    str(s),
                    _fmt(d.get("train/steps")),
                    "yes" if d.get("train/done") else "no",
                    _fmt(d.get("train/reward_last10")),
                    _fmt(d.get("eval/greedy_pass@1")),
                ]
            )
    sections.append("## Runs")
    sections.append(
        _table(["method", "seed", "steps", "done", "reward (last 10)", "greedy pass@1"], rows)
    )

    # --- per-method CIs
    shown = [(k, d) for k, d in KEY_METRICS if k in all_keys]
    arrow = {1: "↑", -1: "↓", 0: ""}
    rows = []
    for k, d in shown:
        cells = []
        for m in methods:
            c = method_ci(summaries, m, k, n_boot, alpha)
            cells.append(
                f"{_fmt(c['mean'])} [{_fmt(c['lo'])}, {_fmt(c['hi'])}]" if c["n"] else "n/a"
            )
        rows.append([f"{k} {arrow[d]}", *cells])
    sections.append(f"## Key metrics: mean over seeds [{level} bootstrap CI]")
    sections.append("↑ / ↓: the favourable direction.")
    sections.append(_table(["metric", *[f"`{m}`" for m in methods]], rows))

    # --- paired differences
    others = [m for m in methods if m != baseline]
    if others:
        rows = []
        for k, d in shown:
            cells = []
            for m in others:
                e = paired_comparison(summaries, m, baseline, k, d, n_boot, alpha)
                if e["n"] == 0:
                    cells.append("n/a")
                    continue
                cell = f"{_fmt(e['diff'])} [{_fmt(e['lo'])}, {_fmt(e['hi'])}]"
                if e["n"] >= 2 and (e["lo"] > 0 or e["hi"] < 0):
                    cell = f"**{cell}**"
                if d:
                    cell += f" wins {e['wins']}/{e['n']}"
                cells.append(cell)
            rows.append([f"{k} {arrow[d]}", *cells])
        sections.append(f"## Paired difference vs `{baseline}` (method − baseline, by seed)")
        sections.append(f"Bold: the {level} CI excludes 0.")
        sections.append(_table(["metric", *[f"`{m}`" for m in others]], rows))

    # --- per-bucket trust-region diagnostics
    kept_buckets = _bucket_ids(all_keys, r"trust_region/kept_frac/bucket_(\d+)")
    bucket_sections = []
    for suffix_name, suffix in (
        ("kept_frac", ""),
        ("kept_frac", "/pos"),
        ("kept_frac", "/neg"),
        ("delta_mean", ""),
        ("abs_diff_mean", ""),
    ):
        ids = _bucket_ids(all_keys, rf"trust_region/{suffix_name}/bucket_(\d+){suffix}")
        if not ids:
            continue
        key = f"trust_region/{suffix_name}/bucket_{{i}}{suffix}"
        rows = [
            [f"`{m}`", *[_fmt(_seed_mean(summaries, m, key.format(i=i))) for i in ids]]
            for m in methods
        ]
        bucket_sections.append(
            f"`{key.format(i='<i>')}`\n\n" + _table(["method", *[f"bucket {i}" for i in ids]], rows)
        )
    if bucket_sections:
        sections.append("## Trust region per frequency bucket (mean over steps, then seeds)")
        sections.append("Bucket 0 holds the most frequent tokens; higher ids are rarer.")
        sections.extend(bucket_sections)

    # --- plots
    pdir = g / "plots"
    pdir.mkdir(exist_ok=True)
    plots: list[tuple[str, Path | None]] = []
    plots.append(
        (
            "Reward per step (mean over seeds, band = min..max)",
            _plot_curves(records, ["reward/mean"], "mean reward", pdir / "reward.png"),
        )
    )
    plots.append(
        (
            "Policy entropy per step",
            _plot_curves(records, ["actor/entropy"], "entropy (nats)", pdir / "entropy.png"),
        )
    )
    rare_keys = sorted(
        {
            k
            for rs in records.values()
            for r in rs.values()
            for rec in r
            for k in rec
            if re.fullmatch(r"rare/share/bucket_\d+", k)
        },
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    plots.append(
        (
            "Share of generated tokens in the rarest frequency buckets",
            _plot_curves(records, rare_keys[-2:], "share of tokens", pdir / "rare_share.png"),
        )
    )
    if kept_buckets:
        series = {}
        for m in methods:
            vals = []
            for i in kept_buckets:
                v = list(_per_seed(summaries, m, f"trust_region/kept_frac/bucket_{i}").values())
                vals.append(
                    (float(np.mean(v)), float(np.min(v)), float(np.max(v)))
                    if v
                    else (math.nan, math.nan, math.nan)
                )
            series[m] = vals
        plots.append(
            (
                "Kept fraction per frequency bucket (bars: mean over seeds, whiskers: min..max)",
                _plot_bars(
                    [f"b{i}" for i in kept_buckets],
                    series,
                    "kept fraction",
                    "trust_region/kept_frac per bucket",
                    pdir / "kept_frac_buckets.png",
                ),
            )
        )
    acc = [k for k in ("eval/greedy_pass@1", "eval/mean@k", "eval/pass@k") if k in all_keys]
    if acc:
        series = {}
        for m in methods:
            cis = [method_ci(summaries, m, k, n_boot, alpha) for k in acc]
            series[m] = [(c["mean"], c["lo"], c["hi"]) for c in cis]
        plots.append(
            (
                f"Eval accuracy (mean over seeds, {level} bootstrap CI)",
                _plot_bars(
                    [_short(k) for k in acc],
                    series,
                    "accuracy",
                    "eval accuracy",
                    pdir / "accuracy.png",
                ),
            )
        )
    sections.append("## Plots")
    for caption, p in plots:
        if p is not None:
            sections.append(f"{caption}\n\n![{caption}](plots/{p.name})")

    sections.append(
        "## Metric definitions\n\n"
        "- `stability/reward_std`: sample std of the per-step mean reward; `reward_diff_std`: std "
        "of its step-to-step changes; `max_drawdown`: largest drop of the per-step mean reward "
        "below its running maximum.\n"
        "- `stability/grad_spikes`: steps whose gradient norm exceeds 3x the median of the "
        "previous 20 steps (at least 5 of them), plus non-finite norms; `grad_norm_p99`: 99th "
        "percentile of the norms; `loss_var`: sample variance of the per-step loss.\n"
        "- `eval/*`: greedy pass@1, mean@k and unbiased pass@k on the test split "
        "(eval/results.json); `rare/*` and `coherence/nll` (per-token NLL of the generations under "
        "the initial model) come from the same evaluation.\n"
        "- `trust_region/*`: means over steps of the per-step trust-region diagnostics."
    )
    path = g / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
