"""Between the parts of a pre-registered study: check run health without looking at outcomes, and
archive a finished part's records so the study survives across machines and sessions.

    python scripts/study_part.py health GRID_DIR --config GRID_FILE [--part N]
    python scripts/study_part.py pack   GRID_DIR --config GRID_FILE [--part N] [--method M] --out PART.tar.xz

`health` prints, per run of the part: steps logged of max_steps, whether DONE and evaluated, optimizer
steps skipped as non-finite, and whether every logged reward and loss is finite. It prints no
accuracy, reward level or comparison (the stopping rule forbids looking at them before the last part)
and exits 1 if a run is unhealthy or unfinished.

`pack` writes the records the report needs (config, machine, metrics, samples, masked tokens, eval,
DONE) of the part's finished runs, plus grid.json and the warm start's evaluation, into one xz tar
whose paths are relative to GRID_DIR: `tar -xJf PART.tar.xz -C GRID_DIR` restores them. Checkpoints,
weights and tensorboard files stay out.
"""

from __future__ import annotations

import argparse
import math
import sys
import tarfile
from pathlib import Path

from tokentrust.study.compare import load_grid, part_runs, run_configs
from tokentrust.train.rundir import load_metrics

RUN_FILES = ("config.json", "machine.json", "metrics.jsonl", "samples.jsonl", "masked_tokens.json", "DONE", "eval")
WARM_FILES = ("config.json", "machine.json", "DONE", "eval")


def part_dirs(grid_dir: Path, config: str, part: str | None) -> list[tuple[str, int, Path, int]]:
    """(method, seed, run dir, max_steps) of every run in the part, in grid order."""
    spec = load_grid(file=config)
    selected = part_runs(spec, part)
    return [(name, seed, Path(cfg.out_dir), cfg.max_steps) for name, seed, cfg in run_configs(spec, grid_dir)
            if selected is None or (name, seed) in selected]


def run_health(run_dir: Path, max_steps: int) -> dict:
    """Health fields of one run; no outcome."""
    steps, finite, skipped = 0, True, 0
    for rec in load_metrics(run_dir):
        if "step" not in rec or "reward/mean" not in rec:
            continue
        steps = max(steps, int(rec["step"]))
        skipped = max(skipped, int(rec.get("train/nonfinite_skipped", 0) or 0))
        finite &= all(isinstance(rec.get(k), (int, float)) and math.isfinite(rec[k])
                      for k in ("reward/mean", "loss/total") if k in rec)
    done, evaluated = (run_dir / "DONE").exists(), (run_dir / "eval" / "results.json").exists()
    healthy = done and evaluated and finite and steps >= max_steps
    return {"steps": steps, "max_steps": max_steps, "done": done, "evaluated": evaluated,
            "nonfinite_skipped": skipped, "finite": finite, "healthy": healthy}


def health(grid_dir: Path, config: str, part: str | None) -> int:
    bad = 0
    print("| method | seed | steps | DONE | evaluated | non-finite skips | finite | healthy |")
    print("|---|---:|---:|---|---|---:|---|---|")
    for name, seed, run_dir, max_steps in part_dirs(grid_dir, config, part):
        h = run_health(run_dir, max_steps)
        bad += not h["healthy"]
        print(f"| {name} | {seed} | {h['steps']}/{max_steps} | {h['done']} | {h['evaluated']} | "
              f"{h['nonfinite_skipped']} | {h['finite']} | {h['healthy']} |")
    print(f"{bad} unhealthy or unfinished run(s)")
    return 1 if bad else 0


def pack(grid_dir: Path, config: str, part: str | None, out: Path, method: str | None = None) -> int:
    """Archive the part's finished runs (only `method`'s if given, so that each archive stays small),
    and grid.json and the warm start's evaluation."""
    members = [grid_dir / "grid.json"] + [grid_dir / "warm_start" / f for f in WARM_FILES]
    runs = [d for name, _, d, _ in part_dirs(grid_dir, config, part)
            if (d / "DONE").exists() and method in (None, name)]
    members += [d / f for d in runs for f in RUN_FILES]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for m in members:
            if m.exists():
                tar.add(m, arcname=str(m.relative_to(grid_dir)))
    print(f"{out}: {len(runs)} finished run(s), {out.stat().st_size / 1e6:.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("health", "pack"))
    ap.add_argument("grid_dir", type=Path)
    ap.add_argument("--config", required=True, help="the grid file the study runs")
    ap.add_argument("--part", default=None, help="the grid's part (default: every run of the grid)")
    ap.add_argument("--out", type=Path, help="pack: the archive to write")
    ap.add_argument("--method", default=None, help="pack: only this method's runs (one archive per method)")
    a = ap.parse_args(argv)
    if a.command == "health":
        return health(a.grid_dir, a.config, a.part)
    if a.out is None:
        ap.error("pack needs --out")
    return pack(a.grid_dir, a.config, a.part, a.out, a.method)


if __name__ == "__main__":
    sys.exit(main())
