"""Grid report: calibrated hypothesis verdicts, secondary comparisons, per-method summaries, plots.

Input layout (written by the grid runner):

    GRID_DIR/grid.json                {"methods": {name: {"loss", params..., "description",
                                       "family"}}, "seeds": [...], "primary": {"method",
                                       "baseline"}, "command": "...", "config": {}}
    GRID_DIR/runs/<method>/seed_<s>/  one run directory each (metrics.jsonl, config.json,
                                      eval/results.json, eval/problems.jsonl)

Output: GRID_DIR/report.md, GRID_DIR/summary.csv, GRID_DIR/plots/*.png.

The statistics live in `tokentrust.inference` (tests, intervals, power) and `tokentrust.verdicts`
(hypotheses, primary comparisons, Holm corrections); this module only loads runs and writes
sections. See docs/statistics.md for the procedures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust import report_plots as plots
from tokentrust import report_study as study
from tokentrust.inference import PairedResult, mean_interval, min_signflip_p
from tokentrust.metrics import load_metrics, read_jsonl, summarize_run
from tokentrust.verdicts import (
    CONTRADICTED,
    HYPOTHESES,
    INCONCLUSIVE,
    SUPPORTED,
    HypothesisResult,
    Plan,
    SecondaryRow,
    evaluate_hypotheses,
    resolve_plan,
    secondary_findings,
    secondary_tests,
)

__all__ = ["CONTRADICTED", "INCONCLUSIVE", "SUPPORTED", "build_report", "load_grid", "load_problems"]

# metrics shown in the per-method table: (name, favourable direction; 0 = descriptive only)
KEY_METRICS: tuple[tuple[str, int], ...] = (
    ("eval/greedy_pass@1", +1),
    ("eval/mean@k", +1),
    ("eval/pass@k", +1),
    ("train/reward_first10", 0),
    ("train/reward_last10", +1),
    ("stability/reward_noise_norm", -1),
    ("stability/collapse_count", -1),
    ("stability/time_to_collapse", 0),
    ("stability/max_drawdown", -1),
    ("stability/reward_diff_std", -1),
    ("stability/reward_std", 0),
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
    ("eval/acc_rare_answer", +1),
    ("eval/acc_common_answer", +1),
    ("coherence/nll", -1),
    ("coherence/garbage_share", -1),
    ("trust_region/kept_frac", 0),
)
ARROW = {1: "↑", -1: "↓", 0: ""}
MIN_PERMUTATION_SEEDS = 6  # smallest n whose exact sign-flip p can be < 0.05

Summaries = dict[str, dict[Any, dict[str, float]]]
Problems = dict[str, dict[Any, dict[Any, tuple[float, float]]]]

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
                if _finished(sd):
                    seeds[_seed_key(sd.name)] = sd
        if seeds:
            runs[m] = dict(sorted(seeds.items(), key=lambda kv: _seed_order(kv[0])))
    return grid, runs


def _finished(run_dir: Path) -> bool:
    """A run the report analyses: DONE, or evaluated (a run still training or stopped before its
    evaluation would compare a partial curve with whole ones)."""
    return (run_dir / "DONE").exists() or (run_dir / "eval" / "results.json").exists()


def unfinished_runs(grid_dir: str | os.PathLike) -> list[str]:
    """<method>/seed_<s> of run directories the report leaves out (see `_finished`)."""
    root = Path(grid_dir) / "runs"
    return sorted(f"{sd.parent.name}/{sd.name}" for sd in root.glob("*/seed_*")
                  if sd.is_dir() and (sd / "metrics.jsonl").exists() and not _finished(sd))


def load_problems(run_dir: str | os.PathLike) -> dict[Any, tuple[float, float]]:
    """{problem id: (greedy correct 0/1, mean of the samples' correctness)} from
    RUN_DIR/eval/problems.jsonl ({} if absent)."""
    p = Path(run_dir) / "eval" / "problems.jsonl"
    if not p.exists():
        return {}
    out = {}
    for row in read_jsonl(p):
        if "id" not in row or "greedy_correct" not in row:
            continue
        samples = [float(bool(x)) for x in row.get("samples_correct") or []]
        out[row["id"]] = (float(bool(row["greedy_correct"])), float(np.mean(samples)) if samples else math.nan)
    return out


@dataclass
class GridData:
    """Everything the section builders share."""

    path: Path
    grid: dict[str, Any]
    runs: dict[str, dict[Any, Path]]
    records: dict[str, dict[Any, list[dict[str, Any]]]]
    summaries: Summaries
    problems: Problems
    baseline: str
    alpha: float
    plan: Plan
    verdicts: list[HypothesisResult]
    secondary: list[SecondaryRow]

    @property
    def methods(self) -> list[str]:
        return list(self.runs)

    @property
    def metric_keys(self) -> list[str]:
        return sorted({k for seeds in self.summaries.values() for s in seeds.values() for k in s})


def analyse(grid_dir: str | os.PathLike, baseline: str, alpha: float) -> GridData:
    """Load every run of the grid and run the primary and secondary tests."""
    g = Path(grid_dir)
    grid, runs = load_grid(g)
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} has no runs under {g / 'runs'}; have {sorted(runs)}")
    records = {m: {s: load_metrics(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    summaries = {m: {s: summarize_run(p, records[m][s]) for s, p in seeds.items()} for m, seeds in runs.items()}
    problems = {m: {s: load_problems(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    problems = {m: {s: v for s, v in seeds.items() if v} for m, seeds in problems.items()}
    plan = resolve_plan(grid, list(runs), baseline)
    verdicts = evaluate_hypotheses(summaries, problems, plan, alpha)
    primary = {(m, b, h.primary[0]) for h in HYPOTHESES for k, (m, b) in plan.comparisons.items() if k == h.key}
    # dose-response cells are judged by their trend (report_study), not by pairwise tests
    pairwise = [m for m in runs if grid.get("methods", {}).get(m, {}).get("family") != "dose"]
    secondary = secondary_tests(summaries, problems, pairwise, baseline, primary, alpha=alpha)
    return GridData(g, grid, runs, records, summaries, problems, baseline, alpha, plan, verdicts, secondary)


# ----------------------------------------------------------------------------------------------
# formatting


_fmt = study.fmt_general  # 4 significant digits, 3 in scientific notation


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _interval(r: PairedResult) -> str:
    return f"{_fmt(r.diff)} [{_fmt(r.lo)}, {_fmt(r.hi)}]"


def _seeds_text(n: int | None) -> str:
    return str(n) if n is not None else "> 1000 or n/a"


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


# ----------------------------------------------------------------------------------------------
# sections


def _verdict_sentence(v: HypothesisResult) -> str:
    h = v.hypothesis
    head = f"**{h.key} {h.name}: {v.label}**"
    if v.result is None:
        return f"{head} — {'; '.join(v.notes) or 'no paired data'}."
    r = v.result
    text = (
        f"{head} — `{v.method}` vs `{v.baseline}`, {_short(h.primary[0])} {ARROW[h.primary[1]]} "
        f"{_interval(r)}, p = {_fmt_p(r.p)} (Holm {_fmt_p(v.p_holm)}, n = {r.n})"
    )
    if v.label == INCONCLUSIVE and r.n >= 2 and r.sd == 0:
        text += "; the differences have no spread across seeds, so the exact sign-flip p decides"
    elif v.label == INCONCLUSIVE and r.n >= 2:
        text += (
            f"; detectable at n = {r.n} with 80% power (level {v.level:.3g}): |difference| ≥ "
            f"{_fmt(v.mde)}; seeds for 80% power at the observed difference: {_seeds_text(v.seeds_needed)}"
        )
    if v.notes:
        text += "; " + "; ".join(v.notes)
    return text + "."


def paired_seed_count(d: GridData) -> int:
    """Seeds that every primary comparison's method and baseline share (0 without a plan)."""
    counts = [len(set(d.runs.get(m, {})) & set(d.runs.get(b, {}))) for m, b in d.plan.comparisons.values()]
    return min(counts) if counts else 0


def section_verdicts(d: GridData) -> list[str]:
    """Title, headline verdicts and the statistical caveats a reader needs to weigh them."""
    alpha = d.alpha
    head = (
        f"**Verdicts** (one primary comparison per hypothesis, {d.plan.note}; two-sided paired "
        f"tests at alpha = {alpha:g}, Holm-corrected across the {len(HYPOTHESES)} hypotheses; "
        f"{_level(alpha)} t-intervals; secondary comparisons never change a headline): "
    )
    paragraph = head + " ".join(_verdict_sentence(v) for v in d.verdicts)
    n = paired_seed_count(d)
    n_runs = sum(len(v) for v in d.runs.values())
    stats_note = (
        f"Sample size: {n_runs} run(s); {n} paired seed(s) in the primary comparisons. The exact "
        f"sign-flip permutation test cannot give p below 2/2^n = {_fmt_p(min_signflip_p(n))} at "
        f"n = {n}"
        + (
            f", and with fewer than {MIN_PERMUTATION_SEEDS} paired seeds it cannot reach p < 0.05"
            if n < MIN_PERMUTATION_SEEDS
            else ""
        )
        + "; the paired t-test is therefore the deciding test (the sign-flip p is shown as a "
        "distribution-free check). Accuracy is analysed from per-problem outcomes "
        "(eval/problems.jsonl) paired by seed and problem and tested at the seed level "
        "(n − 1 degrees of freedom), because training randomness shifts whole runs. INCONCLUSIVE "
        "means the data cannot tell, not that there is no effect: compare the observed "
        "difference with the detectable one."
    )
    not_done = [
        f"{m}/seed_{s}" for m, seeds in d.summaries.items() for s, x in seeds.items() if x.get("train/done", 0.0) < 1.0
    ]
    out = [f"# Grid report: {d.path.resolve().name}", paragraph, stats_note]
    if not_done:
        out.append(f"Runs without a DONE marker (incomplete): {', '.join(not_done)}.")
    left_out = unfinished_runs(d.path)
    if left_out:
        out.append(f"Left out, still training or stopped before evaluation: {', '.join(left_out)}.")
    findings = secondary_findings(d.secondary, alpha)
    out.append(
        "Secondary comparisons significant after Holm correction: "
        + (
            "; ".join(f"`{r.method}` {_short(r.metric)} {_interval(r.result)} (Holm p {_fmt_p(r.p_holm)})" for r in findings)
            if findings
            else "none"
        )
        + "."
    )
    return out


def section_primary(d: GridData) -> list[str]:
    rows = []
    for v in d.verdicts:
        h, r = v.hypothesis, v.result
        if r is None:
            rows.append([h.key, "n/a", f"{h.primary[0]} {ARROW[h.primary[1]]}", *["n/a"] * 9, v.label])
            continue
        rows.append(
            [
                h.key,
                f"`{v.method}` − `{v.baseline}`",
                f"{h.primary[0]} {ARROW[h.primary[1]]}",
                str(r.n),
                _interval(r),
                _fmt(r.g_z),
                _fmt_p(r.p),
                _fmt_p(v.p_holm),
                f"{_fmt_p(r.p_signflip)} (≥ {_fmt_p(r.p_floor)})",
                _fmt(v.mde),
                _seeds_text(v.seeds_needed),
                r.test,
                v.label,
            ]
        )
    header = ["hyp.", "comparison", "primary metric", "n", f"diff [{_level(d.alpha)} CI]", "g_z", "p",
              "Holm p", "sign-flip p (floor)", "MDE (80%)", "seeds for 80%", "test", "verdict"]
    claims = "\n".join(f"- {h.key} {h.name}: {h.claim}." for h in HYPOTHESES)
    note = ("MDE and seeds for 80% power are computed at level alpha / (number of hypotheses "
            "tested), the level a lone effect must reach after the Holm correction; the sign-flip "
            "floor is 2/2^n.")
    return ["## Primary tests", claims, note, _table(header, rows)]


def section_secondary(d: GridData) -> list[str]:
    if not d.secondary:
        return []
    rows = []
    for s in d.secondary:
        r = s.result
        cell = _interval(r)
        if math.isfinite(s.p_holm) and s.p_holm < d.alpha:
            cell = f"**{cell}**"
        boot = ""
        if "boot_lo" in r.extra:
            boot = f"[{_fmt(r.extra['boot_lo'])}, {_fmt(r.extra['boot_hi'])}]"
        rows.append([f"`{s.method}`", f"{s.metric} {ARROW[s.direction]}", str(r.n), cell, boot,
                     _fmt(r.g_z), _fmt_p(r.p), _fmt_p(s.p_holm), _fmt_p(r.p_signflip)])
    return [
        f"## Secondary comparisons vs `{d.baseline}` (method − baseline, paired by seed)",
        f"Holm-corrected across all {len(d.secondary)} rows; bold: Holm p < {d.alpha:g}. Accuracy rows "
        "use per-problem outcomes; their last interval is the two-stage cluster bootstrap (seeds, "
        "then problems), which also covers the choice of problems and errs wide. g_z: Hedges-"
        "corrected standardised paired difference.",
        _table(["method", "metric", "n", f"diff [{_level(d.alpha)} t-CI]", "cluster-bootstrap CI",
                "g_z", "p", "Holm p", "sign-flip p"], rows),
    ]


def section_setup(d: GridData) -> list[str]:
    meta = d.grid.get("methods", {})
    rows = []
    for m in d.methods:
        info = dict(meta.get(m, {}))
        desc, fam, loss = (str(info.pop(k, "")) for k in ("description", "family", "loss"))
        params = ", ".join(f"{k}={v}" for k, v in info.items())
        rows.append([f"`{m}`", fam, loss, params, desc, str(len(d.runs[m]))])
    return [
        "## Setup",
        f"Baseline of the secondary table: `{d.baseline}`. Primary comparisons: {d.plan.note}. "
        f"Grid directory: `{d.path}`.",
        "Command:\n\n```\n" + str(d.grid.get("command", "(not recorded)")) + "\n```",
        _table(["method", "family", "loss", "params", "description", "runs"], rows),
        f"Seeds in grid.json: {d.grid.get('seeds', 'n/a')}.",
        "Config:\n\n```json\n" + json.dumps(d.grid.get("config", {}), indent=2, sort_keys=True) + "\n```",
    ]


def section_runs(d: GridData) -> list[str]:
    rows = [
        [f"`{m}`", str(s), _fmt(x.get("train/steps")), "yes" if x.get("train/done") else "no",
         _fmt(x.get("train/reward_last10")), _fmt(x.get("stability/reward_noise_norm")),
         _fmt(x.get("stability/collapse_count")), _fmt(x.get("eval/greedy_pass@1"))]
        for m, seeds in d.summaries.items()
        for s, x in seeds.items()
    ]
    header = ["method", "seed", "steps", "done", "reward (last 10)", "reward noise (norm.)", "collapses",
              "greedy pass@1"]
    return ["## Runs", _table(header, rows)]


def _per_seed(d: GridData, method: str, metric: str) -> list[float]:
    vals = (s.get(metric) for s in d.summaries.get(method, {}).values())
    return [v for v in vals if v is not None and math.isfinite(v)]


SUMMARY_GROUPS = (("accuracy", ("eval/",)), ("training and stability", ("train/", "stability/")),
                  ("rare tokens, coherence, trust region", ("rare/", "coherence/", "trust_region/")))


def section_summary(d: GridData) -> list[str]:
    """Per group of metrics, a table with one row per method (mean over seeds [t-interval])."""
    keys = set(d.metric_keys)
    out = [f"## Per-method summary: mean over seeds [{_level(d.alpha)} t-interval]",
           "↑ / ↓: the favourable direction. Intervals describe each method alone; compare methods "
           "with the paired tests above."]
    for title, prefixes in SUMMARY_GROUPS:
        metrics = [(k, dirn) for k, dirn in KEY_METRICS if k in keys and k.startswith(prefixes)]
        if not metrics:
            continue
        rows = []
        for m in d.methods:
            cells = []
            for k, _ in metrics:
                mean, lo, hi = mean_interval(_per_seed(d, m, k), d.alpha)
                cells.append(f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(mean) else "n/a")
            rows.append([f"`{m}`", str(len(d.summaries.get(m, {}))), *cells])
        out.append(f"**{title}**\n\n" + _table(["method", "seeds", *[f"{_short(k)} {ARROW[dirn]}".strip()
                                                                     for k, dirn in metrics]], rows))
    return out


def _forest_panels(d: GridData) -> dict[str, list[tuple[str, float, float, float, bool]]]:
    primary = {(v.method, v.hypothesis.primary[0]): v.result for v in d.verdicts if v.result is not None}
    panels: dict[str, list[tuple[str, float, float, float, bool]]] = {}
    for h in HYPOTHESES:
        k = h.primary[0]
        items = []
        for (m, metric), r in primary.items():
            if metric == k:
                items.append((f"{m} (primary)", r.diff, r.lo, r.hi, True))
        for s in d.secondary:
            if s.metric == k:
                items.append((s.method, s.result.diff, s.result.lo, s.result.hi, False))
        panels[f"{h.key}: {_short(k)}"] = items
    return panels


def section_plots(d: GridData) -> list[str]:
    pdir = d.path / "plots"
    pdir.mkdir(exist_ok=True)
    level = _level(d.alpha)
    out: list[tuple[str, Path | None]] = [
        (f"Primary metrics: method − `{d.baseline}` (primary comparison filled) with {level} intervals",
         plots.plot_forest(_forest_panels(d), "difference vs baseline", pdir / "forest.png")),
        ("Reward per step (mean over seeds, band = min..max)",
         plots.plot_curves(d.records, ["reward/mean"], "mean reward", pdir / "reward.png")),
        ("Policy entropy per step",
         plots.plot_curves(d.records, ["actor/entropy"], "entropy (nats)", pdir / "entropy.png")),
    ]
    rare_keys = sorted({k for rs in d.records.values() for r in rs.values() for rec in r for k in rec
                        if re.fullmatch(r"rare/share/bucket_\d+", k)}, key=lambda k: int(k.rsplit("_", 1)[1]))
    out.append(("Share of generated tokens in the rarest frequency buckets",
                plots.plot_curves(d.records, rare_keys[-2:], "share of tokens", pdir / "rare_share.png")))
    kept = study.bucket_ids(d.metric_keys, r"trust_region/kept_frac/bucket_(\d+)")
    if kept:
        series = {m: [_mean_range(_per_seed(d, m, f"trust_region/kept_frac/bucket_{i}")) for i in kept]
                  for m in d.methods}
        out.append(("Kept fraction per frequency bucket (bars: mean over seeds, whiskers: min..max)",
                    plots.plot_bars([f"b{i}" for i in kept], series, "kept fraction",
                                    "trust_region/kept_frac per bucket", pdir / "kept_frac_buckets.png")))
    acc = [k for k in ("eval/greedy_pass@1", "eval/mean@k", "eval/pass@k") if k in d.metric_keys]
    if acc:
        series = {m: [mean_interval(_per_seed(d, m, k), d.alpha) for k in acc] for m in d.methods}
        out.append((f"Eval accuracy (mean over seeds, {level} t-interval)",
                    plots.plot_bars([_short(k) for k in acc], series, "accuracy", "eval accuracy",
                                    pdir / "accuracy.png")))
    return ["## Plots"] + [f"{c}\n\n![{c}](plots/{p.name})" for c, p in out if p is not None]


def _mean_range(v: list[float]) -> tuple[float, float, float]:
    return (float(np.mean(v)), float(np.min(v)), float(np.max(v))) if v else (math.nan,) * 3


DEFINITIONS = """## Metric definitions

- `stability/reward_noise_norm` (H1 primary): the std of the step-to-step changes of the mean
  reward, each divided by its Bernoulli sampling std sqrt(2 p(1 - p) / m) (p: mean of the two
  steps' rewards, clipped to [0.5/m, 1 - 0.5/m]; m = prompts_per_step x group_size from the run's
  config.json). About 1 for pure sampling noise; unlike the raw noise it does not grow just
  because the reward sits nearer 0.5.
- `stability/collapse_count`: runs of at least 3 consecutive steps whose reward is below 0.5 x
  its running maximum, once that maximum is at least 0.2; `time_to_collapse`: the step where the
  first one starts, or the last step when none happened (censored; `collapsed` says which).
- `stability/max_drawdown`: largest drop of the per-step mean reward below its running maximum;
  `reward_std`: std of the per-step mean reward (includes the learning trend);
  `reward_diff_std`: std of its step-to-step changes (not normalised).
- `stability/grad_spikes`: steps whose gradient norm exceeds 3x the median of the previous 20
  steps (at least 5 of them), plus non-finite norms; `grad_norm_p99`: 99th percentile of the
  norms; `loss_var`: sample variance of the per-step loss.
- `eval/*`: greedy pass@1, mean@k and unbiased pass@k on the test split; greedy pass@1 and
  mean@k are compared per problem (eval/problems.jsonl). `rare/*` and `coherence/nll` (per-token
  NLL of the generations under the initial model) come from the same evaluation.
- `trust_region/*`: means over steps of the per-step trust-region diagnostics.
- Tests: see docs/statistics.md (paired t-test and t-interval, exact sign-flip p, cluster-level
  accuracy test, Holm corrections, MDE at 80% power from t quantiles)."""


def write_summary_csv(d: GridData) -> Path:
    """One row per run (kind=run), then per method its mean and t-interval (mean, ci_lo, ci_hi)."""
    keys = d.metric_keys
    path = d.path / "summary.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["kind", "method", "seed", *keys])
        for m, seeds in d.summaries.items():
            for s, x in seeds.items():
                w.writerow(["run", m, s, *[repr(x[k]) if k in x else "" for k in keys]])
        for m in d.methods:
            cis = [mean_interval(_per_seed(d, m, k), d.alpha) for k in keys]
            for i, kind in enumerate(("mean", "ci_lo", "ci_hi")):
                w.writerow([kind, m, "", *["" if math.isnan(c[i]) else repr(c[i]) for c in cis]])
    return path


def build_report(
    grid_dir: str | os.PathLike,
    *,
    baseline: str = "dppo-tv",
    alpha: float = 0.05,
) -> Path:
    """Write GRID_DIR/report.md, summary.csv and plots/*.png; return the report path."""
    d = analyse(grid_dir, baseline, alpha)
    write_summary_csv(d)
    sections = [
        *section_verdicts(d),
        *section_primary(d),
        *section_secondary(d),
        *section_setup(d),
        *section_runs(d),
        *section_summary(d),
        *study.section_reference(d),
        *study.section_buckets(d),
        *study.section_mechanism(d),
        *study.section_masked_tokens(d),
        *study.section_windows(d),
        *study.section_dose(d),
        *section_plots(d),
        DEFINITIONS,
    ]
    path = d.path / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
