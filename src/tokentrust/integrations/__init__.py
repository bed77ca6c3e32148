"""Thin adapters that run tokentrust's losses inside other RL engines.

* ``tokentrust.integrations.verl``: registers ``tt_*`` policy losses in verl's registry.
* ``tokentrust.integrations.trl``:  ``TokenTrustGRPOTrainer``, a TRL ``GRPOTrainer`` subclass.

Both call the same code as tokentrust's own trainer (``tokentrust.losses``,
``tokentrust.thresholds``, ``tokentrust.vocab``); this module holds the small pieces they share:
the settings object and the per-token threshold computation. It imports neither verl nor TRL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from tokentrust.thresholds import BatchFrequencyState, ThresholdSpec, compute_thresholds

ANCHORS = ("default", "rollout", "old")
# Loss keywords an adapter derives from the engine's own config (or tokentrust.delta): not params.
RESERVED_PARAMS = ("agg", "global_tokens", "global_seqs", "horizon", "delta", "eps_low", "eps_high")


@dataclass(frozen=True)
class ThresholdSettings:
    """A threshold schedule (``tokentrust.thresholds.ThresholdSpec`` fields) plus the table path."""

    kind: str = "constant"
    beta: float = 0.5
    entropy_beta: float | None = None
    s_min: float = 0.25
    s_max: float = 4.0
    normalize: bool = False
    ema: float = 0.0
    smoothing: float = 1.0
    table: str | None = None  # FrequencyTable file (``tokentrust vocab build``); frequency/combined kinds
    vocab_size: int | None = None  # batch-frequency: model vocab size when the engine cannot tell

    def spec(self) -> ThresholdSpec:
        return ThresholdSpec(kind=self.kind, beta=self.beta, entropy_beta=self.entropy_beta, s_min=self.s_min,
                             s_max=self.s_max, normalize=self.normalize, ema=self.ema, smoothing=self.smoothing)


@dataclass(frozen=True)
class TokenTrustSettings:
    """What an engine adapter needs beyond the engine's own config.

    ``loss``: a ``tokentrust.losses`` name (TRL; in verl the ``tt_*`` loss_mode picks it).
    ``delta``: base threshold (None: the loss default in TRL, verl's clip_ratio_low/high in verl).
    ``params``: any other keyword of the loss (``is_cap``, ``w_min``, ``surrogate``, ...).
    ``anchor``: which log-probs are mu (see each adapter).
    """

    loss: str | None = None
    delta: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    anchor: str = "default"

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"tokentrust.anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"tokentrust.delta must be > 0, got {self.delta}")
        reserved = sorted(set(self.params) & set(RESERVED_PARAMS))
        if reserved:
            raise ValueError(f"tokentrust.params {reserved} come from the engine's config (aggregation, clip "
                             "epsilons) or tokentrust.delta; remove them from params")
        self.thresholds.spec()  # validates the schedule

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | str | None) -> TokenTrustSettings:
        """Build from a dict / OmegaConf node / JSON string; unknown keys raise ValueError."""
        if data is None:
            return cls()
        if isinstance(data, TokenTrustSettings):
            return data
        if isinstance(data, str):
            data = json.loads(data) if data.strip() else {}
        data = _to_plain(data)
        _check_keys(data, cls, "tokentrust")
        th = dict(data.pop("thresholds", None) or {})
        _check_keys(th, ThresholdSettings, "tokentrust.thresholds")
        params = dict(data.pop("params", None) or {})
        return cls(**data, params=params, thresholds=ThresholdSettings(**th))


def _to_plain(data: Any) -> dict[str, Any]:
    """OmegaConf nodes and Mapping-like configs to a plain dict (without importing omegaconf)."""
    if hasattr(data, "_metadata") and hasattr(data, "_get_node"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(data, resolve=True)
    return {k: (_to_plain(v) if isinstance(v, Mapping) else v) for k, v in dict(data).items()}


def _check_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


@lru_cache(maxsize=8)
def load_rarity(path: str) -> tuple[torch.Tensor, float]:
    """(rho [V], rho_ref) of a frequency table, as tokentrust's trainer computes them; cached per process."""
    from tokentrust.vocab import FrequencyTable

    table = FrequencyTable.load(path)
    return table.rarity(), table.reference_rarity()


class ThresholdSchedule:
    """Per-token scale s_t of an AV-DPPO schedule for one engine process.

    Wraps ``tokentrust.thresholds.compute_thresholds`` with the frequency table and the batch
    frequency EMA state, so an adapter only passes token ids, mask and (if needed) entropy.
    """

    def __init__(self, settings: ThresholdSettings, vocab_size: int | None = None):
        self.settings = settings
        self.spec = settings.spec()
        self.rarity: torch.Tensor | None = None
        self.rho_ref: float | None = None
        if self.spec.needs_corpus_table:
            if not settings.table:
                raise ValueError(f"tokentrust.thresholds.kind={settings.kind!r} needs tokentrust.thresholds.table "
                                 "(a frequency table file; build one with `tokentrust vocab build`)")
            self.rarity, self.rho_ref = load_rarity(str(settings.table))
        self.vocab_size = settings.vocab_size or vocab_size or (len(self.rarity) if self.rarity is not None else None)
        if self.spec.kind == "batch-frequency" and self.vocab_size is None:
            raise ValueError("tokentrust.thresholds.kind='batch-frequency' needs tokentrust.thresholds.vocab_size")
        self.state = BatchFrequencyState()

    @property
    def constant(self) -> bool:
        return self.spec.kind == "constant"

    def scale(self, token_ids: torch.Tensor | None, mask: torch.Tensor,
              entropy: torch.Tensor | None = None) -> torch.Tensor:
        """s_t as a [B, T] float32 tensor (delta_t = base delta * s_t)."""
        if token_ids is None:
            raise ValueError(f"tokentrust.thresholds.kind={self.spec.kind!r} needs the response token ids")
        mask = mask.bool()
        ids = token_ids.long()
        if self.rarity is not None and mask.any() and int(ids[mask].max()) >= len(self.rarity):
            raise ValueError(f"token id {int(ids[mask].max())} is outside the frequency table "
                             f"(vocab size {len(self.rarity)}): the table was built for another tokenizer")
        ids = torch.where(mask, ids, torch.zeros_like(ids))  # padding ids may be anything
        return compute_thresholds(self.spec, 1.0, ids, mask, rarity=self.rarity, rho_ref=self.rho_ref,
                                  entropy=entropy, vocab_size=self.vocab_size, state=self.state)


__all__ = ["ANCHORS", "RESERVED_PARAMS", "ThresholdSchedule", "ThresholdSettings", "TokenTrustSettings",
           "load_rarity"]
