"""Per-method tables of a grid report (summary section, summary.csv, metric definitions).

Method-vs-method tables are built on matched seeds only: the seeds every method of the grid ran
(`matched_seeds`). A table that put one method's 8-seed mean next to another's 4-seed mean would
compare different draws of the training randomness. Runs outside the matched seeds stay in the
per-run rows (Runs table, `kind=run` rows of summary.csv) and in the paired tests, which pair each
comparison on the seeds its two methods share.

The warm start every run begins from (GRID_DIR/warm_start/eval/results.json) is a row of
summary.csv (`kind=warm_start`, `method=warm_start`), so the gain over it is machine-readable.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tokentrust.study.inference import mean_interval
from tokentrust.study.metrics import summarize_eval
from tokentrust.study.report.sections import _table, fmt_general

# metrics shown in the per-method table: (name, favourable direction; 0 = descriptive only)
KEY_METRICS: tuple[tuple[str, int], ...] = (
    ("eval/greedy_pass@1", +1),
    ("eval/mean@k", +1),
    ("eval/pass@k", +1),
    ("train/reward_first10", 0),
    ("train/reward_last10", +1),
    ("stability/drawdown_smoothed", -1),
    ("stability/collapse_count", -1),
    ("stability/time_to_collapse", 0),
    ("stability/max_drawdown", -1),
    ("stability/reward_noise_deff", -1),
    ("stability/reward_noise_norm", 0),
    ("stability/reward_diff_std", -1),
    ("stability/reward_std", 0),
    ("stability/grad_spikes", -1),
    ("stability/grad_norm_p99", -1),
    ("stability/loss_var", -1),
    ("stability/entropy_first", 0),
    ("stability/entropy_last", 0),
    ("stability/entropy_slope", 0),
    ("stability/mean_abs_pi_mu", 0),
    ("rare/share_rare_seen", +1),
    ("rare/share_rare", 0),
    ("rare/distinct_rare_per_1k", +1),
    ("rare/distinct_2", +1),
    ("eval/acc_rare_answer", +1),
    ("eval/acc_common_answer", +1),
    ("coherence/nll", -1),
    ("coherence/garbage_share", -1),
    ("coherence/unseen_token_share", -1),
    ("trust_region/kept_frac", 0),
)
ARROW = {1: "↑", -1: "↓", 0: ""}
SUMMARY_GROUPS = (("accuracy", ("eval/",)), ("training and stability", ("train/", "stability/")),
                  ("rare tokens, coherence, trust region", ("rare/", "coherence/", "trust_region/")))
WARM_START = "warm_start"


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _seed_order(seed: Any) -> tuple[bool, int, str]:
    return (isinstance(seed, str), seed if isinstance(seed, int) else 0, str(seed))


def matched_seeds(runs: dict[str, dict[Any, Any]]) -> list[Any]:
    """The seeds every method ran (sorted); [] when no seed is shared by all."""
    sets = [set(seeds) for seeds in runs.values()]
    return sorted(set.intersection(*sets), key=_seed_order) if sets else []


def matched_view(d: Any) -> Any:
    """A copy of the grid data restricted to the matched seeds, for method-vs-method tables and plots."""
    keep = set(d.matched)

    def sub(per_method: dict[str, dict[Any, Any]]) -> dict[str, dict[Any, Any]]:
        return {m: {s: v for s, v in seeds.items() if s in keep} for m, seeds in per_method.items()}

    return dataclasses.replace(d, runs=sub(d.runs), records=sub(d.records), summaries=sub(d.summaries))


def seeds_text(seeds: list[Any]) -> str:
    return ", ".join(str(s) for s in seeds) if seeds else "none"


def per_seed(d: Any, method: str, metric: str) -> list[float]:
    vals = (s.get(metric) for s in d.summaries.get(method, {}).values())
    return [v for v in vals if v is not None and math.isfinite(v)]


def matched_note(d: Any) -> str:
    """Which seeds the method tables use, and which runs they leave out."""
    extra = {m: [s for s in seeds if s not in set(d.matched)] for m, seeds in d.runs.items()}
    extra = {m: v for m, v in extra.items() if v}
    text = (f"Method tables and plots use the {len(d.matched)} seed(s) every method ran "
            f"(seeds {seeds_text(d.matched)}), so their means compare like with like.")
    if extra:
        text += (" Left out of them (in the Runs table and the paired tests): "
                 + "; ".join(f"`{m}` seeds {seeds_text(v)}" for m, v in extra.items()) + ".")
    return text


def section_summary(d: Any, tv: Any) -> list[str]:
    """Per group of metrics, one row per method: mean over the matched seeds [t-interval].
    `d`: the full grid data; `tv`: its `matched_view`."""
    keys = set(d.metric_keys)
    out = [f"## Per-method summary: mean over matched seeds [{_level(d.alpha)} t-interval]",
           matched_note(d) + " ↑ / ↓: the favourable direction. Intervals describe each method alone; "
           "compare methods with the paired tests above."]
    for title, prefixes in SUMMARY_GROUPS:
        metrics = [(k, dirn) for k, dirn in KEY_METRICS if k in keys and k.startswith(prefixes)]
        if not metrics:
            continue
        rows = []
        for m in d.methods:
            cells = []
            for k, _ in metrics:
                mean, lo, hi = mean_interval(per_seed(tv, m, k), d.alpha)
                cells.append(f"{fmt_general(mean)} [{fmt_general(lo)}, {fmt_general(hi)}]"
                             if math.isfinite(mean) else "n/a")
            rows.append([f"`{m}`", str(len(tv.summaries.get(m, {}))), *cells])
        out.append(f"**{title}**\n\n" + _table(["method", "seeds", *[f"{_short(k)} {ARROW[dirn]}".strip()
                                                                     for k, dirn in metrics]], rows))
    return out


def warm_start_summary(grid_dir: Path) -> dict[str, float] | None:
    """The warm start's evaluation as summary metrics (None if the grid has none)."""
    p = Path(grid_dir) / WARM_START / "eval" / "results.json"
    if not p.exists():
        return None
    return summarize_eval(json.loads(p.read_text(encoding="utf-8")))


