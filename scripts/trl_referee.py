#!/usr/bin/env python
"""TRL referee for a tokentrust regime (issue 18, item 1): stock ``trl.GRPOTrainer`` on the same work.

Runs TRL 1.16's own ``GRPOTrainer`` (not tokentrust's ``TokenTrustGRPOTrainer`` subclass) on what a
synchronous tokentrust run of ``--preset`` (default ``tiny-arith-headroom``) trains on, all of it
taken from tokentrust itself:

* the model: the preset's warm start, ``tokentrust.train.policy.build_policy`` (the cached tiny model
  ``~/.cache/tokentrust/tiny-<hash>`` whose key matches the preset; built by tokentrust if missing);
* the prompts: the task's training problems in the order the trainer's collector draws them
  (``Collector.prompts_for_step(i)`` for batch i = 0 .. steps-1, seeded by the run seed), formatted by
  ``tokentrust.train.prompting.format_prompt``; TRL walks them in that order (``shuffle_dataset=False``);
* the reward: ``tokentrust.rewards.trl_reward(task)`` (the task's own verifier);
* the evaluation: ``tokentrust.study.evaluate.evaluate`` with the arguments ``Trainer.finish`` uses (greedy
  pass@1 on the preset's test problems), for the warm start and for the model after RL.

The recipe mirrors the preset: num_generations = group_size, prompts_per_step prompts per generation
batch, num_iterations = ppo_epochs, steps_per_generation = minibatches (so ppo_epochs x minibatches
optimizer updates per batch, each on group_size x prompts_per_step / minibatches completions),
epsilon = eps_low, beta 0, scale_rewards "none", temperature, max_completion_length =
max_new_tokens, AdamW at optim.lr with the same per-update linear warm-up (update k at
lr * min(1, (k + 1) / warmup_steps), as ``tokentrust.train.learner``) and max_grad_norm.
``loss_type="dapo"``: token-sum over the minibatch divided by its token count (TRL: the generation
batch's count / steps_per_generation), i.e. our ``algo.agg: token-mean``; "grpo" would average
per sequence first (our ``seq-mean-token-mean``), which the preset does not use.

Writes OUT/results.json (settings, warm start and after-RL evaluations, reward/entropy summaries,
timings, machine), OUT/log_history.json (TRL's per-update log), OUT/warm_start/ and OUT/eval/
(tokentrust's results.json + problems.jsonl), OUT/final_model/.

Run with the integrations venv (``bash scripts/setup_integrations.sh``)::

    OMP_NUM_THREADS=1 .venv-integrations/bin/python scripts/trl_referee.py --seed 1000 \\
        --out runs/trl-referee/seed_1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True, help="run seed (prompt order, sampling, TRL seed)")
    ap.add_argument("--out", required=True, help="output directory (under runs/)")
    ap.add_argument("--preset", default="tiny-arith-headroom")
    ap.add_argument("--steps", type=int, default=None, help="generation batches (default: the preset's max_steps)")
    ap.add_argument("--loss-type", default="dapo", choices=["dapo", "grpo"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-warm-eval", action="store_true", help="do not evaluate the warm start")
    ap.add_argument("--skip-eval", action="store_true", help="do not evaluate after RL (smoke runs)")
    ap.add_argument("--stop-at", default=None,
                    help="UTC wall-clock time HH:MM: stop training at the first generation-batch boundary after it, "
                         "then evaluate as usual (results.json records the batches done); for a shared machine")
    ap.add_argument("--save-every", type=int, default=25, help="save the model every N generation batches (0: never)")
    return ap.parse_args(argv)


def evaluate_like_trainer(cfg, model, tokenizer, task, table, out_dir, reference=None):
    """``tokentrust.study.evaluate.evaluate`` with the arguments ``Trainer.finish`` passes."""
    from tokentrust.study.evaluate import evaluate

    return evaluate(model, tokenizer, task, out_dir=out_dir, split=cfg.task.eval_split, limit=cfg.task.eval_limit,
                    samples=cfg.task.eval_samples, max_new_tokens=cfg.rollout.max_new_tokens,
                    temperature=cfg.rollout.temperature, seed=cfg.seed, table=table,
                    bucket_edges=cfg.algo.thresholds.bucket_edges, system_prompt=cfg.task.system_prompt,
                    reference=reference)


def summary(res: dict) -> dict:
    keys = ("greedy_pass@1", "acc_rare_answer", "acc_common_answer", "num_problems", "num_rare_answer",
            "mean_length", "garbage_share", "coherence_nll", "rare_share")
    return {k: res.get(k) for k in keys}


def window_means(values: list[float], n: int = 10) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return sum(values[:n]) / len(values[:n]), sum(values[-n:]) / len(values[-n:])


def _deadline(hhmm: str | None) -> float | None:
    """Epoch seconds of the next UTC HH:MM (today, or tomorrow when it has passed)."""
    if not hhmm:
        return None
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    h, m = (int(x) for x in hhmm.split(":"))
    t = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if t <= now:
        t += dt.timedelta(days=1)
    return t.timestamp()


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class BatchCallback(_callback_base()):
    """At generation-batch boundaries: save the model every ``save_every`` batches, and stop after ``deadline``."""

    def __init__(self, per_batch: int, deadline: float | None, save_every: int, ckpt_dir: Path, tokenizer):
        self.per_batch, self.deadline, self.save_every = per_batch, deadline, save_every
        self.ckpt_dir, self.tokenizer, self.stopped = ckpt_dir, tokenizer, False
        self.t0 = time.time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.per_batch:
            return control
        batches = state.global_step // self.per_batch
        print(f"batch {batches} done, {time.time() - self.t0:.0f} s", flush=True)
        if self.save_every and batches % self.save_every == 0 and model is not None:
            from tokentrust.train.models import save_model

            save_model(model, self.tokenizer, self.ckpt_dir / f"batch_{batches}")
        if self.deadline is not None and time.time() >= self.deadline and not control.should_training_stop:
            print(f"--stop-at reached after {batches} generation batches: stopping", flush=True)
            self.stopped = True
            control.should_training_stop = True
        return control


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)

    import copy

    import trl
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tokentrust.train.collector import Collector
    from tokentrust.train.config import resolve
    from tokentrust.train.models import save_model
    from tokentrust.train.policy import build_policy, frequency_table_for
    from tokentrust.train.prompting import format_prompt
    from tokentrust.rewards import trl_reward
    from tokentrust.tasks import get_task
    from tokentrust.train.loop import task_options

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(preset=args.preset, overrides={"seed": args.seed, "out_dir": str(out)})
    if cfg.rollout.staleness or cfg.algo.kl_coef or cfg.algo.adv_std_norm:
        raise SystemExit(f"{args.preset}: the referee covers synchronous runs without KL or std normalisation")
    steps = cfg.max_steps if args.steps is None else args.steps
    r, o = cfg.rollout, cfg.optim
    device = torch.device("cpu")

    # --- the same task, warm start and prompts as a tokentrust run of this preset and seed
    task = get_task(cfg.task.name, **task_options(cfg))
    train_examples = task.examples("train")
    if cfg.task.train_limit:
        train_examples = train_examples[:cfg.task.train_limit]
    t0 = time.time()
    model, tokenizer = build_policy(cfg, task, device)
    warm_seconds = time.time() - t0
    warm_ref = copy.deepcopy(model).eval()  # the warm start: reference for coherence NLL
    table = frequency_table_for(tokenizer, task, table_path=cfg.algo.thresholds.table,
                                corpus=cfg.algo.thresholds.table_corpus, cache_dir=cfg.model.cache_dir)
    drawer = SimpleNamespace(cfg=cfg, examples=train_examples)  # what Collector.prompts_for_step reads
    rows = []
    for i in range(steps):  # batch i of a synchronous run is collector.collect(i)
        for ex in Collector.prompts_for_step(drawer, i):
            rows.append({"prompt": format_prompt(tokenizer, task, ex, cfg.task.system_prompt), "answer": ex.answer,
                         "question": ex.question, "example_id": ex.id,
                         "example_meta": json.dumps(ex.meta, sort_keys=True)})
    p0 = rows[0]["prompt"]
    assert tokenizer(p0)["input_ids"] == tokenizer(p0, add_special_tokens=False)["input_ids"], \
        "TRL tokenizes prompts with special tokens, tokentrust's rollout without: they must agree"
    dataset = Dataset.from_list(rows)
    reward = trl_reward(task)
    # The stock reward on a gold completion must equal the task's own score (same verifier, same example).
    ex0 = Collector.prompts_for_step(drawer, 0)[0]
    assert reward(prompts=[p0], completions=[task.sft_text(ex0)], answer=[ex0.answer], question=[ex0.question],
                  example_meta=[rows[0]["example_meta"]]) == [task.score(task.sft_text(ex0), ex0).reward]

    # --- evaluate the warm start exactly as the runs are evaluated
    warm = None
    if not args.skip_warm_eval:
        warm = evaluate_like_trainer(cfg, model, tokenizer, task, table, out / "warm_start")
        print(f"warm start: greedy pass@1 {warm['greedy_pass@1']:.3f} rare {warm.get('acc_rare_answer')}", flush=True)

    # --- stock TRL GRPOTrainer, configured like the preset
    per_update = r.prompts_per_step * r.group_size // o.minibatches
    updates = steps * o.ppo_epochs * o.minibatches
    targs = GRPOConfig(
        output_dir=str(out / "trl"), seed=args.seed, data_seed=args.seed,
        use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=per_update, gradient_accumulation_steps=1,
        steps_per_generation=o.minibatches, num_iterations=o.ppo_epochs, num_generations=r.group_size,
        max_steps=updates, shuffle_dataset=False,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0,
        loss_type=args.loss_type, epsilon=cfg.algo.eps_low,
        epsilon_high=cfg.algo.eps_high if cfg.algo.eps_high is not None else cfg.algo.eps_low,
        beta=0.0, scale_rewards="none", mask_truncated_completions=False,
        learning_rate=o.lr, max_grad_norm=o.max_grad_norm, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    assert targs.generation_batch_size == r.prompts_per_step * r.group_size, targs.generation_batch_size
    # AdamW as tokentrust's learner builds it, with its per-update warm-up (TRL's "constant_with_warmup"
    # would give update k lr * k / w, i.e. lr 0 on the first update; ours gives lr * (k + 1) / w).
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                  weight_decay=o.weight_decay, foreach=True)
    w = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / w) if w > 0 else 1.0)
    per_batch = o.ppo_epochs * o.minibatches
    callback = BatchCallback(per_batch, _deadline(args.stop_at), args.save_every, out / "checkpoints", tokenizer)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=dataset,
                          processing_class=tokenizer, optimizers=(optimizer, scheduler), callbacks=[callback])
    assert type(trainer) is GRPOTrainer
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))

    trained = trainer.model
    trained.eval()
    save_model(trained, tokenizer, out / "final_model")
    after = None
    if not args.skip_eval:
        after = evaluate_like_trainer(cfg, trained, tokenizer, task, table, out / "eval", reference=warm_ref)
        print(f"after RL: greedy pass@1 {after['greedy_pass@1']:.3f} rare {after.get('acc_rare_answer')}", flush=True)

    # per generation batch: the logs of the update that generated it carry reward (TRL averages the
    # metrics logged since the previous log; generation happens every ppo_epochs x minibatches updates)
    gen_logs = [h for h in history if "reward" in h]
    rewards = [h["reward"] for h in gen_logs]
    upd_logs = [h for h in history if "entropy" in h]
    entropy_per_batch = []
    k = o.ppo_epochs * o.minibatches
    for b in range(0, len(upd_logs), k):
        entropy_per_batch.append(upd_logs[b]["entropy"])  # first update of the batch: the sampling policy
    rf, rl = window_means(rewards)
    ef, el = window_means(entropy_per_batch)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    result = {
        "referee": "trl.GRPOTrainer (stock)", "trl": trl.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "preset": args.preset, "seed": args.seed, "generation_batches": steps,
        "optimizer_updates": trainer.state.global_step,
        "generation_batches_done": trainer.state.global_step // per_batch, "stopped_early": callback.stopped, "command": " ".join([sys.executable] + sys.argv),
        "settings": {k2: getattr(targs, k2) for k2 in (
            "loss_type", "epsilon", "epsilon_high", "beta", "scale_rewards", "num_generations",
            "generation_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
            "steps_per_generation", "num_iterations", "max_steps", "max_completion_length", "temperature", "top_p",
            "top_k", "learning_rate", "max_grad_norm", "weight_decay", "adam_beta1", "adam_beta2",
            "shuffle_dataset", "mask_truncated_completions", "importance_sampling_level")},
        "warmup_updates": w, "lr_schedule": "lr * min(1, (k+1)/warmup) for update k, then constant",
        "warm_start": summary(warm) if warm else None, "after_rl": summary(after) if after else None,
        "gain": (after["greedy_pass@1"] - warm["greedy_pass@1"]) if (warm and after) else None,
        "reward_per_batch": rewards, "reward_first10": rf, "reward_last10": rl,
        "entropy_per_batch": entropy_per_batch, "entropy_first10": ef, "entropy_last10": el,
        "completion_length_first10_last10": window_means([h.get("completions/mean_length") for h in gen_logs
                                                          if h.get("completions/mean_length") is not None]),
        "clip_ratio_mean": (sum(h.get("clip_ratio/region_mean", 0.0) for h in upd_logs) / max(len(upd_logs), 1)),
        "train_seconds": train_seconds,
        "seconds_per_batch": train_seconds / max(trainer.state.global_step // per_batch, 1),
        "warm_start_load_seconds": warm_seconds, "threads": args.threads, "cpu": cpu,
        "machine": platform.platform(), "train_prompts": len(train_examples),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k2: result[k2] for k2 in ("warm_start", "after_rl", "gain", "reward_first10", "reward_last10",
                                                 "entropy_first10", "entropy_last10", "seconds_per_batch")},
                     indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
