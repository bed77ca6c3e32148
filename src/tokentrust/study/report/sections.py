"""Study sections of a grid report: dose-response trends, the rarity-vs-mu mechanism, the most-masked
tokens per method and reward by step window (why the step count suffices).

Dose-response cells are recognised from grid.json's method descriptions (loss, delta, thresholds),
not from their names: a series of Binary-TV methods that differ only in beta (frequency-normalised
schedule, delta 0.15) or only in delta (fixed threshold, or the schedule at beta 0.5). A trend is
judged with the seed as the unit: one slope per seed, then a t-test of the mean slope across seeds,
Holm-corrected across series x metrics (the pooled fixed-effects OLS slope is descriptive only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from tokentrust.study.report import plots as plots
from tokentrust.study.inference import adjust, mean_interval

DOSE_METRICS: tuple[tuple[str, int], ...] = (
    ("eval/greedy_pass@1", +1),
    ("train/reward_last10", +1),
    ("stability/drawdown_smoothed", -1),
    ("eval/acc_rare_answer", +1),
    ("rare/share_rare_seen", +1),
    ("coherence/garbage_share", -1),
    ("coherence/unseen_token_share", -1),
    ("trust_region/kept_frac", 0),
)
BASE_DELTA, AV_BETA = 0.15, 0.5
WINDOW = 10


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_general(x: float | None) -> str:
    """A report number: 4 significant digits (3 in scientific notation), n/a or ±∞."""
    if x is None or not math.isfinite(x):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ------------------------------------------------------------------------------ reference

REFERENCE_METRICS = ("eval/greedy_pass@1", "eval/mean@k", "eval/pass@k", "eval/acc_rare_answer",
                     "eval/acc_common_answer", "rare/share_rare_seen", "coherence/nll", "coherence/garbage_share",
                     "coherence/unseen_token_share")


def section_reference(d: Any) -> list[str]:
    """The warm start every run begins from, evaluated as the runs are (GRID_DIR/warm_start/)."""
    from tokentrust.study.metrics import summarize_eval

    p = d.path / "warm_start" / "eval" / "results.json"
    if not p.exists():
        return []
    ref = summarize_eval(json.loads(p.read_text(encoding="utf-8")))
    keys = [k for k in REFERENCE_METRICS if k in ref]
    rows = [["warm start (no RL step)", *[_fmt(ref[k]) for k in keys]]]
    for m in d.methods:
        vals = [[v[k] for v in d.summaries[m].values() if k in v and math.isfinite(v[k])] for k in keys]
        rows.append([f"`{m}`", *[_fmt(float(np.mean(v))) if v else "n/a" for v in vals]])
    return ["## Before and after RL",
            "The warm start every run begins from, evaluated on the same problems with the same settings "
            "(seed 0), next to each method's mean over the matched seeds after RL (also summary.csv's "
            "`warm_start` row).",
            _table(["model", *keys], rows)]


# ------------------------------------------------------------------------------ dose-response

def dose_series(methods: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """{series label: [(dose, method)] sorted by dose} for series of at least 3 doses."""
    beta, delta_fixed, delta_av = {}, {}, {}
    for name, m in methods.items():
        if m.get("loss") != "dppo-tv" or m.get("delta") is None:
            continue
        th = m.get("thresholds") or {"kind": "constant"}
        delta = float(m["delta"])
        if th.get("kind", "constant") == "constant":
            delta_fixed.setdefault(delta, name)
        elif th.get("kind") == "frequency" and th.get("normalize"):
            if delta == BASE_DELTA:
                beta.setdefault(float(th.get("beta", 0.0)), name)
            if float(th.get("beta", 0.0)) == AV_BETA:
                delta_av.setdefault(delta, name)
    if 0.0 not in beta and BASE_DELTA in delta_fixed:  # beta 0 is the fixed threshold
        beta[0.0] = delta_fixed[BASE_DELTA]
    series = {"beta (frequency-normalised, delta 0.15)": beta, "delta, fixed threshold (dppo-tv)": delta_fixed,
              f"delta, frequency-normalised beta {AV_BETA:g}": delta_av}
    return {k: sorted(v.items()) for k, v in series.items() if len(v) >= 3}


def trend(points: list[tuple[float, Any, float]]) -> tuple[float, float, float, float]:
    """Dose-response decided with the seed as the unit: one least-squares slope of y on x per seed
    (seeds with at least 2 distinct doses), then the one-sample t-test of the mean slope across
    seeds. Returns (mean slope, lo, hi, p) at 95%; points = (x, seed, y). NaN with < 2 such seeds.

    Pooling the (dose, seed) runs in one OLS (`trend_fixed_effects`) treats runs as independent and
    is anti-conservative when slopes vary between seeds; it is shown as a description only."""
    from tokentrust.study.inference import paired_test

    by_seed: dict[Any, list[tuple[float, float]]] = {}
    for x, s, y in points:
        if math.isfinite(y):
            by_seed.setdefault(s, []).append((float(x), float(y)))
    slopes = []
    for xy in by_seed.values():
        x = np.array([a for a, _ in xy])
        if np.unique(x).size >= 2:
            y = np.array([b for _, b in xy])
            slopes.append(float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)))
    if len(slopes) < 2:
        return (math.nan,) * 4
    r = paired_test(slopes, np.zeros(len(slopes)))
    return r.diff, r.lo, r.hi, r.p


def trend_fixed_effects(points: list[tuple[float, Any, float]]) -> tuple[float, float, float, float]:
    """Descriptive: slope of y on x by OLS with seed fixed effects over all runs, (slope, lo, hi, p)
    at 95% (the p treats runs as independent; `trend` decides)."""
    pts = [(x, s, y) for x, s, y in points if math.isfinite(y)]
    seeds = sorted({s for _, s, _ in pts}, key=str)
    if len(pts) < len(seeds) + 2 or len({x for x, _, _ in pts}) < 2:
        return (math.nan,) * 4
    X = np.array([[x] + [float(s == t) for t in seeds] for x, s, _ in pts])
    y = np.array([p[2] for p in pts])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = len(y) - np.linalg.matrix_rank(X)
    resid = y - X @ coef
    sigma2 = float(resid @ resid) / df
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    se = math.sqrt(max(cov[0, 0], 0.0))
    if se == 0.0:
        return float(coef[0]), float(coef[0]), float(coef[0]), math.nan
    t = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(coef[0]) / se, df)
    return float(coef[0]), float(coef[0] - t * se), float(coef[0] + t * se), float(p)


def section_dose(d: Any) -> list[str]:
    series = dose_series(d.grid.get("methods", {}))
    series = {k: [(x, m) for x, m in v if m in d.summaries] for k, v in series.items()}
    series = {k: v for k, v in series.items() if len(v) >= 3}
    if not series:
        return []
    keys = [(k, dirn) for k, dirn in DOSE_METRICS if k in set(d.metric_keys)]
    tests = {}
    for label, cells in series.items():
        for k, _ in keys:
            pts = [(x, s, v[k]) for x, m in cells for s, v in d.summaries[m].items() if k in v]
            tests[label, k] = (trend(pts), trend_fixed_effects(pts))
    p_holm = dict(zip(tests, adjust([t[0][3] for t in tests.values()], "holm"), strict=True))
    out = ["## Dose-response",
           "Each series varies one knob of Binary-TV with everything else fixed. Cells: mean over seeds "
           "[95% t-interval]. Trend (decides): one slope of the metric on the dose per seed, the seed being "
           "the unit of replication; the mean slope with its 95% t-interval over seeds and the one-sample "
           f"t-test's p, Holm-adjusted across the {len(tests)} series x metric tests. The pooled OLS slope "
           "with seed fixed effects is shown for description only: it treats every run as independent."]
    for label, cells in series.items():
        rows = []
        for k, dirn in keys:
            vals = [mean_interval([v[k] for v in d.summaries[m].values() if k in v]) for _, m in cells]
            (slope, lo, hi, _), (fe, *_) = tests[label, k]
            arrow = {1: " ↑", -1: " ↓", 0: ""}[dirn]
            rows.append([f"{k}{arrow}", *[f"{_fmt(c)} [{_fmt(a)}, {_fmt(b)}]" for c, a, b in vals],
                         f"{_fmt(slope, 4)} [{_fmt(lo, 4)}, {_fmt(hi, 4)}]", _fmt(float(p_holm[label, k])),
                         _fmt(fe, 4)])
        head = ["metric", *[f"{x:g} (`{m}`, n={len(d.summaries[m])})" for x, m in cells],
                "per-seed slope [95%]", "p (Holm)", "pooled FE slope (descr.)"]
        out.append(f"**{label}**\n\n" + _table(head, rows))
    pdir = d.path / "plots"
    pdir.mkdir(exist_ok=True)
    for name, pick in (("dose_beta", "beta"), ("dose_delta", "delta")):
        panels = {k: {label: [(x, *mean_interval([v[k] for v in d.summaries[m].values() if k in v]))
                              for x, m in cells]
                      for label, cells in series.items() if label.startswith(pick)} for k, _ in keys}
        path = plots.plot_dose(panels, pick, pdir / f"{name}.png")
        if path is not None:
            out.append(f"Metric vs {pick} (mean over seeds, 95% t-interval)\n\n![{name}](plots/{path.name})")
    return out


# ---------------------------------------------------------------------------------- mechanism

def section_mechanism(d: Any) -> list[str]:
    """Correlation of corpus rarity with -log mu and the mean mu per bucket, per method."""
    key = "mechanism/corr_rarity_neglogmu"
    rows = []
    for m, seeds in d.records.items():
        per_seed = [float(np.mean(v)) for recs in seeds.values()
                    if (v := [r[key] for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])])]
        if not per_seed:
            continue
        r = float(np.mean(per_seed))
        prefix = "mechanism/mu_mean/bucket_"
        buckets = sorted({int(k[len(prefix):]) for recs in seeds.values() for rec in recs for k in rec
                          if k.startswith(prefix)})
        mus = []
        for i in buckets:
            vals = [x for recs in seeds.values() for rec in recs
                    if isinstance(x := rec.get(f"{prefix}{i}"), (int, float)) and math.isfinite(x)]
            mus.append(_fmt(float(np.mean(vals))) if vals else None)
        while mus and mus[-1] is None:  # the special-token bucket is never measured
            mus.pop()
        rows.append([f"`{m}`", str(len(per_seed)), _fmt(r), _fmt(r * r), _fmt(1 - r * r),
                     " / ".join(x or "n/a" for x in mus)])
    if not rows:
        return []
    return ["## Mechanism: how much of corpus rarity the in-context probability already carries",
            "Binary-TV masks |pi - mu| > delta, a ratio window of about delta / mu: improbable tokens already "
            "get a wide window whatever their corpus frequency. Per step, the Pearson correlation r between "
            "a token's corpus rarity and -log mu over the batch (special tokens excluded); r² is the share "
            "of rarity's variance that mu explains, 1 - r² the part only a frequency schedule adds. Mean "
            "over steps, then seeds; mean mu per bucket (most frequent first, then unseen).",
            _table(["method", "seeds", "r", "r²", "1 - r²", "mean mu per bucket"], rows)]


def section_masked_tokens(d: Any, top: int = 8) -> list[str]:
    """The tokens each method's region masks most, summed over seeds (masked_tokens.json)."""
    rows = []
    for m, seeds in d.runs.items():
        masked: dict[int, list] = {}
        total = 0
        for run in seeds.values():
            p = Path(run) / "masked_tokens.json"
            if not p.exists():
                continue
            data = json.loads(p.read_text(encoding="utf-8"))
            total += int(data.get("masked_total", 0))
            for t in data.get("top", []):
                e = masked.setdefault(t["id"], [t.get("text", str(t["id"])), 0, 0])
                e[1] += t["masked"]
                e[2] += t["seen"]
        if not masked or total == 0:
            continue
        best = sorted(masked.values(), key=lambda e: -e[1])[:top]
        cells = ", ".join(f"`{json.dumps(text)[1:-1] or ' '}` {100 * k / total:.0f}% ({100 * k / max(n, 1):.1f}%)"
                          for text, k, n in best)
        rows.append([f"`{m}`", str(total), cells])
    if not rows:
        return []
    return ["## Most-masked tokens per method",
            "Summed over seeds from each run's masked_tokens.json (counted per loss call, i.e. per PPO epoch): "
            "token, its share of all masked tokens, and in parentheses the share of its occurrences masked.",
            _table(["method", "masked", f"top {top} tokens"], rows)]


