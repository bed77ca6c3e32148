"""Hypotheses about AV-DPPO, their declared primary comparisons, and calibrated verdicts.

Each hypothesis names ONE primary metric; the grid spec declares ONE primary comparison
(`"primary": {"method": ..., "baseline": ..., "H2": {"method": ...}, "margins": {"H2": 0.05}}`,
per-hypothesis overrides allowed; margins default to DEFAULT_MARGINS). A headline verdict comes
only from the primary tests, Holm-corrected across the hypotheses (so a grid where nothing differs
gets a SUPPORTED or CONTRADICTED headline in at most alpha of cases).

- Superiority hypotheses (H1-H3): SUPPORTED / CONTRADICTED when the two-sided test is significant
  in / against the favourable direction. Otherwise EQUIVALENT when two one-sided tests (TOST,
  Holm-corrected across these hypotheses) put the difference within +/- the declared margin, else
  INCONCLUSIVE ("no detectable improvement", which is not "no effect").
- Non-inferiority hypotheses (H4): the test is of diff = -margin (worse by exactly the margin);
  SUPPORTED when the difference is significantly better than that, CONTRADICTED when it is
  significantly worse than that.
- H3's accuracy guard is a non-inferiority test on greedy accuracy at level alpha (an
  intersection-union test, so no correction): a rare-token gain is SUPPORTED only when accuracy is
  shown to be no worse than the guard margin; CONTRADICTED when it is worse by more than the
  margin; otherwise INCONCLUSIVE.

Every other method x metric comparison is secondary: Holm-corrected across the whole table, shown
with effect sizes, and never changes a headline.

Inputs are plain dicts so the calibration tests drive exactly this code with synthetic numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokentrust.study.inference import (
    PairedResult,
    accuracy_test,
    adjust,
    mde,
    paired_test,
    seeds_needed,
    shifted_pvalue,
    tost_pvalue,
)

SUPPORTED, CONTRADICTED, INCONCLUSIVE, EQUIVALENT = "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "EQUIVALENT"
SUPERIORITY, NON_INFERIORITY = "superiority", "non-inferiority"
# declared margins in the primary metric's units (docs/statistics.md says why each):
# H1 smoothed drawdown 0.05 reward, H2 greedy pass@1 0.05, H3 rare seen share 0.005 of tokens,
# H4 NLL 0.1 nats/token (non-inferiority), H3's accuracy guard 0.05 greedy pass@1
DEFAULT_MARGINS: dict[str, float] = {"H1": 0.05, "H2": 0.05, "H3": 0.005, "H4": 0.1, "H3_guard": 0.05}
AV_FAMILY = "av-dppo"

Summaries = Mapping[str, Mapping[Any, Mapping[str, float]]]  # method -> seed -> metrics
# method -> seed -> problem id -> (greedy correct, mean of sample correctness)
Problems = Mapping[str, Mapping[Any, Mapping[Any, tuple[float, float]]]]

# metrics analysed per problem when eval/problems.jsonl exists: index into the Problems tuple
PROBLEM_FIELDS = {"eval/greedy_pass@1": 0, "eval/mean@k": 1}


@dataclass(frozen=True)
class Hypothesis:
    """A claim judged on one primary metric (direction +1: higher is better, -1: lower)."""

    key: str
    name: str
    claim: str
    primary: tuple[str, int]
    secondary: tuple[tuple[str, int], ...] = ()
    guard: tuple[str, int] | None = None
    kind: str = SUPERIORITY


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis(
        "H1",
        "stability",
        "AV-DPPO trains more stably: a smaller worst fall of the 5-step mean reward (collapses count)",
        ("stability/drawdown_smoothed", -1),
        (
            ("stability/collapse_count", -1),
            ("stability/max_drawdown", -1),
            ("stability/reward_noise_deff", -1),
            ("stability/grad_spikes", -1),
        ),
    ),
    Hypothesis(
        "H2",
        "accuracy",
        "AV-DPPO reaches higher greedy eval accuracy (paired per-problem outcomes)",
        ("eval/greedy_pass@1", +1),
        (("eval/mean@k", +1), ("eval/pass@k", +1)),
    ),
    Hypothesis(
        "H3",
        "rare-token utility",
        "AV-DPPO generates a larger share of rare tokens the corpus holds, with accuracy shown "
        "non-inferior",
        ("rare/share_rare_seen", +1),
        (("rare/distinct_rare_per_1k", +1), ("eval/acc_rare_answer", +1)),
        guard=("eval/greedy_pass@1", +1),
    ),
    Hypothesis(
        "H4",
        "coherence",
        "AV-DPPO generations are not less coherent: NLL under the initial model not worse by more "
        "than the margin",
        ("coherence/nll", -1),
        (("coherence/garbage_share", -1), ("coherence/unseen_token_share", -1)),
        kind=NON_INFERIORITY,
    ),
)

# secondary metrics compared for every method against the baseline (favourable direction)
SECONDARY_METRICS: tuple[tuple[str, int], ...] = tuple(
    dict.fromkeys(
        [h.primary for h in HYPOTHESES]
        + [m for h in HYPOTHESES for m in h.secondary]
        + [("train/reward_last10", +1), ("stability/grad_norm_p99", -1), ("rare/distinct_2", +1)]
    )
)


@dataclass(frozen=True)
class Plan:
    """Which comparison is primary for each hypothesis: {key: (method, baseline)}."""

    comparisons: dict[str, tuple[str, str]]
    declared: bool
    note: str
    margins: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MARGINS))
    margins_declared: tuple[str, ...] = ()  # the keys grid.json declared (the rest are defaults)


@dataclass
class HypothesisResult:
    hypothesis: Hypothesis
    method: str
    baseline: str
    result: PairedResult | None
    guard: PairedResult | None = None
    p_holm: float = math.nan
    label: str = INCONCLUSIVE
    notes: list[str] = field(default_factory=list)
    level: float = math.nan  # the per-test level a lone effect needs after Holm: alpha / family
    mde: float = math.nan  # detectable with 80% power at that level and this n
    seeds_needed: int | None = None  # for 80% power at the observed difference, same level
    margin: float = math.nan  # declared margin of the primary metric
    p_equiv: float = math.nan  # TOST p (superiority hypotheses), Holm-adjusted across them
    guard_state: str = ""  # H3: "shown", "inferior", "not shown" or "" (no guard data)


@dataclass(frozen=True)
class SecondaryRow:
    method: str
    metric: str
    direction: int
    result: PairedResult
    p_holm: float


# ----------------------------------------------------------------------------------------------
# the plan


def resolve_plan(
    grid: Mapping[str, Any], methods: Sequence[str], baseline: str
) -> Plan:
    """Primary comparisons from grid.json's `primary`, or the default: the first method of family
    "av-dppo" against `baseline`. A bad spec raises ValueError naming the field."""
    spec = grid.get("primary")
    if spec is None:
        meta = grid.get("methods", {})
        av = [m for m in methods if m != baseline and meta.get(m, {}).get("family") == AV_FAMILY]
        if not av:
            return Plan({}, False, f'no primary declared and no method of family "{AV_FAMILY}"')
        comps = {h.key: (av[0], baseline) for h in HYPOTHESES}
        return Plan(comps, False, f"defaulted (grid.json has no `primary`): first {AV_FAMILY} "
                    f"method `{av[0]}` vs `{baseline}`")
    if not isinstance(spec, Mapping):
        raise ValueError(f"grid.primary must be an object, got {spec!r}")
    keys = {h.key for h in HYPOTHESES}
    unknown = set(spec) - {"method", "baseline", "margins"} - keys
    if unknown:
        raise ValueError(f"grid.primary: unknown key(s) {sorted(unknown)}; known: method, "
                         f"baseline, margins, {', '.join(sorted(keys))}")
    comps = {}
    for h in HYPOTHESES:
        over = spec.get(h.key, {})
        if not isinstance(over, Mapping) or set(over) - {"method", "baseline"}:
            raise ValueError(f"grid.primary.{h.key} must be {{'method': ..., 'baseline': ...}}, got {over!r}")
        m = over.get("method", spec.get("method"))
        b = over.get("baseline", spec.get("baseline", baseline))
        for what, name in (("method", m), ("baseline", b)):
            if name not in methods:
                raise ValueError(f"grid.primary.{h.key}.{what}: {name!r} has no runs; have {list(methods)}")
        comps[h.key] = (m, b)
    margins = spec.get("margins", {})
    return Plan(comps, True, "declared in grid.json", resolve_margins(margins),
                tuple(margins) if isinstance(margins, Mapping) else ())


def resolve_margins(spec: Any) -> dict[str, float]:
    """DEFAULT_MARGINS updated by grid.primary.margins ({"H2": 0.05, "H3_guard": 0.05, ...});
    ValueError naming the field for an unknown key or a margin that is not a positive number."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"grid.primary.margins must be an object, got {spec!r}")
    out = dict(DEFAULT_MARGINS)
    for k, v in spec.items():
        if k not in out:
            raise ValueError(f"grid.primary.margins: unknown key {k!r}; known: {', '.join(out)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"grid.primary.margins.{k} must be a positive number, got {v!r}")
        out[k] = float(v)
    return out


# ----------------------------------------------------------------------------------------------
# one comparison


def _common_seeds(*per_seed: Mapping[Any, Any]) -> list[Any]:
    first, *rest = per_seed
    return [s for s in first if all(s in r for r in rest)]


def problem_matrices(
    problems: Problems, method: str, baseline: str, index: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """[seeds, problems] outcome matrices on the seeds and problem ids both methods have (and measured)."""
    a, b = problems.get(method, {}), problems.get(baseline, {})
    seeds = _common_seeds(a, b)
    if not seeds:
        return None
    ids = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    if not ids:
        return None
    order = sorted(ids, key=str)
    ma = np.array([[a[s][i][index] for i in order] for s in seeds], dtype=np.float64)
    mb = np.array([[b[s][i][index] for i in order] for s in seeds], dtype=np.float64)
    measured = np.isfinite(ma).all(0) & np.isfinite(mb).all(0)  # mean@k is NaN for a greedy-only evaluation
    if not measured.any():
        return None
    return ma[:, measured], mb[:, measured]


def compare(
    summaries: Summaries,
    problems: Problems | None,
    method: str,
    baseline: str,
    metric: str,
    alpha: float = 0.05,
) -> PairedResult | None:
    """method - baseline on one metric: per-problem cluster test for accuracy when problem outcomes
    exist, else a paired t-test over seeds. None if no seed has both."""
    if problems and metric in PROBLEM_FIELDS:
        mats = problem_matrices(problems, method, baseline, PROBLEM_FIELDS[metric])
        if mats is not None:
            return accuracy_test(*mats, alpha=alpha)
    a, b = summaries.get(method, {}), summaries.get(baseline, {})
    seeds = [s for s in _common_seeds(a, b) if metric in a[s] and metric in b[s]]
    if not seeds:
        return None
    return paired_test([a[s][metric] for s in seeds], [b[s][metric] for s in seeds], alpha)


def _signed(r: PairedResult | None, direction: int, p: float, alpha: float) -> int:
    """+1 significant and favourable, -1 significant and unfavourable, 0 otherwise."""
    if r is None or not math.isfinite(p) or p >= alpha or r.diff == 0:
        return 0
    return 1 if np.sign(r.diff) == direction else -1


# ----------------------------------------------------------------------------------------------
# verdicts


def primary_p(h: Hypothesis, r: PairedResult | None, margin: float) -> float:
    """The p-value that enters the Holm family: two-sided superiority, or for non-inferiority the
    two-sided test of diff = -direction * margin."""
    if r is None:
        return math.nan
    return r.p if h.kind == SUPERIORITY else shifted_pvalue(r, -h.primary[1] * margin)


def _label(h: Hypothesis, r: PairedResult | None, p_holm: float, margin: float, alpha: float) -> str:
    if h.kind == SUPERIORITY:
        return {1: SUPPORTED, -1: CONTRADICTED, 0: INCONCLUSIVE}[_signed(r, h.primary[1], p_holm, alpha)]
    if r is None or not math.isfinite(p_holm) or p_holm >= alpha:
        return INCONCLUSIVE
    return SUPPORTED if h.primary[1] * r.diff > -margin else CONTRADICTED


def guard_state(g: PairedResult | None, direction: int, margin: float, alpha: float) -> str:
    """Non-inferiority of a guard metric at level alpha: "shown" (the (1 - alpha) interval is above
    -margin in the favourable direction), "inferior" (below it), "not shown", or "" (no data)."""
    if g is None or g.n < 2:
        return ""
    p = shifted_pvalue(g, -direction * margin)
    if not (math.isfinite(p) and p < alpha):
        return "not shown"
    return "shown" if direction * g.diff > -margin else "inferior"


def _apply_guard(r: HypothesisResult, margin: float, alpha: float) -> None:
    h = r.hypothesis
    if h.guard is None:
        return
    r.guard_state = guard_state(r.guard, h.guard[1], margin, alpha)
    if r.guard_state == "inferior":
        r.notes.append(f"guard {h.guard[0]} is worse than the non-inferiority margin {margin:g}")
        if r.label == SUPPORTED:
            r.label = CONTRADICTED
    elif r.label == SUPPORTED and r.guard_state != "shown":
        r.notes.append(f"guard {h.guard[0]}: non-inferiority within {margin:g} not shown")
        r.label = INCONCLUSIVE


def _apply_equivalence(out: list[HypothesisResult], alpha: float) -> None:
    """TOST within each superiority hypothesis' margin, Holm-corrected across them; an INCONCLUSIVE
    headline whose difference is shown to lie within +/- the margin becomes EQUIVALENT."""
    sup = [r for r in out if r.hypothesis.kind == SUPERIORITY]
    p = adjust([tost_pvalue(r.result, r.margin) if r.result is not None else math.nan for r in sup], "holm")
    for r, q in zip(sup, p, strict=True):
        r.p_equiv = float(q)
        significant = math.isfinite(r.p_holm) and r.p_holm < alpha
        if r.label == INCONCLUSIVE and not significant and math.isfinite(q) and q < alpha:
            r.label = EQUIVALENT


def evaluate_hypotheses(
    summaries: Summaries,
    problems: Problems | None,
    plan: Plan,
    alpha: float = 0.05,
) -> list[HypothesisResult]:
    """Headline verdicts: primary tests, Holm-corrected across the hypotheses (see the module doc)."""
    out = []
    for h in HYPOTHESES:
        if h.key not in plan.comparisons:
            out.append(HypothesisResult(h, "", "", None, notes=[plan.note]))
            continue
        m, b = plan.comparisons[h.key]
        r = compare(summaries, problems, m, b, h.primary[0], alpha)
        g = compare(summaries, problems, m, b, h.guard[0], alpha) if h.guard else None
        out.append(HypothesisResult(h, m, b, r, g, margin=plan.margins.get(h.key, math.nan)))
    p_holm = adjust([primary_p(r.hypothesis, r.result, r.margin) for r in out], "holm")
    family = max(1, int(np.isfinite(p_holm).sum()))
    for r, p in zip(out, p_holm, strict=True):
        r.p_holm = float(p)
        r.level = alpha / family
        if r.result is not None:
            r.mde = mde(r.result.sd, r.result.n, r.level)
            r.seeds_needed = seeds_needed(r.result.diff, r.result.sd, r.level)
        r.label = _label(r.hypothesis, r.result, r.p_holm, r.margin, alpha)
        _apply_guard(r, plan.margins.get(f"{r.hypothesis.key}_guard", DEFAULT_MARGINS["H3_guard"]), alpha)
        if r.method and (r.result is None or r.result.n == 0):
            r.notes.append(f"no paired data for {r.hypothesis.primary[0]}")
        elif r.result is not None and r.result.n < 2:
            r.notes.append(f"{r.result.n} paired seed: nothing can be tested")
    _apply_equivalence(out, alpha)
    return out


def secondary_tests(
    summaries: Summaries,
    problems: Problems | None,
    methods: Iterable[str],
    baseline: str,
    primary: Iterable[tuple[str, str, str]] = (),
    metrics: Sequence[tuple[str, int]] = SECONDARY_METRICS,
    alpha: float = 0.05,
) -> list[SecondaryRow]:
    """Every method x metric against `baseline` except the primary (method, baseline, metric)
    comparisons; p-values Holm-adjusted across the whole table."""
    skip = set(primary)
    rows = []
    for m in methods:
        if m == baseline:
            continue
        for metric, d in metrics:
            if (m, baseline, metric) in skip:
                continue
            r = compare(summaries, problems, m, baseline, metric, alpha)
            if r is not None:
                rows.append((m, metric, d, r))
    adj = adjust([r.p for *_, r in rows], "holm")
    return [SecondaryRow(m, k, d, r, float(p)) for (m, k, d, r), p in zip(rows, adj, strict=True)]


def secondary_findings(rows: Sequence[SecondaryRow], alpha: float = 0.05) -> list[SecondaryRow]:
    """Secondary comparisons significant after the Holm correction."""
    return [r for r in rows if math.isfinite(r.p_holm) and r.p_holm < alpha]
