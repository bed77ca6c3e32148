"""Tokenizer helpers: loading one (hub id, folder, GGUF), a hash of its vocabulary, its special ids."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def load_tokenizer(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> Any:
    """Load a Hugging Face tokenizer from a hub id, a folder, a folder holding one GGUF file, or a
    `.gguf` file path (the tokenizer is read from the GGUF metadata)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        path, gguf_file = path.parent, path.name
    if gguf_file is None and path.is_dir() and not (path / "tokenizer.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(str(name_or_path))


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's (token, id) table, so the same vocabulary loaded from two
    different paths (hub id vs local copy vs GGUF) is recognised as the same."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens: EOS, BOS, pad, unk and every added token marked
    special (chat-template markers such as ``<|im_start|>``). Sorted, unique."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return sorted(i for i in ids if 0 <= i < len(tokenizer))


def _tokenizer_display_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
