"""The learner: PPO-style minibatch updates of the policy on one scored batch.

It owns the trainable model, the optimizer, the loss and the non-finite-step guard; it never
samples. Per batch: ``ppo_epochs`` x ``minibatches`` optimizer steps, each forward computing only
the sampled tokens' log-probs (micro-batches accumulate gradients), the loss from the registry,
and diagnostics pooled over the whole step (token-weighted means, true maxima, per frequency
bucket and advantage sign).
"""

from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from tokentrust.train.config import RunConfig, loss_params
from tokentrust.train.diagnostics import (BucketStats, EpochStats, MaskedTokenCounter, RatioStats, RunningMean,
                                          TrustRegionStats, mismatch_metrics)
from tokentrust.logits import gather_logprobs, sampled_logprobs
from tokentrust.losses import get_loss
from tokentrust.losses.core import aggregate
from tokentrust.train.packed import packed_response_logprobs, unsupported_reason
from tokentrust.train.rollout.base import RolloutBatch


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def step_generator(seed: int, step: int, salt: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator fixed by (seed, step): sampling after a resume equals sampling without one."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return g


# ------------------------------------------------------------------------------ forward passes

def response_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float,
                      topk_ids: torch.Tensor | None = None,
                      packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi of the sampled tokens [N, T] (differentiable) and, optionally, of given top-K ids.

    Only the response positions' logits are computed (``logits_to_keep``), and the log-softmax
    is taken in chunks, so no extra full [N, T, V] float32 tensor stays alive. ``packed`` runs
    ``tokentrust.train.packed`` instead (no padding, each distinct prompt once; same values up to float
    rounding) for models it supports (see ``use_packed``).
    """
    if packed:
        return packed_response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                        batch.response_mask, temperature, topk_ids)
    input_ids, attention_mask, position_ids = batch.sequences()
    t = batch.response_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, -(t + 1):-1]
    logp = sampled_logprobs(logits, batch.response_ids, temperature=temperature)
    topk = None
    if topk_ids is not None:
        with torch.no_grad():
            topk = gather_logprobs(logits.detach(), topk_ids, temperature=temperature)
    return logp, topk


def use_packed(model: torch.nn.Module, wanted: bool) -> bool:
    """Whether the learner runs the packed forward: asked for and supported by the model."""
    return wanted and unsupported_reason(model) is None


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop all-padding columns (left of the prompts, right of the responses) to save compute."""
    p_keep = batch.prompt_mask.any(0).nonzero()
    r_len = int(batch.response_mask.sum(-1).max().item()) if batch.response_mask.numel() else 0
    p0 = int(p_keep[0]) if len(p_keep) else 0
    out = {f: getattr(batch, f)[:, p0:] for f in ("prompt_ids", "prompt_mask")}
    for f in ("response_ids", "response_mask", "behavior_logp", "behavior_topk_ids", "behavior_topk_logp",
              "behavior_entropy"):
        v = getattr(batch, f)
        out[f] = v[:, :max(r_len, 1)] if v is not None else None
    return RolloutBatch(response_texts=batch.response_texts, num_generated_tokens=batch.num_generated_tokens, **out)


def slice_cols(x: torch.Tensor | None, batch: RolloutBatch) -> torch.Tensor | None:
    return None if x is None else x[:, :batch.response_ids.shape[1]]


def micro_batches(batch: RolloutBatch, index, size: int) -> list[RolloutBatch]:
    """Trimmed micro-batches of ``size`` rows (0 = one) over ``index``."""
    index = list(index)
    size = size or len(index)
    return [trim(batch.select(index[i:i + size])) for i in range(0, len(index), size)]


@torch.no_grad()
def logprobs_by_micro_batch(model: torch.nn.Module, batch: RolloutBatch, temperature: float,
                            micro_batch_size: int, packed: bool = False) -> torch.Tensor:
    """[N, T] float32 log-probs of the sampled tokens, one trimmed micro-batch at a time (each
    padded back to the batch width T with zeros, so micro-batches of different lengths stack)."""
    width = batch.response_ids.shape[1]
    parts = [response_logprobs(model, mb, temperature, packed=packed)[0].float()
             for mb in micro_batches(batch, range(len(batch)), micro_batch_size)]
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def takes_prox_logp(loss_fn) -> bool:
    """Whether a loss takes ``prox_logp`` (decoupled PPO; ``tokentrust.losses.NEEDS_PROX_LOGP``):
    the learner then passes log pi_old recomputed with its weights before the update, while
    ``behavior_logp`` stays mu, the rollout's log-probs."""
    return "prox_logp" in inspect.signature(loss_fn).parameters


# ------------------------------------------------------------------------------------ learner

class Learner:
    """Minibatch updates, optimizer, learning-rate warm-up and the non-finite-step guard."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, token_bucket: torch.Tensor, num_buckets: int):
        self.cfg = cfg
        self.model = model
        self.token_bucket, self.num_buckets = token_bucket, num_buckets
        self.device = token_bucket.device
        self.loss_fn = get_loss(cfg.algo.loss)
        self.loss_params = loss_params(cfg)
        self.needs_topk = cfg.algo.loss.startswith("dppo-topk")
        self.needs_prox = takes_prox_logp(self.loss_fn)
        self.packed = use_packed(model, cfg.optim.packed_forward)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.trainable(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay, foreach=True)
        self.optimizer_steps = 0
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0
        self.version = 0  # completed update() calls: the policy version of the current weights
        self.prox_logp: torch.Tensor | None = None  # [N, T] of the batch being updated on, when the loss needs it
        self.anchor_logp: torch.Tensor | None = None  # [N, T] pi_old, the ratio's anchor with algo.anchor=recompute
        self.masked_tokens = MaskedTokenCounter(len(token_bucket), self.device)  # over the whole run

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state(self) -> dict[str, int]:
        return {"optimizer_steps": self.optimizer_steps, "nonfinite_total": self.nonfinite_total}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.version = version

    @torch.no_grad()
    def current_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """log pi_old: the sampled tokens' log-probs under the weights before this update (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return logprobs_by_micro_batch(self.model, batch, self.cfg.rollout.temperature,
                                           self.cfg.optim.micro_batch_size, packed=self.packed)
        finally:
            self.model.train(was_training)

    def update(self, data, step: int, timings: dict[str, float]) -> dict[str, float]:
        """``ppo_epochs`` x ``minibatches`` optimizer steps on one scored batch (a ``ScoredBatch``)."""
        cfg = self.cfg
        extra = self._before_update(data, timings)
        n = len(data.batch)
        mean = RunningMean()
        bucket = BucketStats(self.num_buckets, self.device)
        region = TrustRegionStats()
        stats = _StepStats(bucket, region, EpochStats(self.num_buckets, self.device), RatioStats(self.num_buckets))
        self.model.train()
        gen = step_generator(cfg.seed, step, salt=29)
        for stats.epoch in range(cfg.optim.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for idx in _split(perm, cfg.optim.minibatches):
                mean.add(self._optimizer_step(data, idx, stats, timings))
        self.version += 1
        out = mean.result()
        out.update(region.result())
        out.update(bucket.metrics())
        out.update(stats.epochs.metrics())
        out.update(stats.ratios.metrics())
        out.update(extra)
        return out

    def _before_update(self, data, timings: dict[str, float]) -> dict[str, float]:
        """One no-grad forward with the weights before the update (log pi_old), when something needs it:
        anchor=recompute (the ratio's anchor becomes pi_old), a loss taking ``prox_logp`` (decoupled
        PPO: pi_prox = pi_old, mu stays the behaviour policy), or log.mismatch (mu vs pi_old). The batch's
        ``behavior_logp`` stays mu in every case, so the diagnostics named after mu measure mu."""
        cfg = self.cfg
        self.prox_logp = self.anchor_logp = None
        if not (cfg.algo.anchor == "recompute" or self.needs_prox or cfg.log.mismatch):
            return {}
        t0 = time.perf_counter()
        old = self.current_logprobs(data.batch)
        metrics = {}
        if cfg.log.mismatch:
            b = data.batch
            metrics = mismatch_metrics(b.behavior_logp, old, b.response_mask, self.token_bucket[b.response_ids],
                                       self.num_buckets)
        if cfg.algo.anchor == "recompute":  # ablation: anchor the ratio on pi_old instead of mu
            self.anchor_logp = old
        if self.needs_prox:
            self.prox_logp = old
        timings["other"] += time.perf_counter() - t0
        return metrics

    def _normalisers(self, mb_mask: torch.Tensor) -> dict[str, Any]:
        """Global token / sequence counts of the minibatch, so micro-batch losses add up to its loss."""
        agg = self.cfg.algo.agg
        if agg == "token-mean":
            return {"global_tokens": mb_mask.sum().clamp(min=1).float()}
        norm: dict[str, Any] = {"global_seqs": (mb_mask.sum(-1) > 0).sum().clamp(min=1).float()}
        if agg == "seq-mean-token-sum-norm":
            norm["horizon"] = self.cfg.rollout.max_new_tokens
        return norm

    def _optimizer_step(self, data, idx: list[int], stats: _StepStats, timings: dict[str, float]) -> dict[str, float]:
        cfg = self.cfg
        norm = self._normalisers(data.batch.response_mask[idx])
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)  # losses: micro-batch parts of one normalised loss add up
        size = cfg.optim.micro_batch_size or len(idx)
        for part in (idx[i:i + size] for i in range(0, len(idx), size)):
            t0 = time.perf_counter()
            mb = trim(data.batch.select(part))
            logp, topk = response_logprobs(self.model, mb, cfg.rollout.temperature,
                                           mb.behavior_topk_ids if self.needs_topk else None, packed=self.packed)
            t1 = time.perf_counter()
            mask = mb.response_mask.bool()
            params = dict(self.loss_params, **norm)
            if data.delta is not None:
                params["delta"] = slice_cols(data.delta[part], mb)
            if self.prox_logp is not None:
                params["prox_logp"] = slice_cols(self.prox_logp[part], mb)
            if self.needs_topk:
                params["behavior_topk_logp"] = mb.behavior_topk_logp
                params["topk_logp"] = topk
            anchor = mb.behavior_logp if self.anchor_logp is None else slice_cols(self.anchor_logp[part], mb)
            out = self.loss_fn(logp, anchor, data.advantages[part], mask, **params)
            loss = out.loss
            if data.ref_logp is not None:
                ref = slice_cols(data.ref_logp[part], mb)
                log_r = (ref - logp).clamp(-20, 20)
                kl = aggregate(log_r.exp() - log_r - 1, mask, cfg.algo.agg, **norm)
                loss = loss + cfg.algo.kl_coef * kl
                sums["loss/kl"] += kl.item()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            timings["forward_backward"] += (t1 - t0) + (t3 - t2)
            timings["loss"] += t2 - t1
            sums["loss/policy"] += out.loss.item()
            sums["loss/total"] += loss.item()
            self._record_diagnostics(stats, mb, logp, out, data.advantages[part], params.get("delta"))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable(), cfg.optim.max_grad_norm)
        self._apply_or_skip(sums["loss/total"], grad_norm)
        sums["actor/grad_norm"] = float(grad_norm)
        return dict(sums)

    @torch.no_grad()
    def _record_diagnostics(self, stats: _StepStats, mb: RolloutBatch, logp: torch.Tensor, out, advantages,
                            delta) -> None:
        mask = mb.response_mask.bool()
        adv = advantages[:, None].expand_as(mask)
        buckets = self.token_bucket[mb.response_ids]
        stats.region.add(out.metrics, mask, adv)
        stats.bucket.add(buckets, out.keep, mask, adv, delta)
        abs_diff = (logp.detach().float().exp() - mb.behavior_logp.float().exp()).abs()
        stats.epochs.add(stats.epoch, buckets, out.keep, mask, adv, abs_diff)
        stats.ratios.add(buckets, mask, adv, logp, mb.behavior_logp)
        self.masked_tokens.add(mb.response_ids, out.keep, mask)

    def _apply_or_skip(self, loss: float, grad_norm: torch.Tensor) -> None:
        """Take the optimizer step, or skip it when the loss or gradient is not finite (and stop the
        run after ``optim.max_nonfinite_steps`` consecutive skips)."""
        if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
            self._apply_lr()
            self.optimizer.step()
            self.optimizer_steps += 1
            self.consecutive_nonfinite = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        if self.consecutive_nonfinite >= self.cfg.optim.max_nonfinite_steps:
            raise NonFiniteError(f"{self.consecutive_nonfinite} consecutive optimizer steps had a non-finite "
                                 f"loss or gradient (last loss {loss}, grad norm {float(grad_norm)}); "
                                 "stopping. Lower optim.lr or check the data; see optim.max_nonfinite_steps.")

    def _apply_lr(self) -> None:
        w = self.cfg.optim.warmup_steps
        scale = min(1.0, (self.optimizer_steps + 1) / w) if w > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * scale


@dataclass
class _StepStats:
    """The diagnostics one update() fills in, and the PPO epoch it is in."""

    bucket: BucketStats
    region: TrustRegionStats
    epochs: EpochStats
    ratios: RatioStats
    epoch: int = 0


def _split(items: list[int], parts: int) -> list[list[int]]:
    """``parts`` consecutive minibatches whose sizes differ by at most one (fewer only when there are
    fewer items than parts). Equal to fixed-size chunks when ``parts`` divides ``len(items)``."""
    n, parts = len(items), max(1, min(parts, len(items)))
    bounds = [i * n // parts for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]
