"""Per-phase wall time of RL steps for a preset (generate, score, forward/backward, loss, other),
and synchronous vs staleness-1 step time with and without overlapped sampling.

    python benchmarks/step_time.py                       # tiny-arith and smollm2-gsm8k
    python benchmarks/step_time.py --preset tiny-arith --steps 3 --set rollout.max_new_tokens=32
    python benchmarks/step_time.py --async --preset tiny-arith     # sync vs staleness 1 (+ overlap)

Prints a markdown table (seconds per step, median over the measured steps, after one warm-up
step that is excluded). Scripts, not assertions: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from tokentrust.train.config import deep_merge, parse_set, resolve
from tokentrust.train.loop import TIMING_PHASES, Trainer


ASYNC_MODES = {"synchronous (k=0)": {"staleness": 0, "overlap": False},
               "staleness 1": {"staleness": 1, "overlap": False},
               "staleness 1 + overlap": {"staleness": 1, "overlap": True}}


def measure(preset: str, steps: int, overrides: dict) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        over = deep_merge(overrides, {"out_dir": out,
                                      "log": {"progress": False, "tensorboard": False, "checkpoint_every": 0}})
        cfg = resolve(preset=preset, overrides=over)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, quiet=True)
        setup = time.perf_counter() - t0
        trainer.train_step()  # warm-up: first-call allocations, verifier workers, lazy imports
        records = [trainer.train_step() for _ in range(steps)]
        trainer.close()
    row = {p: statistics.median(r[f"timing/{p}_s"] for r in records) for p in TIMING_PHASES}
    for extra in ("wait_rollout", "background_rollout"):
        row[extra] = statistics.median(r.get(f"timing/{extra}_s", 0.0) for r in records)
    row["total"] = statistics.median(r["timing/step_s"] for r in records)
    row["tokens"] = statistics.median(r["response/length_mean"] * cfg.rollout.prompts_per_step
                                      * cfg.rollout.group_size for r in records)
    row["tokens/s"] = row["tokens"] / row["total"]
    row["setup"] = setup
    row["shape"] = (f"{cfg.rollout.prompts_per_step}x{cfg.rollout.group_size}x{cfg.rollout.max_new_tokens}, "
                    f"{cfg.optim.ppo_epochs} epochs x {cfg.optim.minibatches} minibatches")
    return row


def async_table(preset: str, steps: int, overrides: dict) -> None:
    """Median step time of the synchronous loop vs staleness 1, sampling inline or in a background thread."""
    rows = {name: measure(preset, steps, deep_merge(overrides, {"rollout": mode})) for name, mode in ASYNC_MODES.items()}
    base = rows["synchronous (k=0)"]["total"]
    print(f"\n{preset} ({next(iter(rows.values()))['shape']}), median of {steps} steps after a warm-up step")
    print("\n| mode | step s | vs sync | generate s (inline) | sampling s (background) | waited s | update s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        update = r["forward_backward"] + r["loss"]
        print(f"| {name} | {r['total']:.2f} | {r['total'] / base:.2f}x | {r['generate']:.2f} | "
              f"{r['background_rollout']:.2f} | {r['wait_rollout']:.2f} | {update:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset(s) to measure (default: tiny-arith, smollm2-gsm8k)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--async", dest="async_table", action="store_true",
                    help="compare synchronous vs staleness-1 step time, with and without overlap")
    args = ap.parse_args()
    presets = args.preset or ["tiny-arith", "smollm2-gsm8k"]
    if args.async_table:
        for p in presets:
            async_table(p, args.steps, parse_set(args.overrides))
        return 0
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
