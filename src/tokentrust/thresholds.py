"""Per-token DPPO thresholds delta_t = delta * s_t (AV-DPPO), as in methods.md.

Schedules (``ThresholdSpec.kind``):

* ``constant``        s_t = 1 (plain DPPO)
* ``frequency``       s(v) = clamp(exp(beta (rho(v) - rho_ref)), s_min, s_max), rho = -log f from a
                      corpus frequency table (``tokentrust.vocab``); beta > 0 loosens rare tokens,
                      beta < 0 is the inverse control
* ``batch-frequency`` the same with f counted on the current rollout batch, optionally an
                      exponential moving average over batches (``BatchFrequencyState``)
* ``entropy``         s_t = clamp((H_t / H_ref)^beta, s_min, s_max), H_ref = batch mean entropy
* ``combined``        frequency scale x entropy scale, clamped once

With ``normalize=True`` delta_t is rescaled so its mean over the batch's valid tokens is delta
(budget control: "adaptive" without "looser overall"). The clamp applies to s before that
rescaling, so a normalised schedule keeps the ratio s_max / s_min but not the bounds themselves.

Special tokens (EOS, pad, chat-template markers; a ``special`` mask by vocabulary id) carry no
frequency signal: they always get the base delta (s = 1) and are left out of the normalisation
mean, of the batch-frequency counts and of H_ref. Without this, EOS (never counted in a corpus
tokenized without special tokens) would be the "rarest" token and AV-DPPO would mostly move the
stop decision.

Everything here is a pure function of tensors; the only state is the optional EMA of batch
frequencies, carried explicitly by the caller. Thresholds depend on mu and token ids only,
so a trainer computes them once per rollout batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("constant", "frequency", "batch-frequency", "entropy", "combined")


@dataclass(frozen=True)
class ThresholdSpec:
    """How delta_t is built from delta. Validated on construction."""

    kind: str = "constant"
    beta: float = 0.5
    entropy_beta: float | None = None  # the entropy exponent in "combined" (default: beta)
    s_min: float = 0.25
    s_max: float = 4.0
    normalize: bool = False
    ema: float = 0.0  # batch-frequency: weight of the past batches (0 = this batch only)
    smoothing: float = 1.0  # add-alpha smoothing of batch frequencies

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"thresholds.kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 < self.s_min <= self.s_max:
            raise ValueError(f"thresholds.s_min/s_max must satisfy 0 < s_min <= s_max, got {self.s_min}, {self.s_max}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"thresholds.ema must be in [0, 1), got {self.ema}")
        if not self.smoothing > 0:
            raise ValueError(f"thresholds.smoothing must be > 0, got {self.smoothing}")
        if not math.isfinite(self.beta):
            raise ValueError(f"thresholds.beta must be finite, got {self.beta}")

    @property
    def needs_corpus_table(self) -> bool:
        return self.kind in ("frequency", "combined")

    @property
    def needs_entropy(self) -> bool:
        return self.kind in ("entropy", "combined")


@dataclass
class BatchFrequencyState:
    """Moving average of per-batch token probabilities, carried between batches."""

    probs: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"probs": self.probs}

    def load_state_dict(self, state: dict) -> None:
        self.probs = state.get("probs")


def frequency_log_scale(token_ids: torch.Tensor, rarity: torch.Tensor, rho_ref: float, beta: float) -> torch.Tensor:
    """beta * (rho(y_t) - rho_ref) for every token: the log of the unclamped frequency scale."""
    return rarity.to(token_ids.device)[token_ids].sub_(rho_ref).mul_(beta)


def entropy_log_scale(entropy: torch.Tensor, mask: torch.Tensor, beta: float,
                      h_ref: float | torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """beta * log(H_t / H_ref), H_ref = mean entropy over valid tokens unless given."""
    h = entropy.detach().float().clamp(min=eps)
    if h_ref is None:
        m = mask.float()
        h_ref = (h * m).sum() / m.sum().clamp(min=1.0)
    h_ref = torch.as_tensor(h_ref, dtype=h.dtype, device=h.device).clamp(min=eps)
    return beta * (h.log() - h_ref.log())


def batch_rarity(token_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, *, smoothing: float = 1.0,
                 ema: float = 0.0, state: BatchFrequencyState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rarity rho = -log f from the valid tokens of this batch (EMA-blended with past batches).

    Returns (rho [V], rho_ref) with rho_ref the token-weighted mean rarity of this batch's valid
    tokens, mean_t rho(y_t) (methods.md), so that s = 1 for the batch's typical token. (The
    entropy of the smoothed distribution over all V ids would weight in the mass smoothing gives
    to unseen ids and, with a large vocabulary, pin most tokens at s_min.) Updates ``state``.
    """
    ids = token_ids[mask.bool()].flatten()
    counts = torch.bincount(ids, minlength=vocab_size)[:vocab_size].float()
    probs = (counts + smoothing) / (counts.sum() + smoothing * vocab_size)
    if state is not None:
        if state.probs is not None and ema > 0:
            probs = ema * state.probs.to(probs.device) + (1 - ema) * probs
        state.probs = probs.detach().clone()
    rho = -probs.log()
    rho_ref = rho[ids].mean() if ids.numel() else (probs * rho).sum()
    return rho, rho_ref


