"""The training loop: connects the collector and the learner, logs and checkpoints.

One step t:
    1. batch     the pipeline hands over batch t - 1, sampled by the policy weights of step
                 t - k (k = rollout.staleness; 0 = sample now, synchronous), and starts sampling
                 batch t - 1 + k (in a background thread with rollout.overlap)
                 (collector: rollout recording mu, verifier rewards, group advantages, per-token
                 thresholds, reference log-probs)
    2. update    the learner makes ppo_epochs x minibatches optimizer steps on it
    3. sync      the rollout side receives the new weights (version t)
    4. log       one JSON line in metrics.jsonl; checkpoints (with the batches in flight) every N steps

The loop holds the run's bookkeeping (step, run directory, logs); the collector owns sampling
state (rollout weights, EMA of batch frequencies, the queue), the learner the model and
optimizer. Losses and thresholds are pure functions.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from tokentrust.train import checkpoint as ckpt
from tokentrust.train.collector import BatchPipeline, Collector, ScoredBatch, group_advantages, token_tables  # noqa: F401
from tokentrust.train.config import RunConfig
from tokentrust.train.diagnostics import mechanism_metrics
from tokentrust.train.learner import Learner, NonFiniteError  # noqa: F401  (NonFiniteError: part of this module's API)
from tokentrust.train.machine import record_machine
from tokentrust.train.rollout.weights import RolloutWeights
from tokentrust.train.rundir import JsonlWriter, atomic_write_json, truncate_jsonl
from tokentrust.train.tracking import Progress, Trackers
from tokentrust.vocab import FrequencyTable, TokenInfo

TIMING_PHASES = ("generate", "score", "forward_backward", "loss", "other")
NONDETERMINISTIC_KEYS = ("timing/", "perf/")  # wall-clock fields: differ between identical runs


def task_options(cfg: RunConfig) -> dict[str, Any]:
    """``get_task`` keyword arguments of a run's task.

    arith's problem set comes from task.options.seed (default 0), not the run seed: runs with
    different seeds must train and evaluate on the same problems (and share one warm start)."""
    t = cfg.task
    opts = dict(t.options)
    if t.name in ("gsm8k", "math500"):
        if t.data_dir is not None:
            opts["data_dir"] = t.data_dir
        opts.setdefault("on_bad_line", t.on_bad_line)
    return opts


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Builds task, model, collector and learner from a config and runs the loop."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, quiet: bool = False):
        from tokentrust.train.policy import build_policy
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
        self.table = self._frequency_table()
        # A model may have more output rows than the tokenizer has tokens (Qwen: 152,064 vs 151,665).
        rows = max(self.table.vocab_size, self.model.get_output_embeddings().weight.shape[0])
        self.tokens: TokenInfo = token_tables(self.table, cfg.algo.thresholds.bucket_edges, rows, self.device)
        self.learner = Learner(cfg, self.model, self.tokens.bucket, self.tokens.num_buckets)
        self.collector = self._build_collector()
        self.pipeline = BatchPipeline(self.collector, cfg.rollout.staleness, cfg.rollout.overlap)
        self.step = 0
        if resume:
            self._resume()
        else:
            self._start_fresh()
        self.metrics_log = JsonlWriter(self.out / "metrics.jsonl")
        self.samples_log = JsonlWriter(self.out / "samples.jsonl")
        lg = cfg.log
        self.trackers = Trackers.open(lg.trackers, self.out, cfg.to_dict(), project=lg.project, run_name=lg.run_name,
                                      group=lg.group)

    # ------------------------------------------------------------------------------------ set-up

    def _task_options(self) -> dict[str, Any]:
        return task_options(self.cfg)

    def _frequency_table(self) -> FrequencyTable:
        from tokentrust.train.policy import frequency_table_for

        th = self.cfg.algo.thresholds
        return frequency_table_for(self.tokenizer, self.task, table_path=th.table, corpus=th.table_corpus,
                                   cache_dir=self.cfg.model.cache_dir)

    def _build_collector(self) -> Collector:
        """The rollout side: its weights (own copy when stale or in another dtype) and sampler."""
        from tokentrust.train.rollout import make_rollout

        cfg = self.cfg
        r = cfg.rollout
        weights = RolloutWeights(self.model, own_copy=r.backend == "hf" and r.staleness > 0,
                                 dtype=r.dtype if r.backend == "hf" else "same")
        kwargs: dict[str, Any] = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                      record_topk=r.topk if self.learner.needs_topk else 0, record_entropy=True)
        if r.backend == "hf":
            kwargs["packed"] = r.packed_decode
        if r.backend == "vllm":
            kwargs.update(workdir=str(self.out / "vllm_weights"), gpu_memory_utilization=r.vllm_gpu_memory_utilization)
        self.rollout = make_rollout(r.backend, weights.model, self.tokenizer, **kwargs)
        uses_delta = "delta" in self.learner.loss_params and cfg.algo.thresholds.kind != "constant"
        return Collector(cfg, self.task, self.train_examples, self.tokenizer, self.rollout, weights, self.tokens,
                         self.device, ref_model=self.ref_model, uses_delta=uses_delta)

    # the learner's state, under the names the trainer had before the split
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def loss_fn(self):
        return self.learner.loss_fn

    @loss_fn.setter
    def loss_fn(self, fn) -> None:
        self.learner.loss_fn = fn

    @property
    def optimizer_steps(self) -> int:
        return self.learner.optimizer_steps

    @property
    def nonfinite_total(self) -> int:
        return self.learner.nonfinite_total

    # ------------------------------------------------------------------------------ checkpoints

    def _start_fresh(self) -> None:
        """Begin a new run in ``out``; never silently overwrite a run that can be resumed."""
        if ckpt.latest_checkpoint(self.out / "checkpoints") is not None:
            raise FileExistsError(f"{self.out} already holds a run with checkpoints; pass --resume to continue it, "
                                  "or choose another --out (or delete the directory)")
        for name in ("metrics.jsonl", "samples.jsonl", "DONE"):  # leftovers of a run that never checkpointed
            (self.out / name).unlink(missing_ok=True)
        atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        record_machine(self.out)  # float32 results depend on the CPU's vector width: say which one ran

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}")
        state, extra = ckpt.load_checkpoint(path, self.model, self.optimizer)
        saved_k = state.get("staleness", 0)
        if saved_k != self.cfg.rollout.staleness:
            raise ValueError(f"rollout.staleness is {self.cfg.rollout.staleness} but checkpoint {path.name} was "
                             f"written with staleness {saved_k}; resume with the same value")
        self.step = state["step"]
        record_machine(self.out, resumed=True)
        self.learner.load_state(state, version=self.step)
        self.pipeline.load_state(extra, self.step, self.device)
        self.learner.masked_tokens.load_state(extra)
        self.collector.sync(self.model, self.step)  # the rollout side starts from the checkpoint's weights
        # Lines logged after the checkpoint are replayed by the resumed run: drop them.
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(self.out / name, lambda r: r.get("step", 0) <= self.step)

    def save(self) -> Path:
        """Checkpoint: weights, optimizer, RNG, and the batches in flight (sampled, not yet trained on)."""
        extra = {**self.pipeline.state(), **self.learner.masked_tokens.state()}
        self.write_masked_tokens()
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer,
                                    {**self.learner.state(), "staleness": self.cfg.rollout.staleness,
                                     "data_position": self.step * self.cfg.rollout.prompts_per_step},
                                    extra_tensors={k: v for k, v in extra.items() if v is not None},
                                    keep=self.cfg.log.keep_checkpoints)

    def write_masked_tokens(self, top: int = 20) -> None:
        """RUN_DIR/masked_tokens.json: the run's most-masked token ids so far, with counts, decoded."""
        atomic_write_json(self.out / "masked_tokens.json",
                          {"step": self.step, "counted_per": "loss call (each PPO epoch)",
                           "masked_total": int(self.learner.masked_tokens.masked.sum()),
                           "seen_total": int(self.learner.masked_tokens.seen.sum()),
                           "top": self.learner.masked_tokens.top(top, self.tokenizer)})

    # ---------------------------------------------------------------------------------- one step

    def prompts_for_step(self, step: int) -> list:
        return self.collector.prompts_for_step(step)

    def train_step(self) -> dict[str, Any]:
        """Run one full RL step and return its metrics record."""
        step = self.step + 1
        timings = {k: 0.0 for k in TIMING_PHASES}
        t_start = time.perf_counter()
        data = self.pipeline.next_batch(step, timings)
        metrics = self.learner.update(data, step, timings)
        self.pipeline.finish_step(self.model, self.learner.version, timings)
        self.step = step
        total = time.perf_counter() - t_start
        timings["other"] += total - sum(timings[k] for k in TIMING_PHASES) - timings.get("wait_rollout", 0.0)
        record = self._record(data, metrics, timings, total)
        self.metrics_log.write(record)
        self.trackers.log(record, step)
        if self.cfg.log.samples_every and step % self.cfg.log.samples_every == 0:
            self._log_samples(data)
        if self.cfg.log.checkpoint_every and step % self.cfg.log.checkpoint_every == 0:
            self.save()
        return record

    def _record(self, data: ScoredBatch, metrics: dict[str, float], timings: dict[str, float], total: float) -> dict:
        b = data.batch
        mask = b.response_mask.bool()
        n_tok = int(mask.sum())
        ids = b.response_ids[mask]
        rec: dict[str, Any] = {"step": self.step, "reward/mean": float(data.rewards.mean()),
                               "reward/std": float(data.rewards.std()) if len(data.rewards) > 1 else 0.0,
                               "reward/accuracy": float(data.correct.float().mean()),
                               "reward/zero_std_groups": float((data.rewards.view(-1, self.cfg.rollout.group_size)
                                                                .std(-1) == 0).float().mean()),
                               "reward/verifier_timeouts": data.verifier_timeouts,
                               "reward/verifier_errors": data.verifier_errors,
                               "response/length_mean": n_tok / max(len(b), 1),
                               "perf/tokens_per_s": n_tok / max(total, 1e-9),
                               "train/optimizer_steps": self.optimizer_steps,
                               "train/nonfinite_skipped": self.nonfinite_total,
                               "rollout/policy_version": data.policy_version,
                               "rollout/staleness": self.step - 1 - data.policy_version,
                               "rollout/weights_fingerprint": data.fingerprint}
        if b.behavior_entropy is not None:
            rec["actor/entropy"] = float((b.behavior_entropy * mask).sum() / max(n_tok, 1))
        shares = torch.bincount(self.tokens.bucket[ids], minlength=self.tokens.num_buckets).float() / max(n_tok, 1)
        for i, s in enumerate(shares.tolist()):
            rec[f"rare/share/bucket_{i}"] = s
        rare = ids[self.tokens.rare[ids]]
        rec["rare/distinct_rare_per_1k"] = 1000.0 * len(torch.unique(rare)) / max(n_tok, 1)
        rec["rare/share"] = len(rare) / max(n_tok, 1)
        plain = mask & ~self.tokens.special[b.response_ids]
        rec.update(mechanism_metrics(self.tokens.rarity[b.response_ids], b.behavior_logp, plain,
                                     self.tokens.bucket[b.response_ids], self.tokens.num_buckets))
        rec.update(metrics)
        for k, v in timings.items():
            rec[f"timing/{k}_s"] = v
        rec["timing/step_s"] = total
        return rec

    def _log_samples(self, data: ScoredBatch) -> None:
        g = self.cfg.rollout.group_size
        rows = [{"step": self.step, "prompt": data.prompts[j // g], "completion": data.batch.response_texts[j],
                 "reward": float(data.rewards[j])}  # the first sample of different prompts
                for j in range(0, min(self.cfg.log.num_samples * g, len(data.batch)), g)]
        for row in rows:
            self.samples_log.write(row)
        self.trackers.log_samples(rows, self.step)

    # --------------------------------------------------------------------------------- the loop

    def train(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train up to ``max_steps`` (default: config) total steps; returns the new records."""
        max_steps = self.cfg.max_steps if max_steps is None else max_steps
        records = []
        with Progress(max_steps, f"train {self.cfg.algo.loss}", "steps", initial=self.step,
                      quiet=self.quiet or not self.cfg.log.progress) as bar:
            while self.step < max_steps:
                rec = self.train_step()
                records.append(rec)
                bar.update(1, f"reward {rec['reward/mean']:.3f} kept {rec.get('trust_region/kept_frac', 1):.3f}")
        if self.step >= self.cfg.max_steps:
            if not self.cfg.log.checkpoint_every or self.step % self.cfg.log.checkpoint_every:
                self.save()
        return records

    def finish(self) -> dict[str, Any] | None:
        """End-of-run evaluation on the task's test split; writes eval/ and the DONE marker."""
        from tokentrust.train.models import save_model

        save_model(self.model, self.tokenizer, self.out / "final_model")  # loadable by `tokentrust eval --model`
        results = None
        if self.cfg.task.eval_limit > 0:
            from tokentrust.study.evaluate import evaluate

            results = evaluate(self.model, self.tokenizer, self.task, out_dir=self.out / "eval",
                               split=self.cfg.task.eval_split, limit=self.cfg.task.eval_limit,
                               samples=self.cfg.task.eval_samples, max_new_tokens=self.cfg.rollout.max_new_tokens,
                               temperature=self.cfg.rollout.temperature, seed=self.cfg.seed, table=self.table,
                               bucket_edges=self.cfg.algo.thresholds.bucket_edges,
                               system_prompt=self.cfg.task.system_prompt, reference=self._initial_model(),
                               progress=self.cfg.log.progress and not self.quiet)
        atomic_write_json(self.out / "DONE", {"step": self.step})
        return results

    def _initial_model(self):
        """The model before RL (for the coherence NLL), or None when it cannot be rebuilt cheaply."""
        from tokentrust.train.policy import build_policy

        if self.ref_model is not None:
            return self.ref_model
        try:
            model, _ = build_policy(self.cfg, self.task, self.device)
            return model.eval()
        except Exception:
            return None

    def close(self) -> None:
        self.pipeline.close()
        self.metrics_log.close()
        self.samples_log.close()
        self.trackers.close()


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