# ------------------------------------------------------------------------------ step windows

def section_windows(d: Any) -> list[str]:
    """Mean training reward per window of WINDOW steps: when the curves separate."""
    rows, n_win = [], 0
    for m, seeds in d.records.items():
        per = []
        for recs in seeds.values():
            steps = np.array([r["step"] for r in recs if isinstance(r.get("reward/mean"), (int, float))])
            vals = np.array([r["reward/mean"] for r in recs if isinstance(r.get("reward/mean"), (int, float))])
            if steps.size:
                per.append([float(vals[(steps > w * WINDOW) & (steps <= (w + 1) * WINDOW)].mean())
                            if ((steps > w * WINDOW) & (steps <= (w + 1) * WINDOW)).any() else math.nan
                            for w in range(int(steps.max() - 1) // WINDOW + 1)])
        if per:
            n_win = max(n_win, max(len(p) for p in per))
            rows.append((m, per))
    if not rows:
        return []
    table = []
    for m, per in rows:
        cells = []
        for w in range(n_win):
            vals = [p[w] for p in per if w < len(p) and math.isfinite(p[w])]
            cells.append(_fmt(float(np.mean(vals))) if vals else "n/a")
        table.append([f"`{m}`", *cells])
    head = ["method", *[f"steps {w * WINDOW + 1}-{(w + 1) * WINDOW}" for w in range(n_win)]]
    return ["## Training reward by step window (mean over seeds)",
            "Where the methods' curves separate, and whether they have by the last window.",
            _table(head, table)]


# ------------------------------------------------------------------------- trust region per bucket

def bucket_ids(keys: Sequence[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.fullmatch(k))})


def _bucket_labels(d: Any, ids: list[int]) -> list[str]:
    """Column headers "b<i> <mass range>" from the grid's bucket edges (vocab.FrequencyTable)."""
    from tokentrust.vocab import DEFAULT_EDGES, FrequencyTable

    edges = d.grid.get("resolved_example", {}).get("algo", {}).get("thresholds", {}).get("bucket_edges")
    names = FrequencyTable.bucket_names(edges or DEFAULT_EDGES)
    return [f"b{i} {names[i]}" if i < len(names) else f"bucket {i}" for i in ids]


def _bucket_row(d: Any, method: str, keys: list[str]) -> str:
    """Mean over seeds of the mean over `keys` (e.g. the PPO epochs) of one run's summary."""
    vals = []
    for metrics in d.summaries.get(method, {}).values():
        xs = [metrics[k] for k in keys if k in metrics and math.isfinite(metrics[k])]
        if xs:
            vals.append(float(np.mean(xs)))
    return fmt_general(float(np.mean(vals)) if vals else math.nan)


def section_buckets(d: Any) -> list[str]:
    """Where the regions act: kept fraction, delta_t and |pi - mu| per corpus-frequency bucket."""
    keys = d.metric_keys
    epochs = sorted({int(m[1]) for k in keys if (m := re.match(r"trust_region/epoch_(\d+)/abs_diff_mean/bucket_", k))})
    blocks = []
    specs = [(f"trust_region/kept_frac/bucket_{{i}}{sfx}", [""], f"kept fraction{txt}")
             for sfx, txt in (("", ""), ("/pos", ", A > 0"), ("/neg", ", A < 0"))]
    specs.append(("trust_region/delta_mean/bucket_{i}", [""], "mean threshold delta_t"))
    if epochs:
        specs.append(("trust_region/epoch_{e}/abs_diff_mean/bucket_{i}", [str(e) for e in epochs],
                      "mean |pi - mu| (mean over PPO epochs)"))
    specs += [(f"mechanism/ratio_{stat}/{sign}/bucket_{{i}}", [""], f"ratio pi / mu, {what}, A {cmp} 0")
              for stat, what in (("mean", "mean"), ("p99", "99th percentile per step"))
              for sign, cmp in (("pos", ">"), ("neg", "<"))]
    for pattern, eps, title in specs:
        ids = bucket_ids(keys, pattern.replace("{e}", eps[0]).replace("{i}", r"(\d+)"))
        if not ids:
            continue
        rows = [[f"`{m}`", *[_bucket_row(d, m, [pattern.format(e=e, i=i) for e in eps]) for i in ids]]
                for m in d.methods]
        blocks.append(f"{title} (`{pattern.format(e='<e>', i='<i>')}`)\n\n"
                      + _table(["method", *_bucket_labels(d, ids)], rows))
    if not blocks:
        return []
    return ["## Trust region per frequency bucket (mean over steps, then seeds)",
            "Buckets by share of the corpus token mass, most frequent first; then tokens the corpus never "
            "holds (unseen) and special tokens (EOS, pad, chat markers: they always get the base delta). "
            "\"Rare\" metrics count the buckets beyond 95% of the mass and unseen tokens.", *blocks]
