"""Hypotheses about AV-DPPO, their declared primary comparisons, and calibrated verdicts.

Each hypothesis names ONE primary metric; the grid spec declares ONE primary comparison
(`"primary": {"method": ..., "baseline": ..., "H2": {"method": ...}}`, per-hypothesis overrides
allowed). A headline verdict comes only from the primary tests: two-sided at level alpha after a
Holm correction across the hypotheses (so a grid where nothing differs gets any non-INCONCLUSIVE
headline in at most alpha of cases). SUPPORTED: significant in the favourable direction;
CONTRADICTED: significant against it; else INCONCLUSIVE. H3 has an accuracy guard: a rare-token
gain that comes with a significant accuracy loss (primary comparison, level alpha) is
CONTRADICTED. Every other method x metric comparison is secondary: Holm-corrected across the
whole table, shown with effect sizes, and never changes a headline.

Inputs are plain dicts so the calibration tests drive exactly this code with synthetic numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokentrust.inference import PairedResult, accuracy_test, adjust, mde, paired_test, seeds_needed

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "SUPPORTED", "CONTRADICTED", "INCONCLUSIVE"
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


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis(
        "H1",
        "stability",
        "AV-DPPO trains more stably: less step-to-step reward noise beyond Bernoulli sampling noise",
        ("stability/reward_noise_norm", -1),
        (
            ("stability/collapse_count", -1),
            ("stability/max_drawdown", -1),
            ("stability/reward_diff_std", -1),
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
        "AV-DPPO generates a larger share of rare tokens without lower accuracy",
        ("rare/share_rare", +1),
        (("rare/distinct_rare_per_1k", +1), ("eval/acc_rare_answer", +1)),
        guard=("eval/greedy_pass@1", +1),
    ),
    Hypothesis(
        "H4",
        "coherence",
        "AV-DPPO generations are not less coherent (NLL under the initial model)",
        ("coherence/nll", -1),
        (("coherence/garbage_share", -1),),
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
    unknown = set(spec) - {"method", "baseline"} - keys
    if unknown:
        raise ValueError(f"grid.primary: unknown key(s) {sorted(unknown)}; known: method, "
                         f"baseline, {', '.join(sorted(keys))}")
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
    return Plan(comps, True, "declared in grid.json")


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


def evaluate_hypotheses(
    summaries: Summaries,
    problems: Problems | None,
    plan: Plan,
    alpha: float = 0.05,
) -> list[HypothesisResult]:
    """Headline verdicts: primary tests, Holm-corrected across the hypotheses."""
    out = []
    for h in HYPOTHESES:
        if h.key not in plan.comparisons:
            out.append(HypothesisResult(h, "", "", None, notes=[plan.note]))
            continue
        m, b = plan.comparisons[h.key]
        r = compare(summaries, problems, m, b, h.primary[0], alpha)
        g = compare(summaries, problems, m, b, h.guard[0], alpha) if h.guard else None
        out.append(HypothesisResult(h, m, b, r, g))
    p_holm = adjust([r.result.p if r.result is not None else math.nan for r in out], "holm")
    family = max(1, int(np.isfinite(p_holm).sum()))
    for r, p in zip(out, p_holm, strict=True):
        r.p_holm = float(p)
        r.level = alpha / family
        if r.result is not None:
            r.mde = mde(r.result.sd, r.result.n, r.level)
            r.seeds_needed = seeds_needed(r.result.diff, r.result.sd, r.level)
        sign = _signed(r.result, r.hypothesis.primary[1], r.p_holm, alpha)
        r.label = {1: SUPPORTED, -1: CONTRADICTED, 0: INCONCLUSIVE}[sign]
        if r.hypothesis.guard and r.guard is not None:
            if _signed(r.guard, r.hypothesis.guard[1], r.guard.p, alpha) < 0:
                r.notes.append(f"guard {r.hypothesis.guard[0]} is significantly worse")
                if r.label == SUPPORTED:
                    r.label = CONTRADICTED
        if r.method and (r.result is None or r.result.n == 0):
            r.notes.append(f"no paired data for {r.hypothesis.primary[0]}")
        elif r.result is not None and r.result.n < 2:
            r.notes.append(f"{r.result.n} paired seed: nothing can be tested")
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
