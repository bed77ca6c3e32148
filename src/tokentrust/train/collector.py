"""The collector: rollout, scoring and thresholds, producing versioned scored batches.

``Collector.collect(i)`` samples batch i (the prompts of data step i, with a generator fixed by
(seed, i)) using the rollout side's weights (``RolloutWeights``), scores it, computes the
group advantages, the per-token thresholds and the frozen reference's log-probs, and stamps the
batch with the policy version and weight fingerprint that sampled it.

``BatchPipeline`` runs the collector ``rollout.staleness`` = k batches ahead of the learner in a
bounded queue: the batch the learner updates on at step t was sampled by the weights of step
t - k (the first k + 1 batches by the initial weights, as in verl's one-step-off trainer), and
with ``rollout.overlap`` the next batch is generated in a background thread while the learner
updates. Every batch depends only on its index and the weights that sampled it, so the result
does not depend on overlap, and k = 0 is the synchronous loop (sample, then update).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from tokentrust.train.config import RunConfig
from tokentrust.train.learner import logprobs_by_micro_batch, step_generator, use_packed
from tokentrust.train.rollout.base import RolloutBatch
from tokentrust.train.rollout.weights import RolloutWeights
from tokentrust.thresholds import BatchFrequencyState, compute_thresholds
from tokentrust.verifiers.failures import count_failures
from tokentrust.vocab import FrequencyTable, TokenInfo


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by the group std."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.flatten()


# ------------------------------------------------------------------------- vocabulary lookups

def token_tables(table: FrequencyTable, edges: list[float], rows: int, device: torch.device | str) -> TokenInfo:
    """``table.token_info`` (ids beyond the table behave as unseen tokens) on ``device``, so that
    token ids on a GPU index them directly."""
    return table.token_info(rows, edges).to(device)


# ------------------------------------------------------------------------------ scored batches

@dataclass
class ScoredBatch:
    """A scored rollout batch, ready for the update, stamped with the weights that sampled it."""

    batch: RolloutBatch
    rewards: torch.Tensor  # [N]
    correct: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N]
    delta: torch.Tensor | None  # [N, T] per-token thresholds, or None for losses without delta
    ref_logp: torch.Tensor | None  # [N, T] frozen reference policy's log-probs (KL penalty)
    prompts: list[str]
    index: int = 0  # data step: prompts and sampling generator of step index + 1
    policy_version: int = 0  # learner updates applied to the weights that sampled it
    fingerprint: str = ""  # weight_fingerprint of those weights
    verifier_timeouts: int = 0  # scoring checks that ran out of time (each scored 0)
    verifier_errors: int = 0  # scoring checks whose verifier worker crashed or failed (each scored 0)
    timings: dict[str, float] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        """Plain CPU tensors, lists and numbers (loadable with torch.load(weights_only=True))."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("batch", "timings")}
        out["batch"] = _to_cpu({f.name: getattr(self.batch, f.name) for f in fields(self.batch)})
        return _to_cpu(out)

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> ScoredBatch:
        batch = RolloutBatch(**_to_device(state["batch"], device))
        return cls(batch=batch, **_to_device({k: v for k, v in state.items() if k != "batch"}, device))


