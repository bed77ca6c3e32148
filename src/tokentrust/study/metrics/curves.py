"""Reading a run's step log (RUN_DIR/metrics.jsonl) into records and curves."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = Mapping[str, Any]

# ----------------------------------------------------------------------------------------------
# reading logs


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping lines that are not complete JSON objects.

    A crash can leave a trailing partial line, and a resumed writer may then append to it, so an
    unparsable line anywhere is skipped (with a warning if it is not the last line).
    """
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    bad = 0
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # the last element has no trailing newline: a partial write
                bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return out


def load_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Step records of a run (RUN_DIR or RUN_DIR/metrics.jsonl), sorted by step.

    After a resume the same step can be logged twice; the later record wins.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    for i, rec in enumerate(read_jsonl(p)):
        by_step[rec.get("step", f"_row{i}")] = rec
    numeric = [k for k in by_step if isinstance(k, (int, float))]
    other = [k for k in by_step if not isinstance(k, (int, float))]
    return [by_step[k] for k in sorted(numeric)] + [by_step[k] for k in other]


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def curve(records: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric over the run, keeping only finite values."""
    steps, vals = [], []
    for i, r in enumerate(records):
        v = _finite(r.get(key))
        if v is None:
            continue
        s = _finite(r.get("step"))
        steps.append(float(i) if s is None else s)
        vals.append(v)
    return np.asarray(steps, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def _values(records: Sequence[Record], key: str) -> np.ndarray:
    return curve(records, key)[1]
