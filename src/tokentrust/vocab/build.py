"""Building a token-frequency table: count a corpus's tokens (text / JSONL files, folders of
them, or in-memory documents) with a tokenizer, and fingerprint the corpus."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tokentrust.vocab.table import FrequencyTable
from tokentrust.vocab.tokenizer import _tokenizer_display_name, special_token_ids, tokenizer_hash

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md")


def _iter_source_docs(
    source: Any,
    fields: list[str],
    on_error: str,
    text_unit: str,
    stats: dict[str, int],
) -> Iterator[str]:
    """Documents of one source: a text/JSONL file path, a directory of them, or an iterable of str."""
    if not isinstance(source, (str, os.PathLike)):
        for i, doc in enumerate(source):
            if not isinstance(doc, str):
                raise TypeError(f"document {i} of an in-memory source is {type(doc).__name__}, not str")
            yield doc
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _JSONL_SUFFIXES + _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"no .jsonl/.txt files under {path}")
        for p in files:
            yield from _iter_source_docs(p, fields, on_error, text_unit, stats)
        return
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    try:
        if path.suffix in _JSONL_SUFFIXES:
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                        missing = [k for k in fields if row.get(k) is None]
                        if missing:
                            raise ValueError(f"missing field(s) {missing}")
                        yield "\n".join(str(row[k]) for k in fields)
                    except ValueError as e:  # json.JSONDecodeError is a ValueError
                        if on_error == "raise":
                            raise ValueError(f"{path}:{lineno}: malformed JSONL line: {e}") from None
                        stats["skipped_lines"] += 1
        elif text_unit == "file":
            yield path.read_text(encoding="utf-8")
        else:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None


def _field_list(field: str, on_error: str, text_unit: str, batch_size: int) -> list[str]:
    """The arguments of `build_frequency_table` checked; the JSONL fields to read."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if text_unit not in ("line", "file"):
        raise ValueError(f"text_unit must be 'line' or 'file', got {text_unit!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    fields = [f.strip() for f in field.split(",") if f.strip()]
    if not fields:
        raise ValueError(f"empty field spec {field!r}")
    return fields


def _source_name(src: Any, fields: list[str]) -> str:
    if isinstance(src, (str, os.PathLike)):
        desc = str(src)
        if Path(src).suffix in _JSONL_SUFFIXES or Path(src).is_dir():
            desc += f"[{','.join(fields)}]"
        return desc
    return f"<{type(src).__name__}>"


class _Counts:
    """Token counts and the corpus fingerprint, fed one document at a time, tokenized by batch."""

    def __init__(self, tokenizer: Any, fields: list[str], progress: Callable[[int, int], None] | None):
        self.tokenizer, self.progress = tokenizer, progress
        self.vocab_size = len(tokenizer)
        self.counts = np.zeros(self.vocab_size, dtype=np.int64)
        self.hasher = hashlib.sha256()
        self.hasher.update(f"tokentrust-corpus-v1 fields={','.join(fields)}\n".encode())
        self.num_docs = 0
        self.tokens = 0
        self.batch: list[str] = []

    def add(self, doc: str) -> None:
        b = doc.encode("utf-8")
        self.hasher.update(len(b).to_bytes(8, "little"))
        self.hasher.update(b)
        self.batch.append(doc)
        self.num_docs += 1

    def flush(self) -> None:
        ids = self.tokenizer(self.batch, add_special_tokens=False)["input_ids"]
        self.batch = []
        flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int64)
        if flat.size:
            if int(flat.max()) >= self.vocab_size or int(flat.min()) < 0:
                raise ValueError(f"tokenizer produced id {int(flat.max())} outside len(tokenizer)={self.vocab_size}")
            self.counts[:] += np.bincount(flat, minlength=self.vocab_size)
        self.tokens += int(flat.size)
        if self.progress is not None:
            self.progress(self.num_docs, self.tokens)


def build_frequency_table(
    tokenizer: Any,
    sources: str | os.PathLike | Iterable[Any],
    *,
    field: str = "text",
    batch_size: int = 1000,
    max_docs: int | None = None,
    tokenizer_name: str | None = None,
    on_error: str = "raise",
    text_unit: str = "line",
    progress: Callable[[int, int], None] | None = None,
) -> FrequencyTable:
    """Count the tokens of a corpus with `tokenizer` (no special tokens added).

    `sources` is one source or a list of them. A source is a path (str/PathLike) to a JSONL file
    (`.jsonl`/`.ndjson`: the value of `field`; "question,answer" joins several fields with a
    newline), a text file (one document per non-empty line, or the whole file with
    text_unit="file"), a directory of such files, or any other iterable of document strings.
    Malformed JSONL lines raise ValueError with file:line, or are skipped and counted in
    meta["skipped_lines"] with on_error="skip". The vocabulary size is len(tokenizer).
    `progress(docs, tokens)` is called after each batch of documents is counted.
    """
    fields = _field_list(field, on_error, text_unit, batch_size)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)

    counts = _Counts(tokenizer, fields, progress)
    stats = {"skipped_lines": 0}
    descriptions = []
    done = False
    for src in sources:
        descriptions.append(_source_name(src, fields))
        for doc in _iter_source_docs(src, fields, on_error, text_unit, stats):
            counts.add(doc)
            if len(counts.batch) >= batch_size:
                counts.flush()
            if max_docs is not None and counts.num_docs >= max_docs:
                done = True
                break
        if done:
            break
    if counts.batch:
        counts.flush()

    name = tokenizer_name or _tokenizer_display_name(tokenizer)
    return FrequencyTable(
        counts=torch.from_numpy(counts.counts),
        tokenizer_name=name,
        vocab_size=counts.vocab_size,
        fingerprint=counts.hasher.hexdigest(),
        source="; ".join(descriptions),
        tokenizer_hash=tokenizer_hash(tokenizer),
        special_ids=special_token_ids(tokenizer),
        meta={
            "num_docs": counts.num_docs,
            "skipped_lines": stats["skipped_lines"],
            "field": ",".join(fields),
            "max_docs": max_docs,
            "text_unit": text_unit,
        },
    )
