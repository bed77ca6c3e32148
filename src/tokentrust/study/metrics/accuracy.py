"""Accuracy from per-problem outcomes: greedy pass@1, mean@k, unbiased pass@k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, Codex), which never forms the
    huge binomials.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_matrix: Sequence[Sequence[float]] | np.ndarray, k: int) -> float:
    """pass@k averaged over problems; row i holds the 0/1 correctness of problem i's n samples."""
    rows = [np.asarray(r, dtype=np.float64) for r in correct_matrix]
    if not rows:
        return float("nan")
    return float(np.mean([pass_at_k(len(r), int((r > 0.5).sum()), k) for r in rows]))


def mean_at_k(correct_matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """mean@k: per-problem mean correctness over its k samples, averaged over problems."""
    rows = [np.asarray(r, dtype=np.float64) for r in correct_matrix]
    rows = [r for r in rows if r.size]
    if not rows:
        return float("nan")
    return float(np.mean([r.mean() for r in rows]))


def greedy_pass_at_1(correct: Sequence[float] | np.ndarray) -> float:
    """Fraction of problems whose single greedy completion is correct."""
    a = np.asarray(correct, dtype=np.float64).reshape(-1)
    return float(a.mean()) if a.size else float("nan")
