"""Where the time of one tiny RL run goes: generation, scoring, thresholds, the pi_old / mismatch
forward, the minibatch updates (forward, loss, backward, diagnostics, optimizer), logging,
checkpoints and the end-of-run evaluation.

    python benchmarks/profile_tiny.py                          # tiny-arith-async (the study preset), 6 steps
    python benchmarks/profile_tiny.py --steps 4 --set rollout.max_new_tokens=32
    python benchmarks/profile_tiny.py --threads 2
    python benchmarks/profile_tiny.py --set optim.packed_forward=false --set rollout.packed_decode=false  # old paths

Wraps the loop's functions with CPU-time timers (``time.process_time``: unlike wall time it hardly
depends on other load on the machine; no change to the code it measures) and prints a markdown
table: CPU seconds per step (mean over the measured steps, after one warm-up step), share of the
step, and calls per step. Sampling runs inline here (``rollout.overlap=false``) so that each
phase is attributed once; with overlap the generation hides behind the update instead. Scripts,
not assertions: numbers depend on the machine (the table names it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from collections import defaultdict

import torch

from tokentrust.train import collector as collector_mod
from tokentrust.train import learner as learner_mod
from tokentrust.train import loop as trainer_mod
from tokentrust.train.config import deep_merge, parse_set, resolve
from tokentrust.train.machine import machine_summary

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_STACK: list[list[float]] = []
CLOCK = time.process_time  # CPU seconds of this process: hardly moved by other load on the machine  # per open timed call: [time spent in timed calls nested inside it]


def timed(name: str, fn):
    """``fn`` with its exclusive wall time (minus timed calls nested inside it) added to TOTALS[name],
    so that the phases add up to the step."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _STACK.append([0.0])
        t0 = CLOCK()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = CLOCK() - t0
            nested = _STACK.pop()[0]
            TOTALS[name] += elapsed - nested
            CALLS[name] += 1
            if _STACK:
                _STACK[-1][0] += elapsed

    return wrapper


@contextlib.contextmanager
def instrumented():
    """Patch the loop's phases with timers for the block (restored afterwards)."""
    from tokentrust.train.rollout.hf import HFRollout

    patches = [
        (HFRollout, "generate", "rollout: generate (KV-cached sampling)"),
        (collector_mod, "compute_thresholds", "rollout: per-token thresholds"),
        (collector_mod.Collector, "sync", "rollout: weight sync"),
        (learner_mod.Learner, "_before_update", "update: pi_old / mismatch forward (no grad)"),
        (learner_mod, "response_logprobs", "update: forward (log-probs of sampled tokens)"),
        (torch.Tensor, "backward", "update: backward"),
        (learner_mod.Learner, "_record_diagnostics", "update: diagnostics"),
        (learner_mod.Learner, "_apply_or_skip", "update: grad clip check + optimizer step"),
        (torch.nn.utils, "clip_grad_norm_", "update: grad norm (clip)"),
        (trainer_mod.Trainer, "_record", "log: step record (bucket / mechanism metrics)"),
        (trainer_mod.Trainer, "save", "log: checkpoint"),
        (trainer_mod.Trainer, "_log_samples", "log: samples"),
        (trainer_mod.Trainer, "finish", "evaluation (end of run)"),
    ]
    saved = []
    for owner, attr, name in patches:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def profile(preset: str, steps: int, overrides: dict, evaluate: bool) -> tuple[dict[str, float], dict, float, float]:
    with tempfile.TemporaryDirectory() as out:
        over = deep_merge({"rollout": {"overlap": False}}, overrides)
        over = deep_merge(over, {"out_dir": out, "log": {"progress": False, "trackers": []}})
        cfg = resolve(preset=preset, overrides=over)
        trainer = trainer_mod.Trainer(cfg, quiet=True)
        trainer.task.score = timed("rollout: verifier scoring", trainer.task.score)
        with instrumented():
            trainer.train_step()  # warm-up: lazy imports, first allocations
            TOTALS.clear()
            CALLS.clear()
            t0 = CLOCK()
            for _ in range(steps):
                trainer.train_step()
            step_s = (CLOCK() - t0) / steps
            per_step = {k: v / steps for k, v in TOTALS.items()}
            calls = {k: v / steps for k, v in CALLS.items()}
            eval_s = 0.0
            if evaluate:
                TOTALS.clear()
                t0 = CLOCK()
                trainer.finish()
                eval_s = CLOCK() - t0
        trainer.close()
    return per_step, calls, step_s, eval_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-arith-async")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study runs 2 workers x 1 thread)")
    ap.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_step, calls, step_s, eval_s = profile(args.preset, args.steps, parse_set(args.overrides), not args.no_eval)
    print(f"\n{args.preset}, {args.threads} thread(s), mean of {args.steps} steps after a warm-up step; "
          f"{machine_summary()}\n")
    print("| phase (exclusive CPU time) | CPU s / step | share of step | calls / step |")
    print("|---|---:|---:|---:|")
    accounted = 0.0
    for name, secs in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {secs:.3f} | {100 * secs / step_s:.1f}% | {calls.get(name, 0):.1f} |")
        accounted += secs
    print(f"| other (scoring, advantages, trimming, loss, Python) | {step_s - accounted:.3f} | "
          f"{100 * (step_s - accounted) / step_s:.1f}% | |")
    print(f"| **step** | **{step_s:.3f}** | 100% | |")
    if eval_s:
        print(f"\nend-of-run evaluation: {eval_s:.1f} CPU s (once per run)")


if __name__ == "__main__":
    main()
