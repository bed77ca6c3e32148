"""Curves of a run's step records (RUN_DIR/metrics.jsonl, read by `tokentrust.train.rundir.load_metrics`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Record = Mapping[str, Any]


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


# ----------------------------------------------------------------------------------------------
# per-bucket tables and correlations

_BUCKET_RE = re.compile(r"^(?P<name>.+)/bucket_(?P<i>\d+)(?P<suffix>/pos|/neg)?$")


def bucket_table(records: Sequence[Record], prefix: str = "trust_region") -> dict[str, np.ndarray]:
    """Per-bucket metrics `<prefix>/<name>/bucket_<i>[/pos|/neg]` averaged over the steps that
    logged them. Returns {"<name>[/pos|/neg]": float64 [num_buckets]} (NaN where never logged),
    e.g. {"kept_frac": ..., "kept_frac/pos": ..., "delta_mean": ...}."""
    sums: dict[str, dict[int, float]] = {}
    counts: dict[str, dict[int, int]] = {}
    pre = prefix.rstrip("/") + "/"
    for r in records:
        for k, v in r.items():
            if not k.startswith(pre):
                continue
            m = _BUCKET_RE.match(k[len(pre) :])
            x = _finite(v)
            if m is None or x is None:
                continue
            name, i = m["name"] + (m["suffix"] or ""), int(m["i"])
            sums.setdefault(name, {})
            counts.setdefault(name, {})
            sums[name][i] = sums[name].get(i, 0.0) + x
            counts[name][i] = counts[name].get(i, 0) + 1
    nb = 1 + max((i for d in sums.values() for i in d), default=-1)
    out = {}
    for name in sorted(sums):
        a = np.full(nb, np.nan)
        for i, s in sums[name].items():
            a[i] = s / counts[name][i]
        out[name] = a
    return out


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN if either input is constant or there are < 2 points."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled)."""
    from scipy.stats import rankdata  # lazy: the adapters' environments import this module

    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    return pearson(rankdata(a), rankdata(b))
