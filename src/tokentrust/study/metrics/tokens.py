"""What the generated tokens look like: shares per corpus-frequency bucket, distinct rare tokens,
distinct n-grams."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _flat_ids(token_ids: Any) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.reshape(-1).long()
    if isinstance(token_ids, np.ndarray):
        return torch.as_tensor(token_ids.reshape(-1), dtype=torch.long)
    parts: list[int] = []
    for x in token_ids:
        if isinstance(x, (int, np.integer)):
            parts.append(int(x))
        else:
            parts.extend(_flat_ids(x).tolist())
    return torch.tensor(parts, dtype=torch.long)


def bucket_shares(
    token_ids: Any,
    bucket_of_token: torch.Tensor,
    num_buckets: int,
    mask: torch.Tensor | None = None,
) -> np.ndarray:
    """Share of generated tokens falling in each corpus-frequency bucket, float64 [num_buckets].

    `token_ids`: a tensor (any shape; `mask` selects the generated positions) or nested lists of
    ids. All-NaN if there are no tokens.
    """
    ids = _flat_ids(token_ids)
    if mask is not None:
        ids = ids[torch.as_tensor(mask).reshape(-1).bool()]
    if ids.numel() == 0:
        return np.full(num_buckets, np.nan)
    b = torch.as_tensor(bucket_of_token, dtype=torch.long)[ids]
    counts = torch.bincount(b, minlength=num_buckets)[:num_buckets]
    return (counts.double() / ids.numel()).numpy()


def distinct_rare_per_1k(token_ids_list: Any, rare_mask: torch.Tensor) -> float:
    """Distinct rare token types used per 1,000 generated tokens (all tokens in the denominator)."""
    ids = _flat_ids(token_ids_list)
    if ids.numel() == 0:
        return float("nan")
    rare = ids[torch.as_tensor(rare_mask, dtype=torch.bool)[ids]]
    return 1000.0 * torch.unique(rare).numel() / ids.numel()


def distinct_n(sequences: Any, n: int) -> float:
    """Distinct n-grams / total n-grams over all sequences (n-grams never cross sequences).

    `sequences`: token-id sequences (lists / tensors) or texts (str, split on whitespace); a single
    str counts as one text. 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if isinstance(sequences, str):
        sequences = [sequences]
    total, seen = 0, set()
    for s in sequences:
        toks = s.split() if isinstance(s, str) else _flat_ids(s).tolist()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0