def write_summary_csv(d: Any, tv: Any) -> Path:
    """One row per run (kind=run); the warm start (kind=warm_start) when evaluated; per method its
    mean and t-interval over the matched seeds (kind mean, ci_lo, ci_hi; `seed` lists the seeds)."""
    keys = d.metric_keys
    path = d.path / "summary.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["kind", "method", "seed", *keys])
        for m, seeds in d.summaries.items():
            for s, x in seeds.items():
                w.writerow(["run", m, s, *[repr(x[k]) if k in x else "" for k in keys]])
        warm = warm_start_summary(d.path)
        if warm is not None:
            w.writerow([WARM_START, WARM_START, "", *[repr(warm[k]) if k in warm else "" for k in keys]])
        for m in d.methods:
            cis = [mean_interval(per_seed(tv, m, k), d.alpha) for k in keys]
            for i, kind in enumerate(("mean", "ci_lo", "ci_hi")):
                w.writerow([kind, m, " ".join(str(s) for s in d.matched),
                            *["" if math.isnan(c[i]) else repr(c[i]) for c in cis]])
    return path


DEFINITIONS = """## Metric definitions

- `stability/drawdown_smoothed` (H1 primary): the worst fall of the 5-step trailing mean of the
  per-step mean reward below its running maximum. Averaging 5 steps divides the sampling noise by
  sqrt(5), so what remains is the policy losing reward: a collapse scores about its depth, a run
  that learns steadily about 0.
- `stability/collapse_count`: runs of at least 3 consecutive steps whose reward is below 0.5 x
  its running maximum, once that maximum is at least 0.2; `time_to_collapse`: the step where the
  first one starts, or the last step when none happened (censored; `collapsed` says which).
- `stability/reward_noise_deff`: the std of the step-to-step changes of the mean reward, each
  divided by its sampling std with the design effect 1 + (G - 1) rho of a prompt's G correlated
  samples (rho per step from the logged share of prompts whose rewards are all equal, beta-binomial).
  About 1 for sampling noise alone. `reward_noise_norm` (H1's primary before; descriptive now)
  assumed P x G independent draws: it is sqrt(1 + (G - 1) rho) for sampling noise alone, and a run
  collapsed near reward 0 scores as quiet as a healthy one.
- `stability/max_drawdown`: largest drop of the per-step mean reward below its running maximum
  (unsmoothed); `reward_std`: std of the per-step mean reward (includes the learning trend);
  `reward_diff_std`: std of its step-to-step changes (not normalised).
- `stability/grad_spikes`: steps whose gradient norm exceeds 3x the median of the previous 20
  steps (at least 5 of them), plus non-finite norms; `grad_norm_p99`: 99th percentile of the
  norms; `loss_var`: sample variance of the per-step loss.
- `eval/*`: greedy pass@1, mean@k and unbiased pass@k on the test split; greedy pass@1 and
  mean@k are compared per problem (eval/problems.jsonl). `rare/*` and `coherence/nll` (per-token
  NLL of the generations under the initial model) come from the same evaluation.
- `rare/share_rare_seen` (H3 primary): the share of generated tokens that are rare (beyond 95% of
  the corpus token mass) and occur in the corpus. `rare/share_rare` also counted corpus-unseen
  tokens; those are `coherence/unseen_token_share`, garbage rather than rare-token utility.
- `trust_region/*`: means over steps of the per-step trust-region diagnostics.
- Tests: see docs/statistics.md (paired t-test and t-interval, exact sign-flip p, cluster-level
  accuracy test, Holm corrections, TOST equivalence and non-inferiority margins, MDE at 80% power
  from t quantiles)."""
