"""GRPO-style RL anchored on the rollout policy, with any registered loss and threshold schedule.

One step:
    1. rollout   sample G responses for each of `prompts_per_step` prompts, recording mu
    2. score     the task's verifier gives rewards; advantages = reward - group mean (/ std)
    3. delta     per-token thresholds from mu (once per batch; they do not depend on pi)
    4. update    `ppo_epochs` x `minibatches` optimizer steps; each forward computes only the
                 sampled tokens' log-probs, the loss comes from the registry
    5. log       one JSON line in metrics.jsonl; checkpoints every N steps

The trainer holds all mutable state (model, optimizer, data position, EMA of batch
frequencies); losses and thresholds are pure functions.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokentrust import checkpoint as ckpt
from tokentrust.config import RunConfig, loss_params
from tokentrust.logits import gather_logprobs, sampled_logprobs
from tokentrust.losses import get_loss
from tokentrust.losses.core import aggregate
from tokentrust.rollout.base import RolloutBatch
from tokentrust.runlog import JsonlWriter, TensorBoard, atomic_write_json, read_jsonl, truncate_jsonl
from tokentrust.thresholds import BatchFrequencyState, compute_thresholds
from tokentrust.vocab import FrequencyTable

TIMING_PHASES = ("generate", "score", "forward_backward", "loss", "other")
NONDETERMINISTIC_KEYS = ("timing/", "perf/")  # wall-clock fields: differ between identical runs


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


@dataclass
class TokenTables:
    """Per-vocabulary-id lookups ([rows] tensors on the model's device, so GPU ids index them)."""

    rarity: torch.Tensor  # float: rho = -log f
    bucket: torch.Tensor  # long: mass buckets, then "unseen", then "special"
    rare: torch.Tensor  # bool: beyond 95% of the corpus token mass, or unseen; never special
    special: torch.Tensor  # bool: EOS, pad, BOS, chat-template markers
    num_buckets: int
    rho_ref: float


def token_tables(table: FrequencyTable, edges: list[float], rows: int, device: torch.device | str) -> TokenTables:
    """``table.token_info`` (ids beyond the table behave as unseen tokens) placed on ``device``."""
    info = table.token_info(rows, edges)
    return TokenTables(rarity=info.rarity.to(device), bucket=info.bucket.to(device), rare=info.rare.to(device),
                       special=info.special.to(device), num_buckets=info.num_buckets, rho_ref=info.rho_ref)


@dataclass
class StepData:
    """A scored rollout batch, ready for the update."""

    batch: RolloutBatch
    rewards: torch.Tensor  # [N]
    correct: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N]
    delta: torch.Tensor | None  # [N, T] per-token thresholds, or None for losses without delta
    ref_logp: torch.Tensor | None  # [N, T] frozen reference policy's log-probs (KL penalty)
    prompts: list[str]