def _to_cpu(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _to_device(d: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# ------------------------------------------------------------------------------------ collector

class Collector:
    """Samples, scores and thresholds batch i with the rollout side's weights (see the module doc)."""

    def __init__(self, cfg: RunConfig, task: Any, examples: list, tokenizer: Any, engine: Any,
                 weights: RolloutWeights, tables: TokenInfo, device: torch.device,
                 ref_model: torch.nn.Module | None = None, uses_delta: bool = False):
        self.cfg, self.task, self.examples, self.tokenizer = cfg, task, examples, tokenizer
        self.engine, self.weights, self.tables, self.device = engine, weights, tables, device
        self.ref_model, self.uses_delta = ref_model, uses_delta
        self.threshold_spec = cfg.algo.thresholds.spec()
        self.batch_freq_state = BatchFrequencyState()

    def prompts_for_step(self, step: int) -> list:
        """The step's prompts: a fixed permutation of the training set per pass (seeded)."""
        n = self.cfg.rollout.prompts_per_step
        total = len(self.examples)
        out = []
        for pos in range(step * n, (step + 1) * n):
            epoch, i = divmod(pos, total)
            perm = torch.randperm(total, generator=step_generator(self.cfg.seed, epoch, salt=17)).tolist()
            out.append(self.examples[perm[i]])
        return out

    def collect(self, index: int) -> ScoredBatch:
        from tokentrust.train.prompting import format_prompt

        cfg = self.cfg
        g = cfg.rollout.group_size
        timings = {"generate": 0.0, "score": 0.0, "other": 0.0}
        examples = self.prompts_for_step(index)
        prompts = [format_prompt(self.tokenizer, self.task, ex, cfg.task.system_prompt) for ex in examples]
        version, fingerprint = self.weights.version, self.weights.fingerprint
        t0 = time.perf_counter()
        batch = self.engine.generate([p for p in prompts for _ in range(g)],
                                     generator=step_generator(cfg.seed, index, device=self.device))
        batch = batch.to(self.device)
        timings["generate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        with count_failures() as failed:  # a timeout or crash scores 0: counted, not silent
            scores = [self.task.score(text, examples[i // g]) for i, text in enumerate(batch.response_texts)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)
        correct = torch.tensor([s.correct for s in scores], device=self.device)
        advantages = group_advantages(rewards, g, cfg.algo.adv_std_norm)
        timings["score"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        delta = None
        if self.uses_delta:
            delta = compute_thresholds(self.threshold_spec, cfg.algo.delta, batch.response_ids,
                                       batch.response_mask.bool(), rarity=self.tables.rarity,
                                       rho_ref=self.tables.rho_ref, entropy=batch.behavior_entropy,
                                       vocab_size=len(self.tables.rarity), state=self.batch_freq_state,
                                       special=self.tables.special)
        ref_logp = None
        if self.ref_model is not None:
            ref_logp = logprobs_by_micro_batch(self.ref_model, batch, cfg.rollout.temperature,
                                               cfg.optim.micro_batch_size,
                                               packed=use_packed(self.ref_model, cfg.optim.packed_forward))
        timings["other"] += time.perf_counter() - t0
        return ScoredBatch(batch, rewards, correct, advantages, delta, ref_logp, prompts, index=index,
                           policy_version=version, fingerprint=fingerprint, verifier_timeouts=failed.timeouts,
                           verifier_errors=failed.errors, timings=timings)

    def sync(self, learner_model: torch.nn.Module, version: int) -> None:
        """Weight sync after a learner step: the rollout side now samples with ``version``."""
        if hasattr(self.engine, "sync_weights"):  # vLLM holds its own copy of the weights
            self.engine.sync_weights(learner_model)
        self.weights.sync(learner_model, version)


# ------------------------------------------------------------------------------------ pipeline

class BatchPipeline:
    """A bounded queue of scored batches running ``staleness`` batches ahead of the learner.

    Step t (1-based) calls ``next_batch(t)`` before its update and ``finish_step(model, t)`` after
    it: batch i = t - 1 is updated on, batch t - 1 + k is sampled meanwhile (by the weights of
    version t - 1, in a background thread with ``overlap``), then the rollout weights are synced.
    Between steps the queue holds batches t .. t + k - 1, which a checkpoint stores.
    """

    def __init__(self, collector: Collector, staleness: int, overlap: bool):
        self.collector, self.k = collector, staleness
        self.queue: deque[ScoredBatch] = deque()  # at most staleness + 1 batches
        self.next_index = 0  # the index of the next batch to sample
        self.overlap = overlap and staleness > 0  # with k = 0 the update needs the batch just sampled
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if self.overlap else None
        self._pending: Future | None = None

    def _collect_next(self) -> ScoredBatch:
        i = self.next_index
        expected = max(i - self.k, 0)
        if self.collector.weights.version != expected:
            raise RuntimeError(f"batch {i} must be sampled by policy version {expected} (rollout.staleness="
                               f"{self.k}), but the rollout weights hold version {self.collector.weights.version}; "
                               "was rollout.staleness changed across a resume?")
        self.next_index += 1
        return self.collector.collect(i)

    def next_batch(self, step: int, timings: dict[str, float]) -> ScoredBatch:
        """The batch to update on at ``step``; launches the sampling of batch step - 1 + k."""
        i = step - 1
        while self.next_index < i + self.k:  # only at the start of a run
            self._push(self._collect_next(), timings)
        if self.overlap:
            self._pending = self._executor.submit(self._collect_next)
        else:
            self._push(self._collect_next(), timings)
        data = self.queue.popleft()
        if data.index != i:
            raise RuntimeError(f"step {step} expected batch {i}, the queue holds batch {data.index}")
        return data

    def finish_step(self, learner_model: torch.nn.Module, version: int, timings: dict[str, float]) -> None:
        """After the update: wait for the background batch, then sync the rollout weights."""
        if self._pending is not None:
            t0 = time.perf_counter()
            data = self._pending.result()
            timings["wait_rollout"] = timings.get("wait_rollout", 0.0) + time.perf_counter() - t0
            timings["background_rollout"] = timings.get("background_rollout", 0.0) + sum(data.timings.values())
            self._pending = None
            self._push(data, None)
        self.collector.sync(learner_model, version)

    def _push(self, data: ScoredBatch, timings: dict[str, float] | None) -> None:
        if len(self.queue) > self.k:
            raise RuntimeError(f"the batch queue is full ({len(self.queue)} batches, rollout.staleness={self.k})")
        for k, v in (data.timings.items() if timings is not None else ()):
            timings[k] += v
        self.queue.append(data)

    def state(self) -> dict[str, Any]:
        """The batches in flight (sampled, not yet updated on) and the collector's EMA state."""
        if self._pending is not None:
            raise RuntimeError("cannot save while a batch is being sampled; call finish_step first")
        return {"in_flight": [d.to_state() for d in self.queue], "batch_freq_probs": self.collector.batch_freq_state.probs}

    def load_state(self, state: dict[str, Any], step: int, device: torch.device) -> None:
        """Restore the state saved after ``step`` (a checkpoint of a synchronous run has no batches)."""
        self.queue.clear()
        self.queue.extend(ScoredBatch.from_state(s, device) for s in state.get("in_flight", []))
        if [d.index for d in self.queue] != list(range(step, step + len(self.queue))):
            raise RuntimeError(f"checkpoint of step {step} holds batches {[d.index for d in self.queue]}")
        self.next_index = step + len(self.queue)
        if state.get("batch_freq_probs") is not None:
            self.collector.batch_freq_state.probs = state["batch_freq_probs"].to(device)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
