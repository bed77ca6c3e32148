"""The hybrid's pre-registered test (docs/results/hybrid-preregistration.md), computed from a grid
that holds its runs (the confirmatory study's: av-hybrid, av-freq-norm, dppo-tv, ppo,
ppo-lowmu-exempt on seeds 2000-2007):

    python scripts/hybrid_test.py runs/confirmatory [--out hybrid-test.md]

1. Validity: the mean over seeds of av-hybrid's `trust_region/ratio_bounded_frac` must reach 0.001;
   below it the result is "not tested: the bound did not bind in this regime".
2. Primary (one test, uncorrected): av-hybrid vs av-freq-norm on greedy pass@1, per-problem outcomes
   paired by seed and problem (the report's H2 machinery), two-sided alpha 0.05, TOST at +/- 0.05.
3. Secondary, Holm-adjusted together: unseen-token share av-hybrid vs av-freq-norm (predicted
   lower); greedy pass@1 av-hybrid vs dppo-tv (margin 0.05); ppo-lowmu-exempt vs ppo on greedy
   pass@1 (margin 0.05) and unseen-token share (predicted higher); and the report rows H1
   (drawdown), H3 (rare seen-token share, with its accuracy guard) and H4 (NLL, non-inferiority)
   for av-hybrid vs av-freq-norm with the default margins.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tokentrust.study.inference import adjust, tost_pvalue
from tokentrust.study.report.data import load_runs
from tokentrust.study.secondary import Contrast, contrast_verdict, evaluate_family
from tokentrust.study.verdicts import (
    DEFAULT_MARGINS, EQUIVALENT, INCONCLUSIVE, Plan, _apply_guard, _label, evaluate_hypotheses, primary_p,
)

HYBRID, BASE = "av-hybrid", "av-freq-norm"
MIN_BOUND = 0.001
ACC, UNSEEN = "eval/greedy_pass@1", "coherence/unseen_token_share"
PRIMARY = Contrast("primary", ACC, HYBRID, BASE, margin=0.05)
SECONDARY = [
    Contrast("1 garbage", UNSEEN, HYBRID, BASE, predict=-1),
    Contrast("2 vs dppo-tv", ACC, HYBRID, "dppo-tv", margin=0.05),
    Contrast("3a converse, accuracy", ACC, "ppo-lowmu-exempt", "ppo", margin=0.05),
    Contrast("3b converse, garbage", UNSEEN, "ppo-lowmu-exempt", "ppo", predict=+1),
]
REPORT_ROWS = ("H1", "H3", "H4")


def bound_fraction(records: dict) -> float:
    """Mean over seeds of the mean over steps of av-hybrid's trust_region/ratio_bounded_frac."""
    per_seed = []
    for recs in records.get(HYBRID, {}).values():
        xs = [r["trust_region/ratio_bounded_frac"] for r in recs
              if isinstance(r.get("trust_region/ratio_bounded_frac"), (int, float))]
        if xs:
            per_seed.append(sum(xs) / len(xs))
    return sum(per_seed) / len(per_seed) if per_seed else math.nan


def analyse(grid_dir: Path, alpha: float = 0.05) -> dict:
    _, _, records, summaries, problems = load_runs(grid_dir)
    load = lambda _grid: (summaries, problems)  # noqa: E731
    [primary] = evaluate_family([PRIMARY], load, alpha)  # a family of one: uncorrected
    family = evaluate_family(SECONDARY, load, alpha)
    plan = Plan({k: (HYBRID, BASE) for k in REPORT_ROWS}, True, "hybrid pre-registration, item 4")
    rows = [r for r in evaluate_hypotheses(summaries, problems, plan, alpha) if r.hypothesis.key in REPORT_ROWS]
    raw = [c.result.p if c.result is not None else math.nan for c in family]
    raw += [primary_p(r.hypothesis, r.result, r.margin) for r in rows]
    holm = adjust(raw, "holm")
    for c, p in zip(family, holm[: len(family)], strict=True):
        c.p_holm = float(p)
        c.verdict = contrast_verdict(c.contrast, c.result, c.p_holm, c.p_equiv, alpha)
    for r, p in zip(rows, holm[len(family):], strict=True):
        r.p_holm = float(p)
        r.label = _label(r.hypothesis, r.result, r.p_holm, r.margin, alpha)
        _apply_guard(r, DEFAULT_MARGINS["H3_guard"], alpha)
        q = tost_pvalue(r.result, r.margin) if r.result is not None and r.hypothesis.kind == "superiority" else math.nan
        if r.label == INCONCLUSIVE and math.isfinite(q) and q < alpha and not r.p_holm < alpha:
            r.label = EQUIVALENT  # TOST uncorrected here: one margin test per row, reported, not pooled
    bound = bound_fraction(records)
    return {"bound": bound, "valid": bool(bound >= MIN_BOUND), "primary": primary, "family": family, "rows": rows}


def _cell(r) -> str:
    return "n/a" if r is None or r.n == 0 else f"{r.diff:+.4g} [{r.lo:+.4g}, {r.hi:+.4g}] (n = {r.n})"


def render(a: dict) -> str:
    p = a["primary"]
    head = (f"Bound acts: mean ratio_bounded_frac {a['bound']:.4g} (threshold {MIN_BOUND:g}): "
            f"{'valid' if a['valid'] else 'NOT TESTED: the bound did not bind in this regime'}.")
    verdict = p.verdict if a["valid"] else "not tested"
    lines = [head, "",
             f"Primary, {HYBRID} - {BASE}, greedy pass@1: {_cell(p.result)}, p = {p.result.p if p.result else math.nan:.3g}, "
             f"TOST(±0.05) p = {p.p_equiv:.3g}: **{verdict}**", "",
             "| secondary | contrast | metric | diff [95% CI] | p | Holm p | verdict |", "|---|---|---|---|---:|---:|---|"]
    for c in a["family"]:
        k = c.contrast
        pr = c.result.p if c.result is not None else math.nan
        lines.append(f"| {k.key} | {k.label} | {k.metric} | {_cell(c.result)} | {pr:.3g} | {c.p_holm:.3g} | {c.verdict} |")
    for r in a["rows"]:
        h = r.hypothesis
        lines.append(f"| 4 {h.key} | `{HYBRID}` − `{BASE}` | {h.primary[0]} | {_cell(r.result)} | "
                     f"{primary_p(h, r.result, r.margin):.3g} | {r.p_holm:.3g} | {r.label} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid_dir", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    text = render(analyse(a.grid_dir))
    if a.out:
        a.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