def group_advantages(rewards: torch.Tensor, group_size: int, std_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by the group std."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.flatten()


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_generator(seed: int, step: int, salt: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator fixed by (seed, step): sampling after a resume equals sampling without one."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return g


def response_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float,
                      topk_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi of the sampled tokens [N, T] (differentiable) and, optionally, of given top-K ids.

    Only the response positions' logits are computed (``logits_to_keep``), and the log-softmax
    is taken in chunks, so no extra full [N, T, V] float32 tensor stays alive.
    """
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


def trim(batch: RolloutBatch) -> RolloutBatch:
    """Drop all-padding columns (left of the prompts, right of the responses) to save compute."""
    p_keep = batch.prompt_mask.any(0).nonzero()
    r_len = int(batch.response_mask.sum(-1).max().item()) if batch.response_mask.numel() else 0
    p0 = int(p_keep[0]) if len(p_keep) else 0
    out = {f: getattr(batch, f) for f in ("prompt_ids", "prompt_mask")}
    out = {k: v[:, p0:] for k, v in out.items()}
    for f in ("response_ids", "response_mask", "behavior_logp", "behavior_topk_ids", "behavior_topk_logp",
              "behavior_entropy"):
        v = getattr(batch, f)
        out[f] = v[:, :max(r_len, 1)] if v is not None else None
    return RolloutBatch(response_texts=batch.response_texts, num_generated_tokens=batch.num_generated_tokens, **out)


def slice_cols(x: torch.Tensor | None, batch: RolloutBatch) -> torch.Tensor | None:
    return None if x is None else x[:, :batch.response_ids.shape[1]]


class Trainer:
    """Composes task, model, rollout, thresholds, loss, optimizer, logging and checkpoints."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, quiet: bool = False):
        from tokentrust.policy import build_policy
        from tokentrust.rollout import make_rollout
        from tokentrust.tasks import get_task

        self.cfg = cfg
        self.quiet = quiet
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.device = select_device(cfg.model.device)

        self.task = get_task(cfg.task.name, **self._task_options())
        self.train_examples = self.task.examples("train")
        if cfg.task.train_limit:
            self.train_examples = self.train_examples[:cfg.task.train_limit]
        if not self.train_examples:
            raise ValueError(f"task {cfg.task.name!r} has no training examples")
        self.model, self.tokenizer = build_policy(cfg, self.task, self.device)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.loss_fn = get_loss(cfg.algo.loss)
        self.loss_params = loss_params(cfg)
        self.needs_topk = cfg.algo.loss.startswith("dppo-topk")
        th = cfg.algo.thresholds
        self.threshold_spec = th.spec()
        # a per-token delta tensor only when a schedule asks for one (CPPO's delta is a scalar by design)
        self.uses_delta = "delta" in self.loss_params and th.kind != "constant"
        self.batch_freq_state = BatchFrequencyState()
        self.table = self._frequency_table()
        # A model may have more output rows than the tokenizer has tokens (Qwen: 152,064 vs 151,665).
        rows = max(self.table.vocab_size, self.model.get_output_embeddings().weight.shape[0])
        self.tokens = token_tables(self.table, th.bucket_edges, rows, self.device)

        rollout_kwargs: dict[str, Any] = dict(max_new_tokens=cfg.rollout.max_new_tokens,
                                              temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                              record_topk=cfg.rollout.topk if self.needs_topk else 0,
                                              record_entropy=True)
        if cfg.rollout.backend == "vllm":
            rollout_kwargs.update(workdir=str(self.out / "vllm_weights"),
                                  gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
        self.rollout = make_rollout(cfg.rollout.backend, self.model, self.tokenizer, **rollout_kwargs)
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                           foreach=True)
        self.step = 0
        self.optimizer_steps = 0
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0
        if resume:
            self._resume()
        else:
            self._start_fresh()
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl")
        self.samples_log = JsonlWriter(self.out / "samples.jsonl")
        self.tb = TensorBoard(self.out / "tensorboard", enabled=cfg.log.tensorboard)

    # ------------------------------------------------------------------------------------ set-up

    def _task_options(self) -> dict[str, Any]:
        t = self.cfg.task
        opts = dict(t.options)
        if t.name in ("gsm8k", "math500"):
            if t.data_dir is not None:
                opts["data_dir"] = t.data_dir
            opts.setdefault("on_bad_line", t.on_bad_line)
        # arith's problem set comes from task.options.seed (default 0), not the run seed: runs with
        # different seeds must train and evaluate on the same problems (and share one warm start).
        return opts

    def _frequency_table(self) -> FrequencyTable:
        from tokentrust.policy import frequency_table_for

        th = self.cfg.algo.thresholds
        return frequency_table_for(self.tokenizer, self.task, table_path=th.table, corpus=th.table_corpus,
                                   cache_dir=self.cfg.model.cache_dir)

    def _start_fresh(self) -> None:
        """Begin a new run in ``out``; never silently overwrite a run that can be resumed."""
        if ckpt.latest_checkpoint(self.out / "checkpoints") is not None:
            raise FileExistsError(f"{self.out} already holds a run with checkpoints; pass --resume to continue it, "
                                  "or choose another --out (or delete the directory)")
        for name in ("metrics.jsonl", "samples.jsonl", "DONE"):  # leftovers of a run that never checkpointed
            (self.out / name).unlink(missing_ok=True)
        atomic_write_json(self.out / "config.json", self.cfg.to_dict())

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}")
        state, extra = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = state["step"]
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        if extra.get("batch_freq_probs") is not None:
            self.batch_freq_state.probs = extra["batch_freq_probs"]
        # Lines logged after the checkpoint are replayed by the resumed run: drop them.
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(self.out / name, lambda r: r.get("step", 0) <= self.step)

    def save(self) -> Path:
        extra = {"batch_freq_probs": self.batch_freq_state.probs}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer,
                                    {"optimizer_steps": self.optimizer_steps, "nonfinite_total": self.nonfinite_total,
                                     "data_position": self.step * self.cfg.rollout.prompts_per_step},
                                    extra_tensors={k: v for k, v in extra.items() if v is not None},
                                    keep=self.cfg.log.keep_checkpoints)

    # ---------------------------------------------------------------------------------- one step

    def prompts_for_step(self, step: int) -> list:
        """The step's prompts: a fixed permutation of the training set per pass (seeded)."""
        n = self.cfg.rollout.prompts_per_step
        total = len(self.train_examples)
        out = []
        for pos in range(step * n, (step + 1) * n):
            epoch, i = divmod(pos, total)
            perm = torch.randperm(total, generator=step_generator(self.cfg.seed, epoch, salt=17)).tolist()
            out.append(self.train_examples[perm[i]])
        return out

    def collect(self, step: int, timings: dict[str, float]) -> StepData:
        from tokentrust.prompting import format_prompt

        cfg = self.cfg
        g = cfg.rollout.group_size
        examples = self.prompts_for_step(step)
        prompts = [format_prompt(self.tokenizer, self.task, ex, cfg.task.system_prompt) for ex in examples]
        repeated = [p for p in prompts for _ in range(g)]
        t0 = time.perf_counter()
        self.model.eval()
        batch = self.rollout.generate(repeated, generator=step_generator(cfg.seed, step, device=self.device))
        batch = batch.to(self.device)
        timings["generate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = [self.task.score(text, examples[i // g]) for i, text in enumerate(batch.response_texts)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)
        correct = torch.tensor([s.correct for s in scores], device=self.device)
        advantages = group_advantages(rewards, g, cfg.algo.adv_std_norm)
        timings["score"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        delta = None
        if self.uses_delta:
            delta = compute_thresholds(self.threshold_spec, cfg.algo.delta, batch.response_ids,
                                       batch.response_mask.bool(), rarity=self.tokens.rarity,
                                       rho_ref=self.tokens.rho_ref, entropy=batch.behavior_entropy,
                                       vocab_size=len(self.tokens.rarity),
                                       state=self.batch_freq_state, special=self.tokens.special)
        ref_logp = None
        if self.ref_model is not None or cfg.algo.anchor == "recompute":
            ref_logp, old_logp = self._extra_forwards(batch)
            if old_logp is not None:
                batch.behavior_logp = old_logp
        timings["other"] += time.perf_counter() - t0
        return StepData(batch, rewards, correct, advantages, delta, ref_logp, prompts)

    @torch.no_grad()
    def _extra_forwards(self, batch: RolloutBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference-policy log-probs (KL) and, for anchor=recompute, the current policy's."""
        ref = self._logprobs_by_micro_batch(self.ref_model, batch) if self.ref_model is not None else None
        old = self._logprobs_by_micro_batch(self.model, batch) if self.cfg.algo.anchor == "recompute" else None
        return ref, old

    def _logprobs_by_micro_batch(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] float32 log-probs of the sampled tokens, one trimmed micro-batch at a time (each
        padded back to the batch width T with zeros, so micro-batches of different lengths stack)."""
        width = batch.response_ids.shape[1]
        parts = [response_logprobs(model, mb, self.cfg.rollout.temperature)[0].float()
                 for mb in self._micro_batches(batch, range(len(batch)))]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def _micro_batches(self, batch: RolloutBatch, index) -> list[RolloutBatch]:
        index = list(index)
        size = self.cfg.optim.micro_batch_size or len(index)
        return [trim(batch.select(index[i:i + size])) for i in range(0, len(index), size)]

    def update(self, data: StepData, step: int, timings: dict[str, float]) -> dict[str, float]:
        """ppo_epochs x minibatches optimizer steps on one scored batch."""
        cfg = self.cfg
        n = len(data.batch)
        mean = _RunningMean()
        bucket = _BucketStats(self.tokens.num_buckets, self.device)
        region = TrustRegionStats()
        self.model.train()
        gen = step_generator(cfg.seed, step, salt=29)
        for _ in range(cfg.optim.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for idx in _split(perm, cfg.optim.minibatches):
                mean.add(self._optimizer_step(data, idx, bucket, region, timings))
        out = mean.result()
        out.update(region.result())
        out.update(bucket.metrics())
        return out

    def _optimizer_step(self, data: StepData, idx: list[int], bucket: _BucketStats, region: TrustRegionStats,
                        timings: dict[str, float]) -> dict[str, float]:
        cfg = self.cfg
        mb_mask = data.batch.response_mask[idx]
        norm = {"global_tokens": mb_mask.sum().clamp(min=1).float(),
                "global_seqs": (mb_mask.sum(-1) > 0).sum().clamp(min=1).float()}
        if cfg.algo.agg == "token-mean":
            norm.pop("global_seqs")
        else:
            norm.pop("global_tokens")
        if cfg.algo.agg == "seq-mean-token-sum-norm":
            norm["horizon"] = cfg.rollout.max_new_tokens
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)  # losses: micro-batch parts of one normalised loss add up
        size = cfg.optim.micro_batch_size or len(idx)
        micro = [idx[i:i + size] for i in range(0, len(idx), size)]
        for part in micro:
            t0 = time.perf_counter()
            mb = trim(data.batch.select(part))
            logp, topk = response_logprobs(self.model, mb, cfg.rollout.temperature,
                                           mb.behavior_topk_ids if self.needs_topk else None)
            t1 = time.perf_counter()
            mask = mb.response_mask.bool()
            params = dict(self.loss_params, **norm)
            if data.delta is not None:
                params["delta"] = slice_cols(data.delta[part], mb)
            if self.needs_topk:
                params["behavior_topk_logp"] = mb.behavior_topk_logp
                params["topk_logp"] = topk
            out = self.loss_fn(logp, mb.behavior_logp, data.advantages[part], mask, **params)
            loss = out.loss
            if data.ref_logp is not None:
                ref = slice_cols(data.ref_logp[part], mb)
                log_r = (ref - logp).clamp(-20, 20)
                kl = aggregate(log_r.exp() - log_r - 1, mask, cfg.algo.agg,
                               **{k: v for k, v in norm.items()})
                loss = loss + cfg.algo.kl_coef * kl
                sums["loss/kl"] += kl.item()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            timings["forward_backward"] += (t1 - t0) + (t3 - t2)
            timings["loss"] += t2 - t1
            sums["loss/policy"] += out.loss.item()
            sums["loss/total"] += loss.item()
            adv = mb_advantages(data, part, mask)
            region.add(out.metrics, mask, adv)
            bucket.add(self.tokens.bucket[mb.response_ids], out.keep, mask, adv, params.get("delta"))
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   cfg.optim.max_grad_norm)
        finite = math.isfinite(sums["loss/total"]) and bool(torch.isfinite(grad_norm))
        if finite:
            self._apply_lr()
            self.optimizer.step()
            self.optimizer_steps += 1
            self.consecutive_nonfinite = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_nonfinite += 1
            self.nonfinite_total += 1
            if self.consecutive_nonfinite >= cfg.optim.max_nonfinite_steps:
                raise NonFiniteError(f"{self.consecutive_nonfinite} consecutive optimizer steps had a non-finite "
                                     f"loss or gradient (last loss {sums['loss/total']}, grad norm {float(grad_norm)}); "
                                     "stopping. Lower optim.lr or check the data; see optim.max_nonfinite_steps.")
        sums["actor/grad_norm"] = float(grad_norm)
        return dict(sums)

    def _apply_lr(self) -> None:
        w = self.cfg.optim.warmup_steps
        scale = min(1.0, (self.optimizer_steps + 1) / w) if w > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * scale

    def train_step(self) -> dict[str, Any]:
        """Run one full RL step and return its metrics record."""
        step = self.step + 1
        timings = {k: 0.0 for k in TIMING_PHASES}
        t_start = time.perf_counter()
        data = self.collect(step - 1, timings)
        metrics = self.update(data, step, timings)
        if hasattr(self.rollout, "sync_weights"):  # vLLM holds its own copy of the weights
            self.rollout.sync_weights(self.model)
        self.step = step
        total = time.perf_counter() - t_start
        timings["other"] += total - sum(timings.values())
        record = self._record(data, metrics, timings, total)
        self.metrics_log.write(record)
        self.tb.log(record, step)
        if self.cfg.log.samples_every and step % self.cfg.log.samples_every == 0:
            self._log_samples(data)
        if self.cfg.log.checkpoint_every and step % self.cfg.log.checkpoint_every == 0:
            self.save()
        return record

    def _record(self, data: StepData, metrics: dict[str, float], timings: dict[str, float], total: float) -> dict:
        b = data.batch
        mask = b.response_mask.bool()
        n_tok = int(mask.sum())
        ids = b.response_ids[mask]
        rec: dict[str, Any] = {"step": self.step, "reward/mean": float(data.rewards.mean()),
                               "reward/std": float(data.rewards.std()) if len(data.rewards) > 1 else 0.0,
                               "reward/accuracy": float(data.correct.float().mean()),
                               "reward/zero_std_groups": float((data.rewards.view(-1, self.cfg.rollout.group_size)
                                                                .std(-1) == 0).float().mean()),
                               "response/length_mean": n_tok / max(len(b), 1),
                               "perf/tokens_per_s": n_tok / max(total, 1e-9),
                               "train/optimizer_steps": self.optimizer_steps,
                               "train/nonfinite_skipped": self.nonfinite_total}
        if b.behavior_entropy is not None:
            rec["actor/entropy"] = float((b.behavior_entropy * mask).sum() / max(n_tok, 1))
        shares = torch.bincount(self.tokens.bucket[ids], minlength=self.tokens.num_buckets).float() / max(n_tok, 1)
        for i, s in enumerate(shares.tolist()):
            rec[f"rare/share/bucket_{i}"] = s
        rare = ids[self.tokens.rare[ids]]
        rec["rare/distinct_rare_per_1k"] = 1000.0 * len(torch.unique(rare)) / max(n_tok, 1)
        rec["rare/share"] = len(rare) / max(n_tok, 1)
        rec.update(metrics)
        for k, v in timings.items():
            rec[f"timing/{k}_s"] = v
        rec["timing/step_s"] = total
        return rec

    def _log_samples(self, data: StepData) -> None:
        g = self.cfg.rollout.group_size
        for i in range(min(self.cfg.log.num_samples, len(data.batch))):
            j = i * g  # the first sample of different prompts
            if j >= len(data.batch):
                break
            self.samples_log.write({"step": self.step, "prompt": data.prompts[j // g],
                                    "completion": data.batch.response_texts[j], "reward": float(data.rewards[j])})

    # --------------------------------------------------------------------------------- the loop

    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train up to ``max_steps`` (default: config) total steps; returns the new records."""
        max_steps = self.cfg.max_steps if max_steps is None else max_steps
        records = []
        bar = None
        if self.cfg.log.progress and not self.quiet:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc=f"train {self.cfg.algo.loss}", unit="step",
                       dynamic_ncols=True)
        try:
            while self.step < max_steps:
                rec = self.train_step()
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{rec['reward/mean']:.3f}", kept=f"{rec.get('trust_region/kept_frac', 1):.3f}")
        finally:
            if bar is not None:
                bar.close()
        if self.step >= self.cfg.max_steps:
            if not self.cfg.log.checkpoint_every or self.step % self.cfg.log.checkpoint_every:
                self.save()
        return records

    def finish(self) -> dict[str, Any] | None:
        """End-of-run evaluation on the task's test split; writes eval/ and the DONE marker."""
        from tokentrust.models import save_model

        save_model(self.model, self.tokenizer, self.out / "final_model")  # loadable by `tokentrust eval --model`
        results = None
        if self.cfg.task.eval_limit > 0:
            from tokentrust.evaluate import evaluate

            results = evaluate(self.model, self.tokenizer, self.task, out_dir=self.out / "eval",
                               split=self.cfg.task.eval_split, limit=self.cfg.task.eval_limit,
                               samples=self.cfg.task.eval_samples, max_new_tokens=self.cfg.rollout.max_new_tokens,
                               temperature=self.cfg.rollout.temperature, seed=self.cfg.seed, table=self.table,
                               bucket_edges=self.cfg.algo.thresholds.bucket_edges,
                               system_prompt=self.cfg.task.system_prompt, reference=self._initial_model())
        atomic_write_json(self.out / "DONE", {"step": self.step})
        return results

    def _initial_model(self):
        """The model before RL (for the coherence NLL), or None when it cannot be rebuilt cheaply."""
        from tokentrust.policy import build_policy

        if self.ref_model is not None:
            return self.ref_model
        try:
            model, _ = build_policy(self.cfg, self.task, self.device)
            return model.eval()
        except Exception:
            return None

    def close(self) -> None:
        self.metrics_log.close()
        self.samples_log.close()
        self.tb.close()


def mb_advantages(data: StepData, part: list[int], mask: torch.Tensor) -> torch.Tensor:
    return data.advantages[part][:, None].expand_as(mask)


def _split(items: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(items) / parts)
    return [items[i:i + size] for i in range(0, len(items), size)]


class _RunningMean:
    """Weighted mean per key that skips NaN values (a metric undefined for one part, e.g. no A < 0)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for k, v in values.items():
            self.weights[k] += 0.0
            if v is not None and math.isfinite(v):
                self.sums[k] += v * weight
                self.weights[k] += weight

    def result(self) -> dict[str, float]:
        return {k: (self.sums[k] / w if w > 0 else float("nan")) for k, w in self.weights.items()}


class TrustRegionStats:
    """A loss's per-micro-batch trust-region metrics pooled over a whole step (all micro-batches,
    minibatches and PPO epochs) as if computed on all its tokens at once.

    Every metric a loss reports is a mean over the micro-batch's valid tokens (``*_pos`` / ``*_neg``:
    over its tokens with A > 0 / A < 0), so the pooled value is the mean weighted by those token
    counts; ``*_max`` / ``*_min`` pool as the maximum / minimum. Non-finite values (a metric
    undefined for one part, e.g. no A < 0) are skipped.
    """

    def __init__(self, prefix: str = "trust_region/"):
        self.prefix = prefix
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    @torch.no_grad()
    def add(self, metrics: dict[str, float], mask: torch.Tensor, adv: torch.Tensor) -> None:
        m = mask.bool()
        counts = torch.stack([m.sum(), (m & (adv > 0)).sum(), (m & (adv < 0)).sum()]).tolist()
        for k, v in metrics.items():
            self.weights[k] += 0.0
            if v is None or not math.isfinite(v):
                continue
            if k.endswith(("_max", "_min")):
                pick = max if k.endswith("_max") else min
                if counts[0] > 0:
                    self.extremes[k] = pick(self.extremes.get(k, v), v)
                continue
            w = counts[1] if k.endswith("_pos") else counts[2] if k.endswith("_neg") else counts[0]
            self.sums[k] += v * w
            self.weights[k] += w

    def result(self) -> dict[str, float]:
        out = {}
        for k, w in self.weights.items():
            if k.endswith(("_max", "_min")):
                out[self.prefix + k] = self.extremes.get(k, float("nan"))
            else:
                out[self.prefix + k] = self.sums[k] / w if w > 0 else float("nan")
        return out


class _BucketStats:
    """Kept fraction and mean delta per corpus-frequency bucket (and advantage sign)."""

    def __init__(self, num_buckets: int, device: torch.device):
        self.n = num_buckets
        z = lambda: torch.zeros(num_buckets, device=device)  # noqa: E731
        self.kept, self.count, self.delta = z(), z(), z()
        self.kept_pos, self.count_pos, self.kept_neg, self.count_neg = z(), z(), z(), z()

    @torch.no_grad()
    def add(self, buckets: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
            delta: torch.Tensor | float | None) -> None:
        b = buckets.to(keep.device)[mask]
        k = keep[mask].float()
        self.count += torch.bincount(b, minlength=self.n).float()
        self.kept += torch.bincount(b, weights=k, minlength=self.n)
        a = adv[mask]
        for sel, kept, cnt in ((a > 0, self.kept_pos, self.count_pos), (a < 0, self.kept_neg, self.count_neg)):
            cnt += torch.bincount(b[sel], minlength=self.n).float()
            kept += torch.bincount(b[sel], weights=k[sel], minlength=self.n)
        if isinstance(delta, torch.Tensor):
            self.delta += torch.bincount(b, weights=delta[mask].float(), minlength=self.n)
        elif delta is not None:
            self.delta += torch.bincount(b, minlength=self.n).float() * float(delta)

    def metrics(self) -> dict[str, float]:
        out = {}
        rows = torch.stack([self.kept / self.count, self.delta / self.count, self.kept_pos / self.count_pos,
                            self.kept_neg / self.count_neg]).tolist()
        for i in range(self.n):
            out[f"trust_region/kept_frac/bucket_{i}"] = rows[0][i]
            out[f"trust_region/delta_mean/bucket_{i}"] = rows[1][i]
            out[f"trust_region/kept_frac/bucket_{i}/pos"] = rows[2][i]
            out[f"trust_region/kept_frac/bucket_{i}/neg"] = rows[3][i]
        return out


def run_training(cfg: RunConfig, *, resume: bool = False, max_steps: int | None = None, quiet: bool = False,
                 evaluate_at_end: bool = True) -> Path:
    """Train (and evaluate) one run described by ``cfg``; returns the run directory."""
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    try:
        trainer.train(max_steps)
        if trainer.step >= cfg.max_steps and evaluate_at_end:
            trainer.finish()
    finally:
        trainer.close()
    return trainer.out


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")
