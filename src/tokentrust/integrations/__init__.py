"""Thin adapters that run tokentrust's losses inside other RL engines.

* ``tokentrust.integrations.verl``: registers ``tt_*`` policy losses in verl's registry.
* ``tokentrust.integrations.trl``:  ``TokenTrustGRPOTrainer``, a TRL ``GRPOTrainer`` subclass.

Both call the same code as tokentrust's own trainer (``tokentrust.losses``,
``tokentrust.thresholds``, ``tokentrust.vocab``); this module holds the small pieces they share:
the settings object and the per-token threshold computation. It imports neither verl nor TRL.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from tokentrust.losses.core import CALLER_PARAMS
from tokentrust.thresholds import BatchFrequencyState, ThresholdSpec, compute_thresholds

ANCHORS = ("default", "rollout", "old")
# Loss keywords an adapter derives from the engine's own config (or tokentrust.delta): not params.
RESERVED_PARAMS = CALLER_PARAMS


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
    special_ids: tuple[int, ...] = ()  # extra special token ids (base delta), beyond the table's / tokenizer's

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_ids", tuple(sorted({int(i) for i in self.special_ids or ()})))

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
def load_token_info(path: str, rows: int | None = None):
    """``FrequencyTable.token_info(rows)`` of a table file (rarity, rho_ref, special mask), as
    tokentrust's trainer builds it; ids beyond the table (up to ``rows``) count as unseen. Cached."""
    from tokentrust.vocab import FrequencyTable

    table = FrequencyTable.load(path)
    return table.token_info(max(table.vocab_size, rows or 0))


def _process_group_size(group: Any = None) -> int:
    """World size of ``group`` when torch.distributed is initialised, else 1."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_rows(tensors: list[torch.Tensor | None], group: Any = None) -> tuple[list[torch.Tensor | None], int]:
    """Concatenate each [B_r, T_r] tensor of every rank of ``group`` along rows (rank order).

    Ranks may differ in B and T: tensors are right-padded with zeros (False for masks) to the
    largest T. Returns the gathered tensors (None stays None) and the first row of this rank.
    With one process (or no process group) the inputs come back unchanged and the offset is 0.
    """
    world = _process_group_size(group)
    if world == 1:
        return tensors, 0
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")
    ref = next(t for t in tensors if t is not None)
    shape = torch.tensor(ref.shape[:2], device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    rows = [int(s[0]) for s in shapes]
    b_max, t_max = max(rows), max(int(s[1]) for s in shapes)
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        padded = torch.zeros((b_max, t_max), dtype=t.dtype, device=device)
        padded[:t.shape[0], :t.shape[1]] = t.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:n] for p, n in zip(parts, rows)]).to(t.device))
    return out, sum(rows[:dist.get_rank(group)])


class ThresholdSchedule:
    """Per-token scale s_t of an AV-DPPO schedule for one engine process.

    Wraps ``tokentrust.thresholds.compute_thresholds`` with the frequency table and the batch
    frequency EMA state, so an adapter only passes token ids, mask and (if needed) entropy.
    Thresholds are computed once per rollout batch over the whole batch of all data-parallel
    ranks (:meth:`batch_scale`), as tokentrust's own trainer does: the normalisation mean, the
    batch-frequency counts and the entropy reference see every valid token of the batch, whatever
    the micro-batch split, the number of PPO epochs or the number of ranks.
    """

    def __init__(self, settings: ThresholdSettings, vocab_size: int | None = None,
                 special_ids: Sequence[int] = ()):
        """``special_ids``: the tokenizer's special tokens (EOS, pad, chat markers), if the engine
        knows them; with those of the table and ``settings.special_ids`` they get s = 1 and stay out
        of every batch statistic (``compute_thresholds(special=...)``)."""
        self.settings = settings
        self.spec = settings.spec()
        self.rarity: torch.Tensor | None = None
        self.rho_ref: float | None = None
        self.special: torch.Tensor | None = None
        if self.spec.needs_corpus_table and not settings.table:
            raise ValueError(f"tokentrust.thresholds.kind={settings.kind!r} needs tokentrust.thresholds.table "
                             "(a frequency table file; build one with `tokentrust vocab build`)")
        vocab_size = settings.vocab_size or vocab_size
        if settings.table and not self.constant:
            info = load_token_info(str(settings.table), vocab_size)
            self.special = info.special
            if self.spec.needs_corpus_table:
                self.rarity, self.rho_ref = info.rarity, info.rho_ref
            vocab_size = max(vocab_size or 0, len(info.special))
        self.vocab_size = vocab_size
        if self.spec.kind == "batch-frequency" and self.vocab_size is None:
            raise ValueError("tokentrust.thresholds.kind='batch-frequency' needs tokentrust.thresholds.vocab_size")
        extra = sorted({int(i) for i in special_ids} | set(settings.special_ids))
        if extra and self.vocab_size is not None and not self.constant:
            if not 0 <= extra[0] <= extra[-1] < self.vocab_size:
                raise ValueError(f"tokentrust.thresholds.special_ids must lie in [0, {self.vocab_size}), got {extra}")
            if self.special is None:
                self.special = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.special = self.special.clone()
            self.special[extra] = True
        self.state = BatchFrequencyState()

    @property
    def constant(self) -> bool:
        return self.spec.kind == "constant"

    def batch_scale(self, token_ids: torch.Tensor | None, mask: torch.Tensor, entropy: torch.Tensor | None = None,
                    *, group: Any = None, train: bool = True) -> torch.Tensor:
        """s_t ([B, T] float32, delta_t = base delta * s_t) for this rank's rows of one rollout batch.

        Call once per rollout batch on every rank of ``group`` (a collective when distributed):
        the rows of all ranks are gathered and the schedule is computed on the whole batch, so the
        result equals a one-process computation on the same batch. ``train=False`` (evaluation)
        reads the batch-frequency EMA state without advancing it.
        """
        if token_ids is None:
            raise ValueError(f"tokentrust.thresholds.kind={self.spec.kind!r} needs the response token ids")
        if self.spec.needs_entropy and entropy is None:
            raise ValueError(f"tokentrust.thresholds.kind={self.spec.kind!r} needs the entropy of mu at each token")
        mask = mask.bool()
        ids = token_ids.long()
        rows = len(self.rarity) if self.rarity is not None else self.vocab_size
        if rows is not None and mask.any() and int(ids[mask].max()) >= rows:
            raise ValueError(f"token id {int(ids[mask].max())} is outside the vocabulary ({rows} ids, frequency "
                             "table / model): the table was built for another tokenizer")
        ids = torch.where(mask, ids, torch.zeros_like(ids))  # padding ids may be anything
        ent = None if entropy is None else entropy.detach().float()
        (all_ids, all_mask, all_ent), first = gather_rows([ids, mask, ent], group)
        state = self.state if train else copy.deepcopy(self.state)
        scale = compute_thresholds(self.spec, 1.0, all_ids, all_mask, rarity=self.rarity, rho_ref=self.rho_ref,
                                   entropy=all_ent, vocab_size=self.vocab_size, state=state, special=self.special)
        return scale[first:first + ids.shape[0], :ids.shape[1]].to(token_ids.device)


__all__ = ["ANCHORS", "RESERVED_PARAMS", "ThresholdSchedule", "ThresholdSettings", "TokenTrustSettings",
           "gather_rows", "load_token_info"]
