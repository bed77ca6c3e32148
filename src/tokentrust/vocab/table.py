"""The token-frequency table: save/load safely, rarity and frequency buckets (built by
`tokentrust.vocab.build`).

A `FrequencyTable` holds the unigram counts of every token id of one tokenizer over a reference
corpus. AV-DPPO turns it into a per-token rarity rho(v) = -log f(v) (f = add-alpha smoothed
unigram probability) and the metrics group tokens into buckets by cumulative token mass.

Files are a single safetensors file: the int64 `counts` tensor plus JSON-encoded metadata in the
safetensors header (never pickle). A sha256 of the counts is stored so tampering is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokentrust.vocab.tokenizer import _tokenizer_display_name, tokenizer_hash

FORMAT_VERSION = 2  # 2: special token ids recorded
DEFAULT_EDGES: tuple[float, ...] = (0.5, 0.8, 0.95, 0.99)
RARE_MASS = 0.95  # "rare" = beyond this share of the corpus token mass (or unseen)


class VocabMismatchError(ValueError):
    """A frequency table was built with a different tokenizer than the one in use."""


def num_buckets(edges: Sequence[float] = DEFAULT_EDGES) -> int:
    """Bucket ids used by `FrequencyTable.buckets`: len(edges) + 1 mass buckets, unseen, special."""
    return len(edges) + 3


def rare_from(edges: Sequence[float] = DEFAULT_EDGES) -> int:
    """First mass bucket whose tokens all lie beyond RARE_MASS of the token mass.

    Bucket i covers mass shares [edges[i-1], edges[i]), so it is rare iff edges[i-1] >= RARE_MASS.
    """
    return next((i + 1 for i, e in enumerate(edges) if e >= RARE_MASS - 1e-12), len(edges) + 1)


@dataclass(frozen=True)
class TokenInfo:
    """Per-vocabulary-id lookups of a frequency table, padded to a model's number of output rows
    (ids the table does not know behave as unseen tokens). All tensors are [rows]."""

    rarity: torch.Tensor  # float32, rho = -log f
    bucket: torch.Tensor  # long: 0..len(edges) mass buckets, len(edges)+1 unseen, len(edges)+2 special
    rare: torch.Tensor  # bool: beyond RARE_MASS of the token mass, or unseen; never special
    special: torch.Tensor  # bool
    num_buckets: int
    rho_ref: float  # corpus token-mass weighted mean rarity (special tokens excluded)

    def to(self, device: torch.device | str) -> TokenInfo:
        return TokenInfo(self.rarity.to(device), self.bucket.to(device), self.rare.to(device),
                         self.special.to(device), self.num_buckets, self.rho_ref)


# ----------------------------------------------------------------------------------------------
# the table


@dataclass
class FrequencyTable:
    """Unigram token counts of one tokenizer over one corpus."""

    counts: torch.Tensor  # int64 [V]
    tokenizer_name: str
    vocab_size: int
    fingerprint: str  # sha256 of the counted documents (stable across machines)
    source: str  # human description of the corpus
    tokenizer_hash: str = ""  # see `tokenizer_hash`; empty if unknown
    meta: dict[str, Any] = field(default_factory=dict)  # num_docs, skipped_lines, field, ...
    special_ids: list[int] = field(default_factory=list)  # EOS, pad, BOS, chat markers: see `special_token_ids`

    def __post_init__(self) -> None:
        counts = torch.as_tensor(self.counts)
        if counts.ndim != 1:
            raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError(f"counts must be integer, got {counts.dtype}")
        counts = counts.to(torch.int64)
        if counts.numel() != self.vocab_size:
            raise ValueError(f"counts has {counts.numel()} entries but vocab_size={self.vocab_size}")
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError("counts must be non-negative")
        self.counts = counts
        self.special_ids = sorted({int(i) for i in self.special_ids})
        if self.special_ids and not 0 <= self.special_ids[0] <= self.special_ids[-1] < self.vocab_size:
            raise ValueError(f"special_ids must lie in [0, {self.vocab_size}), got {self.special_ids}")

    @property
    def num_tokens(self) -> int:
        """Total number of counted tokens."""
        return int(self.counts.sum())

    def special_mask(self) -> torch.Tensor:
        """bool [V]: True on special token ids."""
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        m[self.special_ids] = True
        return m

    def _regular_counts(self) -> torch.Tensor:
        """Counts with special tokens zeroed: they carry no corpus-frequency signal (a corpus
        tokenized without special tokens never counts EOS), so they join no mass bucket."""
        if not self.special_ids:
            return self.counts
        c = self.counts.clone()
        c[self.special_ids] = 0
        return c

    def token_info(self, rows: int | None = None, edges: Sequence[float] = DEFAULT_EDGES) -> TokenInfo:
        """Rarity, bucket, rare and special lookups for ids 0..rows-1 (default: the table's size).

        A model may have more output rows than its tokenizer has tokens (Qwen: 152,064 vs
        151,665); the extra ids get the rarity and bucket of an unseen token.
        """
        rows = self.vocab_size if rows is None else int(rows)
        if rows < self.vocab_size:
            raise ValueError(f"rows ({rows}) must be >= the table's vocab size ({self.vocab_size})")
        pad = rows - self.vocab_size
        rarity, bucket, special = self.rarity(), self.buckets(edges), self.special_mask()
        unseen = len(edges) + 1
        if pad:
            rarity = torch.cat([rarity, rarity.max().expand(pad)])
            bucket = torch.cat([bucket, bucket.new_full((pad,), unseen)])
            special = torch.cat([special, special.new_zeros(pad)])
        rare = (bucket >= rare_from(edges)) & (bucket <= unseen)
        return TokenInfo(rarity, bucket, rare, special, num_buckets(edges), self.reference_rarity())

    # -- probabilities and rarity --------------------------------------------------------------

    def probabilities(self, alpha: float = 1.0) -> torch.Tensor:
        """Add-alpha smoothed unigram probabilities f(v) = (c_v + alpha) / (N + alpha V), float32."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        total = self.num_tokens + alpha * self.vocab_size
        if total <= 0:
            raise ValueError("empty frequency table with alpha=0 has no probabilities")
        return ((self.counts.double() + alpha) / total).float()

    def rarity(self, alpha: float = 1.0) -> torch.Tensor:
        """rho(v) = -log f(v), float32 [V] (inf for unseen tokens when alpha=0)."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        total = self.num_tokens + alpha * self.vocab_size
        if total <= 0:
            raise ValueError("empty frequency table with alpha=0 has no rarity")
        return (np.log(total) - torch.log(self.counts.double() + alpha)).float()

    def reference_rarity(self, quantile: float | None = None, alpha: float = 1.0) -> float:
        """rho_ref: the token-mass weighted mean of rho (sum_v c_v/N rho(v)), or, with `quantile`,
        the smallest rho such that tokens with rarity <= it hold at least that share of mass."""
        counts = self._regular_counts()
        n = int(counts.sum())
        if n == 0:
            raise ValueError("reference rarity of an empty frequency table is undefined")
        rho = self.rarity(alpha).double()
        seen = counts > 0
        w = counts[seen].double() / n
        r = rho[seen]
        if quantile is None:
            return float((w * r).sum())
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        order = torch.argsort(r, stable=True)
        cum = torch.cumsum(w[order], 0)
        # searchsorted with a small tolerance so quantile=1.0 survives float rounding.
        i = int(torch.searchsorted(cum, torch.tensor([quantile - 1e-12], dtype=cum.dtype)))
        return float(r[order][min(i, r.numel() - 1)])

    # -- buckets -------------------------------------------------------------------------------

    def buckets(self, edges: Sequence[float] = DEFAULT_EDGES) -> torch.Tensor:
        """Bucket id per token id, LongTensor [V].

        Seen tokens are sorted by count (descending); a token goes to bucket i = number of edges
        <= the cumulative mass share of all strictly more frequent tokens. Bucket 0 therefore
        holds the most frequent tokens covering the first edges[0] of the mass (the token that
        crosses the edge included), bucket len(edges) the rarest seen tokens. Tokens with equal
        counts always share a bucket (decided by the mass before their group), so the result does
        not depend on token ids. Unseen tokens (count 0) get bucket len(edges) + 1, special
        tokens bucket len(edges) + 2; neither counts towards the mass shares.
        """
        edges_t = _check_edges(edges)
        v = self.vocab_size
        out = torch.full((v,), len(edges_t) + 1, dtype=torch.long)
        out[self.special_ids] = len(edges_t) + 2
        c = self._regular_counts()
        n = int(c.sum())
        if n == 0:
            return out
        order = torch.argsort(c, descending=True, stable=True)
        sc = c[order]
        seen = sc > 0
        order, sc = order[seen], sc[seen]
        # mass strictly before each token's tie group = total mass of tokens with larger count.
        before_incl = torch.cumsum(sc, 0) - sc  # mass before this token in sorted order
        # first index of each tie group -> its before_incl
        new_group = torch.ones_like(sc, dtype=torch.bool)
        new_group[1:] = sc[1:] != sc[:-1]
        group_id = torch.cumsum(new_group.long(), 0) - 1
        group_start = before_incl[new_group][group_id]
        share = group_start.double() / n
        out[order] = torch.searchsorted(edges_t, share, right=True)
        return out

    @staticmethod
    def bucket_names(edges: Sequence[float] = DEFAULT_EDGES) -> list[str]:
        """Human labels for the bucket ids returned by `buckets(edges)`."""
        e = [0.0, *[float(x) for x in _check_edges(edges)], 1.0]
        names = [f"{100 * lo:g}-{100 * hi:g}% mass" for lo, hi in zip(e[:-1], e[1:])]
        names[0] += " (most frequent)"
        names[-1] += " (rarest seen)"
        return names + ["unseen", "special"]

    def bucket_table(self, edges: Sequence[float] = DEFAULT_EDGES) -> list[dict[str, Any]]:
        """Per bucket: id, label, number of token types and share of token mass."""
        b = self.buckets(edges)
        n = max(int(self._regular_counts().sum()), 1)
        rows = []
        for i, name in enumerate(self.bucket_names(edges)):
            sel = b == i
            rows.append(
                {
                    "bucket": i,
                    "name": name,
                    "types": int(sel.sum()),
                    "mass": float(self._regular_counts()[sel].sum()) / n,
                }
            )
        return rows

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a single safetensors file (atomic rename); metadata as JSON strings."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = self.counts.contiguous()
        metadata = {
            "format": "tokentrust.FrequencyTable",
            "format_version": str(FORMAT_VERSION),
            "tokenizer_name": json.dumps(self.tokenizer_name),
            "tokenizer_hash": json.dumps(self.tokenizer_hash),
            "vocab_size": json.dumps(int(self.vocab_size)),
            "num_tokens": json.dumps(self.num_tokens),
            "fingerprint": json.dumps(self.fingerprint),
            "source": json.dumps(self.source),
            "meta": json.dumps(self.meta, sort_keys=True),
            "special_ids": json.dumps(self.special_ids),
            "counts_sha256": hashlib.sha256(counts.numpy().tobytes()).hexdigest(),
        }
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"counts": counts}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        tokenizer: Any = None,
        expected_vocab_size: int | None = None,
    ) -> FrequencyTable:
        """Read a table written by `save`. With `tokenizer` / `expected_vocab_size`, check that the
        table matches (raise `VocabMismatchError` otherwise). Corrupt files raise `ValueError`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"frequency table not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                counts = f.get_tensor("counts")
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise ValueError(f"cannot read frequency table {path}: file is truncated or corrupt ({e})") from e
        try:
            if md.get("format") != "tokentrust.FrequencyTable":
                raise ValueError("not a tokentrust frequency table (missing 'format' metadata)")
            if int(md["format_version"]) > FORMAT_VERSION:
                raise ValueError(f"format_version {md['format_version']} is newer than this tokentrust")
            digest = hashlib.sha256(counts.contiguous().numpy().tobytes()).hexdigest()
            if digest != md["counts_sha256"]:
                raise ValueError("counts checksum mismatch (file was modified)")
            table = cls(
                counts=counts,
                tokenizer_name=json.loads(md["tokenizer_name"]),
                vocab_size=int(json.loads(md["vocab_size"])),
                fingerprint=json.loads(md["fingerprint"]),
                source=json.loads(md["source"]),
                tokenizer_hash=json.loads(md.get("tokenizer_hash", '""')),
                meta=json.loads(md.get("meta", "{}")),
                special_ids=json.loads(md.get("special_ids", "[]")),
            )
            if table.num_tokens != int(json.loads(md["num_tokens"])):
                raise ValueError("num_tokens metadata does not match the counts")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"invalid frequency table {path}: {e}") from e
        table.check_compatible(tokenizer, expected_vocab_size, path=path)
        return table

    def check_compatible(
        self, tokenizer: Any = None, expected_vocab_size: int | None = None, path: Any = None
    ) -> None:
        """Raise `VocabMismatchError` unless the table fits `tokenizer` / `expected_vocab_size`.

        The vocabulary size must equal len(tokenizer) (or expected_vocab_size). A tokenizer is
        accepted when its (token, id) hash equals the stored one, even if its name differs (hub
        id vs local copy); without a stored hash the names must match."""
        where = f"frequency table {path}" if path is not None else "frequency table"
        if tokenizer is None and expected_vocab_size is None:
            return
        name = _tokenizer_display_name(tokenizer) if tokenizer is not None else self.tokenizer_name
        size = len(tokenizer) if tokenizer is not None else None
        if expected_vocab_size is not None and size is None:
            size = int(expected_vocab_size)
        tok_arg = name if tokenizer is not None else "TOKENIZER"
        out_arg = path if path is not None else "table.safetensors"
        hint = f"rebuild it with: tokentrust vocab build --tokenizer {tok_arg} --input CORPUS --out {out_arg}"
        if expected_vocab_size is not None and size != expected_vocab_size:
            raise VocabMismatchError(
                f"tokenizer '{name}' has {size} tokens but expected_vocab_size={expected_vocab_size}"
            )
        if size != self.vocab_size:
            in_use = (
                f"the tokenizer in use is '{name}' (vocab size {size})"
                if tokenizer is not None
                else f"expected_vocab_size is {size}"
            )
            raise VocabMismatchError(
                f"{where} was built with tokenizer '{self.tokenizer_name}' (vocab size "
                f"{self.vocab_size}) but {in_use}; {hint}"
            )
        if tokenizer is None:
            return
        if self.tokenizer_hash:
            h = tokenizer_hash(tokenizer)
            if h != self.tokenizer_hash:
                raise VocabMismatchError(
                    f"{where} was built with tokenizer '{self.tokenizer_name}' (vocab size "
                    f"{self.vocab_size}, hash {self.tokenizer_hash[:12]}) but the tokenizer in use is "
                    f"'{name}' (vocab size {size}, hash {h[:12]}): same size, different tokens; {hint}"
                )
        elif name != self.tokenizer_name:
            raise VocabMismatchError(
                f"{where} was built with tokenizer '{self.tokenizer_name}' but the tokenizer in use is "
                f"'{name}' (both vocab size {size}); {hint}"
            )


def _check_edges(edges: Sequence[float]) -> torch.Tensor:
    e = torch.tensor([float(x) for x in edges], dtype=torch.float64)
    if e.numel() == 0 or bool((e <= 0).any() | (e >= 1).any()) or bool((e[1:] <= e[:-1]).any()):
        raise ValueError(f"bucket edges must be strictly increasing in (0, 1), got {list(edges)}")
    return e
