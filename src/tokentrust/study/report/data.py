"""Reading a grid for the report: its runs (finished ones only), their step records, summaries
and per-problem outcomes, and the primary and secondary tests on them (`analyse` -> `GridData`)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust.study.metrics import summarize_run
from tokentrust.study.report.tables import matched_seeds
from tokentrust.study.secondary import ContrastResult, evaluate_family, parse_family
from tokentrust.study.verdicts import (
    HYPOTHESES,
    HypothesisResult,
    Plan,
    SecondaryRow,
    evaluate_hypotheses,
    resolve_plan,
    secondary_tests,
)
from tokentrust.train.rundir import load_metrics, read_jsonl_tolerant

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
    for row in read_jsonl_tolerant(p):
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
    matched: list[Any] = field(default_factory=list)  # seeds every method ran (method tables use only these)
    family: list[ContrastResult] = field(default_factory=list)  # the declared secondary family, if any

    @property
    def methods(self) -> list[str]:
        return list(self.runs)

    @property
    def metric_keys(self) -> list[str]:
        return sorted({k for seeds in self.summaries.values() for s in seeds.values() for k in s})


def load_runs(grid_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[Any, Path]],
                                                    dict[str, dict[Any, list[dict[str, Any]]]], Summaries, Problems]:
    """grid.json, the finished runs, their step records, summaries and per-problem outcomes."""
    grid, runs = load_grid(grid_dir)
    records = {m: {s: load_metrics(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    summaries = {m: {s: summarize_run(p, records[m][s]) for s, p in seeds.items()} for m, seeds in runs.items()}
    problems = {m: {s: load_problems(p) for s, p in seeds.items()} for m, seeds in runs.items()}
    problems = {m: {s: v for s, v in seeds.items() if v} for m, seeds in problems.items()}
    return grid, runs, records, summaries, problems


def _family(g: Path, grid: dict[str, Any], summaries: Summaries, problems: Problems,
            alpha: float) -> list[ContrastResult]:
    """The declared secondary family (grid.secondary); a contrast's `grid` is a directory relative to g."""
    contrasts = parse_family(grid.get("secondary"))

    def load(other: str | None) -> tuple[Summaries, Problems]:
        if other is None:
            return summaries, problems
        _, _, _, s, p = load_runs(g / other)
        return s, p

    return evaluate_family(contrasts, load, alpha) if contrasts else []


def analyse(grid_dir: str | os.PathLike, baseline: str, alpha: float) -> GridData:
    """Load every run of the grid and run the primary, declared secondary and exploratory tests."""
    g = Path(grid_dir)
    grid, runs, records, summaries, problems = load_runs(g)
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} has no runs under {g / 'runs'}; have {sorted(runs)}")
    plan = resolve_plan(grid, list(runs), baseline)
    verdicts = evaluate_hypotheses(summaries, problems, plan, alpha)
    primary = {(m, b, h.primary[0]) for h in HYPOTHESES for k, (m, b) in plan.comparisons.items() if k == h.key}
    # dose-response cells are judged by their trend (report.sections), not by pairwise tests
    pairwise = [m for m in runs if grid.get("methods", {}).get(m, {}).get("family") != "dose"]
    secondary = secondary_tests(summaries, problems, pairwise, baseline, primary, alpha=alpha)
    return GridData(g, grid, runs, records, summaries, problems, baseline, alpha, plan, verdicts, secondary,
                    matched_seeds(runs), _family(g, grid, summaries, problems, alpha))
