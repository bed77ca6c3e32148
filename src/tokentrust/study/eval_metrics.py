"""Evaluation metrics that need the task or the vocabulary, not only correctness.

- Accuracy by answer class: for tasks whose answers need a word of graded frequency (arith's unit
  words, ``Task.answer_class``), greedy pass@1 and mean@k separately on problems whose required
  word is rare and on those where it is common. This tests "keeps rare but useful behaviour" directly.
- Garbage share: the share of sampled outputs holding at least one token that never occurs in the
  frequency table's corpus (special tokens excluded). The warm start is fitted to that corpus, so
  these are tokens it does not produce; a policy that drifts into them has lost coherence.

Used by ``tokentrust.study.evaluate`` when it evaluates and by ``scripts/backfill_eval_metrics.py`` for
evaluations written before these keys existed (from the stored problems.jsonl, same outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tokentrust.vocab import TokenInfo

ANSWER_CLASSES = ("rare", "common")


def unseen_tokens(info: TokenInfo) -> torch.Tensor:
    """bool [rows]: ids with zero corpus count (the unseen bucket); special tokens are never unseen."""
    return info.bucket == info.num_buckets - 2


def garbage_share(responses: Sequence[Sequence[int]], unseen: torch.Tensor) -> float:
    """Share of responses with at least one ``unseen`` token id (ids beyond the mask count as unseen)."""
    if not responses:
        return float("nan")
    rows = len(unseen)
    unseen_ids = set(unseen.nonzero().flatten().tolist())  # one lookup table, not a tensor index per token
    bad = sum(any(t >= rows or t in unseen_ids for t in r) for r in responses)
    return bad / len(responses)


def accuracy_by_answer_class(classes: Sequence[str | None], greedy_ok: Sequence[bool],
                             sample_ok: Sequence[Sequence[bool]]) -> dict[str, float]:
    """``acc_<class>_answer`` (greedy pass@1), ``mean@k_<class>_answer`` and ``num_<class>_answer``
    per answer class; problems of class None are left out; {} when no problem has a class."""
    out: dict[str, float] = {}
    if not any(c is not None for c in classes):
        return out
    for cls in ANSWER_CLASSES:
        idx = [i for i, c in enumerate(classes) if c == cls]
        out[f"num_{cls}_answer"] = float(len(idx))
        out[f"acc_{cls}_answer"] = float(np.mean([greedy_ok[i] for i in idx])) if idx else float("nan")
        means = [float(np.mean(sample_ok[i])) for i in idx if len(sample_ok[i])]
        out[f"mean@k_{cls}_answer"] = float(np.mean(means)) if means else float("nan")
    return out


def task_results(task: Any, golds: Sequence[str], greedy_ok: Sequence[bool], sample_ok: Sequence[Sequence[bool]],
                 responses: Sequence[Sequence[int]], info: TokenInfo | None) -> dict[str, Any]:
    """The keys this module adds to eval/results.json."""
    out: dict[str, Any] = accuracy_by_answer_class([task.answer_class(g) for g in golds], greedy_ok, sample_ok)
    if info is not None:
        out["garbage_share"] = garbage_share(responses, unseen_tokens(info))
    return out
