"""Grid report: calibrated hypothesis verdicts, secondary comparisons, per-method summaries, plots.

Input layout (written by the grid runner):

    GRID_DIR/grid.json                {"methods": {name: {"loss", params..., "description",
                                       "family"}}, "seeds": [...], "primary": {"method",
                                       "baseline"}, "command": "...", "config": {}}
    GRID_DIR/runs/<method>/seed_<s>/  one run directory each (metrics.jsonl, config.json,
                                      eval/results.json, eval/problems.jsonl)

Output: GRID_DIR/report.md, GRID_DIR/summary.csv, GRID_DIR/plots/*.png.

The statistics live in `tokentrust.study.inference` (tests, intervals, power) and `tokentrust.study.verdicts`
(hypotheses, primary comparisons, Holm corrections); this module only loads runs and writes
sections. See docs/statistics.md for the procedures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tokentrust.study.inference import PairedResult, interval, mde, min_signflip_p, tost_seeds_needed
from tokentrust.study.report import sections as study
from tokentrust.study.report.data import GridData, analyse, unfinished_runs
from tokentrust.study.secondary import ContrastResult
from tokentrust.study.report.figures import section_plots
from tokentrust.study.report.tables import (
    ARROW,
    DEFINITIONS,
    _level,
    _short,
    matched_view,
    section_summary,
    write_summary_csv,
)
from tokentrust.study.verdicts import (
    CONTRADICTED,
    EQUIVALENT,
    HYPOTHESES,
    INCONCLUSIVE,
    NON_INFERIORITY,
    SUPPORTED,
    HypothesisResult,
    primary_p,
    secondary_findings,
)

__all__ = ["CONTRADICTED", "EQUIVALENT", "INCONCLUSIVE", "SUPPORTED", "build_report"]

MIN_PERMUTATION_SEEDS = 6  # smallest n whose exact sign-flip p can be < 0.05

# ----------------------------------------------------------------------------------------------
# formatting


_fmt = study.fmt_general  # 4 significant digits, 3 in scientific notation


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


_table = study._table


def _interval(r: PairedResult) -> str:
    return f"{_fmt(r.diff)} [{_fmt(r.lo)}, {_fmt(r.hi)}]"


def _seeds_text(n: int | None) -> str:
    return str(n) if n is not None else "> 1000 or n/a"




# ----------------------------------------------------------------------------------------------
# sections


def _margin_text(v: HypothesisResult, alpha: float) -> str:
    """What the data say about the declared margin (equivalence or non-inferiority)."""
    r, m, h = v.result, v.margin, v.hypothesis
    if r is None or r.n < 2 or not math.isfinite(m):
        return ""
    if h.kind == NON_INFERIORITY:
        worse = "higher" if h.primary[1] < 0 else "lower"
        return f"non-inferiority margin {m:g} ({_short(h.primary[0])} {worse} by at most {m:g})"
    lo, hi = interval(r, 2 * alpha)
    span = f"{_level(2 * alpha)} interval [{_fmt(lo)}, {_fmt(hi)}], TOST Holm p {_fmt_p(v.p_equiv)}"
    if v.label == EQUIVALENT:
        return f"equivalent within ±{m:g} ({span})"
    if v.label == INCONCLUSIVE and not _significant(v, alpha):
        need = _seeds_text(tost_seeds_needed(r.sd, m, alpha))
        return (f"no detectable improvement; equivalence within ±{m:g} not shown ({span}; seeds to show it "
                f"with 80% power at this sd: {need})")
    return ""


def _significant(v: HypothesisResult, alpha: float) -> bool:
    """The primary test itself rejected (e.g. an H3 gain held back by its accuracy guard)."""
    return math.isfinite(v.p_holm) and v.p_holm < alpha


def _verdict_sentence(v: HypothesisResult, alpha: float = 0.05) -> str:
    h = v.hypothesis
    head = f"**{h.key} {h.name}: {v.label}**"
    if v.result is None:
        return f"{head} — {'; '.join(v.notes) or 'no paired data'}."
    r = v.result
    text = (
        f"{head} — `{v.method}` vs `{v.baseline}`, {_short(h.primary[0])} {ARROW[h.primary[1]]} "
        f"{_interval(r)}, p = {_fmt_p(primary_p(h, r, v.margin))} (Holm {_fmt_p(v.p_holm)}, n = {r.n})"
    )
    margin = _margin_text(v, alpha)
    if margin:
        text += "; " + margin
    if v.label in (INCONCLUSIVE, EQUIVALENT) and r.n >= 2 and r.sd == 0:
        text += "; the differences have no spread across seeds, so the exact sign-flip p decides"
    elif v.label == INCONCLUSIVE and r.n >= 2 and not _significant(v, alpha):
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


def _margins_text(d: GridData) -> str:
    """e.g. "H1 ±0.05 (default), H2 ±0.03 (grid.json), ..."."""
    def one(k: str, m: float) -> str:
        sign = "" if k.endswith("_guard") or k == "H4" else "±"
        return f"{k} {sign}{m:g} ({'grid.json' if k in d.plan.margins_declared else 'default'})"

    return ", ".join(one(k, m) for k, m in d.plan.margins.items())


def section_verdicts(d: GridData) -> list[str]:
    """Title, headline verdicts and the statistical caveats a reader needs to weigh them."""
    alpha = d.alpha
    head = (
        f"**Verdicts** (one primary comparison per hypothesis, {d.plan.note}; two-sided paired "
        f"tests at alpha = {alpha:g}, Holm-corrected across the {len(HYPOTHESES)} hypotheses; "
        f"{_level(alpha)} t-intervals; declared margins: {_margins_text(d)}; EQUIVALENT: two one-sided "
        "tests put the difference within ± the margin; secondary comparisons never change a headline): "
    )
    paragraph = head + " ".join(_verdict_sentence(v, alpha) for v in d.verdicts)
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
    if d.family:
        out.append("Declared secondary family (Holm across its contrasts): " + "; ".join(
            f"{c.contrast.key} {c.verdict}" + (f" {_interval(c.result)}" if c.result is not None and c.result.n else "")
            for c in d.family) + ".")
    findings = secondary_findings(d.secondary, alpha)
    out.append(
        ("Exploratory" if d.family else "Secondary") + " comparisons significant after Holm correction: "
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
            rows.append([h.key, "n/a", f"{h.primary[0]} {ARROW[h.primary[1]]}", *["n/a"] * 10, v.label])
            continue
        rows.append(
            [
                h.key,
                f"`{v.method}` − `{v.baseline}`",
                f"{h.primary[0]} {ARROW[h.primary[1]]}",
                str(r.n),
                _interval(r),
                _fmt(r.g_z),
                _fmt_p(primary_p(h, r, v.margin)),
                _fmt_p(v.p_holm),
                _margin_cell(v),
                f"{_fmt_p(r.p_signflip)} (≥ {_fmt_p(r.p_floor)})",
                _fmt(v.mde),
                _seeds_text(v.seeds_needed),
                r.test,
                v.label,
            ]
        )
    header = ["hyp.", "comparison", "primary metric", "n", f"diff [{_level(d.alpha)} CI]", "g_z", "p",
              "Holm p", "margin", "sign-flip p (floor)", "MDE (80%)", "seeds for 80%", "test", "verdict"]
    claims = "\n".join(f"- {h.key} {h.name} ({h.kind}): {h.claim}." for h in HYPOTHESES)
    note = ("p: two-sided test of no difference (superiority) or of a difference of exactly the margin "
            "against the favourable direction (non-inferiority). Margin: declared in grid.json "
            "(`primary.margins`) or the documented default; for superiority hypotheses the TOST p of "
            "equivalence within ±margin, Holm-corrected across them. MDE and seeds for 80% power are "
            "computed at level alpha / (number of hypotheses tested), the level a lone effect must reach "
            "after the Holm correction; the sign-flip floor is 2/2^n.")
    return ["## Primary tests", claims, note, _table(header, rows)]


def _margin_cell(v: HypothesisResult) -> str:
    if not math.isfinite(v.margin):
        return "n/a"
    if v.hypothesis.kind == NON_INFERIORITY:
        return f"{v.margin:g} (non-inferiority)"
    return f"±{v.margin:g} (TOST Holm p {_fmt_p(v.p_equiv)})"


_PREDICTION = {1: "higher", -1: "lower", 0: "none"}


def _family_row(c: ContrastResult, alpha: float, size: int) -> list[str]:
    """One contrast; the MDE is at alpha / size, the level a lone effect must reach under Holm."""
    k, r = c.contrast, c.result
    what = k.label + (f" (grid `{k.grid}`)" if k.grid else "")
    metric = f"{k.metric}{' per-seed slope' if k.doses else ''}"
    pred = _PREDICTION[k.predict]
    if r is None or r.n == 0:
        return [k.key, what, metric, pred, "0", *["n/a"] * 5, c.verdict]
    margin = "n/a"
    if k.margin is not None and r.n >= 2:
        lo, hi = interval(r, 2 * alpha)
        margin = f"±{k.margin:g}: {_level(2 * alpha)} CI [{_fmt(lo)}, {_fmt(hi)}], TOST Holm p {_fmt_p(c.p_equiv)}"
    return [k.key, what, metric, pred, str(r.n), _interval(r), _fmt_p(r.p), _fmt_p(c.p_holm), margin,
            _fmt(mde(r.sd, r.n, alpha / size)), c.verdict]


def section_family(d: GridData) -> list[str]:
    """The grid's declared secondary family (grid.secondary), Holm-corrected on its own."""
    if not d.family:
        return []
    header = ["", "contrast", "metric", "prediction", "n", f"diff [{_level(d.alpha)} CI]", "p", "Holm p",
              "equivalence", "MDE (80%)", "verdict"]
    notes = [f"- {c.contrast.key}: {c.contrast.note}" for c in d.family if c.contrast.note]
    return [
        "## Declared secondary family",
        f"{len(d.family)} contrasts declared in grid.json (`secondary`) before the runs, Holm-corrected "
        f"together at alpha = {d.alpha:g} (two-sided). Accuracy contrasts pair per-problem outcomes by seed "
        "and problem (the seed is the unit); other metrics use a paired t-test over the seeds both arms ran; a "
        "slope contrast tests the mean of per-seed OLS slopes on the dose against 0. SUPPORTED / CONTRADICTED: "
        "significant in / against the predicted direction; HIGHER / LOWER: significant without a prediction; "
        "EQUIVALENT: not significant and the TOST (Holm across the contrasts with a margin) puts the "
        "difference within ± the margin; NOT TESTABLE: both arms have the same value on every seed (nothing "
        "varies, e.g. a share that is 0 in every run); else INCONCLUSIVE. MDE: the difference detectable with "
        "80% power at alpha / (number of contrasts), the level a lone effect must reach after Holm.",
        _table(header, [_family_row(c, d.alpha, len(d.family)) for c in d.family]),
        *(["\n".join(notes)] if notes else []),
    ]


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
    title = "Exploratory comparisons" if d.family else "Secondary comparisons"
    return [
        f"## {title} vs `{d.baseline}` (method − baseline, paired by seed)",
        ("Exploratory: not part of the declared families, never a verdict. " if d.family else "")
        + f"Holm-corrected across all {len(d.secondary)} rows; bold: Holm p < {d.alpha:g}. Accuracy rows "
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
         _fmt(x.get("train/reward_last10")), _fmt(x.get("stability/drawdown_smoothed")),
         _fmt(x.get("stability/collapse_count")), _fmt(x.get("eval/greedy_pass@1"))]
        for m, seeds in d.summaries.items()
        for s, x in seeds.items()
    ]
    header = ["method", "seed", "steps", "done", "reward (last 10)", "drawdown (5-step mean)", "collapses",
              "greedy pass@1"]
    return ["## Runs", _table(header, rows)]


def build_report(
    grid_dir: str | os.PathLike,
    *,
    baseline: str = "dppo-tv",
    alpha: float = 0.05,
) -> Path:
    """Write GRID_DIR/report.md, summary.csv and plots/*.png; return the report path."""
    d = analyse(grid_dir, baseline, alpha)
    tv = matched_view(d)  # method-vs-method tables and plots: matched seeds only
    write_summary_csv(d, tv)
    sections = [
        *section_verdicts(d),
        *section_primary(d),
        *section_family(d),
        *section_secondary(d),
        *section_setup(d),
        *section_runs(d),
        *section_summary(d, tv),
        *study.section_reference(tv),
        *study.section_buckets(tv),
        *study.section_mechanism(tv),
        *study.section_masked_tokens(tv),
        *study.section_windows(tv),
        *study.section_dose(tv),
        *section_plots(d, tv),
        DEFINITIONS,
    ]
    path = d.path / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