def scale_from_log(log_scale: torch.Tensor, s_min: float, s_max: float) -> torch.Tensor:
    """exp(log_scale) clamped to [s_min, s_max], clamped in log space so nothing overflows."""
    return log_scale.clamp(math.log(s_min), math.log(s_max)).exp_()


def apply_scale(delta: float, scale: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """delta_t = delta * s_t, optionally rescaled so the mean over ``mask`` equals delta."""
    if normalize:
        m = mask.to(scale.dtype)
        mean = (scale * m).sum() / m.sum().clamp(min=1.0)
        return scale.mul_(delta / mean.clamp(min=1e-12))
    return scale.mul_(delta)


def compute_thresholds(spec: ThresholdSpec, delta: float, token_ids: torch.Tensor, mask: torch.Tensor, *,
                       rarity: torch.Tensor | None = None, rho_ref: float | None = None,
                       entropy: torch.Tensor | None = None, vocab_size: int | None = None,
                       state: BatchFrequencyState | None = None, special: torch.Tensor | None = None) -> torch.Tensor:
    """The [B, T] per-token threshold tensor for ``spec``.

    ``rarity``/``rho_ref``: corpus rarity per vocabulary id and its reference (frequency and
    combined kinds). ``entropy``: [B, T] entropy of mu (entropy and combined kinds).
    ``vocab_size``: needed by batch-frequency. ``special``: bool [V] by vocabulary id; those
    tokens get exactly delta and are left out of every batch statistic (module docstring).
    """
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if spec.kind == "constant":
        return torch.full(token_ids.shape, float(delta), dtype=torch.float32, device=token_ids.device)
    mask = mask.bool()
    is_special = special.to(token_ids.device)[token_ids] if special is not None else None
    if is_special is not None:
        mask = mask & ~is_special  # the tokens that carry a schedule signal
    parts = []  # log-scales, summed and clamped once
    if spec.kind in ("frequency", "combined"):
        if rarity is None or rho_ref is None:
            raise ValueError(f"thresholds.kind={spec.kind!r} needs a corpus frequency table (rarity and rho_ref)")
        parts.append(frequency_log_scale(token_ids, rarity.float(), float(rho_ref), spec.beta))
    if spec.kind == "batch-frequency":
        if vocab_size is None:
            raise ValueError("thresholds.kind='batch-frequency' needs vocab_size")
        rho, ref = batch_rarity(token_ids, mask, vocab_size, smoothing=spec.smoothing, ema=spec.ema, state=state)
        parts.append(frequency_log_scale(token_ids, rho, float(ref), spec.beta))
    if spec.kind in ("entropy", "combined"):
        if entropy is None:
            raise ValueError(f"thresholds.kind={spec.kind!r} needs the entropy of mu at each token")
        beta = spec.beta if spec.kind == "entropy" or spec.entropy_beta is None else spec.entropy_beta
        parts.append(entropy_log_scale(entropy, mask, beta))
    log_scale = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    scale = scale_from_log(log_scale, spec.s_min, spec.s_max)
    delta_t = apply_scale(float(delta), scale, mask, spec.normalize)
    if is_special is not None:
        delta_t = delta_t.masked_fill_(is_special, float(delta))
    return delta_t
