"""Per-phase wall time of RL steps for a preset (generate, score, forward/backward, loss, other).

    python benchmarks/step_time.py                       # tiny-arith and smollm2-gsm8k
    python benchmarks/step_time.py --preset tiny-arith --steps 3 --set rollout.max_new_tokens=32

Prints a markdown table (seconds per step, median over the measured steps, after one warm-up
step that is excluded). Scripts, not assertions: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from tokentrust.config import parse_set, resolve
from tokentrust.trainer import TIMING_PHASES, Trainer


def measure(preset: str, steps: int, overrides: dict) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        over = dict(overrides, out_dir=out)
        over.setdefault("log", {}).update(progress=False, tensorboard=False, checkpoint_every=0)
        cfg = resolve(preset=preset, overrides=over)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, quiet=True)
        setup = time.perf_counter() - t0
        trainer.train_step()  # warm-up: first-call allocations, verifier workers, lazy imports
        records = [trainer.train_step() for _ in range(steps)]
        trainer.close()
    row = {p: statistics.median(r[f"timing/{p}_s"] for r in records) for p in TIMING_PHASES}
    row["total"] = statistics.median(r["timing/step_s"] for r in records)
    row["tokens"] = statistics.median(r["response/length_mean"] * cfg.rollout.prompts_per_step
                                      * cfg.rollout.group_size for r in records)
    row["tokens/s"] = row["tokens"] / row["total"]
    row["setup"] = setup
    row["shape"] = (f"{cfg.rollout.prompts_per_step}x{cfg.rollout.group_size}x{cfg.rollout.max_new_tokens}, "
                    f"{cfg.optim.ppo_epochs} epochs x {cfg.optim.minibatches} minibatches")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset(s) to measure (default: tiny-arith, smollm2-gsm8k)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    presets = args.preset or ["tiny-arith", "smollm2-gsm8k"]
    rows = {p: measure(p, args.steps, parse_set(args.overrides)) for p in presets}
    cols = list(TIMING_PHASES) + ["total"]
    print("\n| preset | work per step | " + " | ".join(f"{c} s" for c in cols) + " | new tokens/s | set-up s |")
    print("|---|---|" + "---:|" * (len(cols) + 2))
    for p, r in rows.items():
        cells = " | ".join(f"{r[c]:.2f}" for c in cols)
        print(f"| {p} | {r['shape']} | {cells} | {r['tokens/s']:.1f} | {r['setup']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
