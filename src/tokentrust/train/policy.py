"""Building the policy a run trains (and its frequency table) from a validated config."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from tokentrust.train.config import RunConfig
from tokentrust.vocab import (FORMAT_VERSION, FrequencyTable, VocabMismatchError, build_frequency_table,
                              special_token_ids)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where built artefacts (tiny models, frequency tables) are cached."""
    return Path(cache_dir or os.environ.get("TOKENTRUST_CACHE") or Path.home() / ".cache" / "tokentrust")


def tiny_sft_pairs(task: Any, limit: int = 3000) -> list[tuple[str, str]]:
    """(prompt, worked solution) pairs from the task's training split, for the SFT warm start."""
    return [(task.prompt(ex), task.sft_text(ex)) for ex in task.examples("train")[:limit]]


def build_policy(cfg: RunConfig, task: Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer named by ``cfg.model`` (the tiny preset is built and cached)."""
    from transformers.utils import logging as hf_logging

    from tokentrust.train import models

    hf_logging.disable_progress_bar()  # per-shard bars would drown the training progress bar
    m = cfg.model
    if m.name == "tiny":
        corpus = list(task.corpus_texts("train"))
        model, tokenizer = models.get_or_build_tiny_model(
            cache_root(m.cache_dir), corpus, tiny_sft_pairs(task), vocab_size=m.tiny_vocab, hidden=m.tiny_hidden,
            layers=m.tiny_layers, heads=m.tiny_heads, intermediate=4 * m.tiny_hidden, sft_steps=m.sft_steps,
            sft_lr=m.sft_lr, seed=0, device=str(device))
    else:
        lora = ({"r": m.lora_r, "alpha": m.lora_alpha, "target_modules": m.lora_targets} if m.lora_r > 0 else None)
        model, tokenizer = models.load_model_and_tokenizer(m.name, dtype=m.dtype, device=str(device),
                                                           gguf_file=m.gguf_file, lora=lora)
    if m.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


def frequency_table_for(tokenizer: Any, task: Any, *, table_path: str | None = None, corpus: list[str] | None = None,
                        cache_dir: str | None = None) -> FrequencyTable:
    """Load ``table_path`` (checked against the tokenizer) or build one from the corpus, cached.

    The default corpus is the task's training texts (questions and solutions), or the listed files.
    The tokenizer's special tokens are always special in the returned table, also for a table
    saved before they were recorded (format 1), so EOS can never pass for the rarest token.
    """
    if table_path:
        return with_special_ids(FrequencyTable.load(table_path, tokenizer=tokenizer), tokenizer)
    if corpus:
        sources: Any = list(corpus)
        key_src = "|".join(f"{p}:{os.path.getsize(p)}" for p in corpus)
    else:
        split = "train" if task.name != "math500" else "test"
        texts = list(task.corpus_texts(split))
        sources = [texts]  # one source: an iterable of documents
        key_src = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    key = hashlib.sha256(f"v{FORMAT_VERSION}|{name}|{len(tokenizer)}|{key_src}".encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "freq" / f"{task.name}-{key}.safetensors"
    if path.exists():
        try:
            return with_special_ids(FrequencyTable.load(path, tokenizer=tokenizer), tokenizer)
        except (VocabMismatchError, ValueError):
            pass  # stale or damaged cache entry: rebuild it
    table = build_frequency_table(tokenizer, sources, field="question,answer")
    table.save(path)  # atomic
    return table


def with_special_ids(table: FrequencyTable, tokenizer: Any) -> FrequencyTable:
    """``table`` with the tokenizer's special ids added to the ones it recorded."""
    ids = sorted(set(table.special_ids) | set(special_token_ids(tokenizer)))
    if ids != table.special_ids:
        table.special_ids = ids
    return table
