"""Runs per CPU hour of a preset: this checkout against an earlier commit, side by side in one run.

    python benchmarks/speed_vs_baseline.py                               # study preset vs 33e005c
    python benchmarks/speed_vs_baseline.py --baseline HEAD~3 --steps 10 --rounds 2
    python benchmarks/speed_vs_baseline.py --set optim.packed_forward=false   # a lever switched off
    python benchmarks/speed_vs_baseline.py --preset tiny-arith-headroom --steps 25 \
        --common rollout.staleness=4 --common optim.lr=5e-5 --common optim.ppo_epochs=2 \
        --common optim.minibatches=4 --common log.mismatch=true --baseline-task-from-checkout
        # the headroom study's off-policy preset (a preset 33e005c does not have: see below)

A preset the baseline does not know is given to it as its parent preset (``tiny-arith``) plus the
checkout preset's own settings as ``--set`` overrides, taken from this checkout's ``PRESETS``
(``baseline_preset``); ``--common`` overrides go to both sides. ``--baseline-task-from-checkout`` copies this checkout's task generators
(``tokentrust/tasks``) into the baseline tree, so that a task option added since (the headroom
preset's ``implied_unit``) draws the same problems on both sides; tasks generate the data and are
not part of what is timed per step.

The baseline commit is exported with ``git archive`` into a temporary folder, and this checkout's
``src`` is copied next to it (so editing the tree during the benchmark changes nothing); both run
with the same interpreter and packages (``PYTHONPATH`` puts their ``src`` first). Each side first
builds its warm start once (not timed). Each round then runs one whole training run per side
(``tokentrust train``: set-up, ``--steps`` RL steps, end-of-run evaluation) as two processes *at
the same time*, one torch thread each: the layout ``compare`` uses on 2 cores.

Runs per CPU hour = 3600 / CPU seconds (user + system, all threads) of the run's process, read with
``os.wait4``: unlike wall time it hardly depends on what else loads the machine. Wall time is shown
too. Prints a markdown table; scripts, not assertions: numbers depend on the machine, which the
table names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokentrust.train.machine import machine_summary

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` under ``dest`` (read-only copy of the sources)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def snapshot_checkout(dest: Path) -> Path:
    """This checkout's ``src`` as it is now (committed or not), copied under ``dest``."""
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def baseline_preset(rev: str, preset: str) -> tuple[str, list[str]]:
    """The baseline's preset and ``--set`` overrides equal to this checkout's ``preset``: the preset
    itself when the baseline has it, else its parent (``tiny-arith``) plus the differences."""
    for path in ("src/tokentrust/train/presets.py", "src/tokentrust/config.py"):  # presets before / after the layout
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            src = shown.stdout
            break
    else:
        raise SystemExit(f"baseline {rev} has no presets file")
    if f'"{preset}"' in src:
        return preset, []
    from tokentrust.train.presets import PRESETS

    parent = "tiny-arith"
    if f'"{parent}"' not in src:
        raise SystemExit(f"baseline {rev} has neither {preset!r} nor {parent!r}; pass --baseline-preset")
    sets = []

    def diff(mine: dict, base: dict, prefix: str) -> None:
        for k, v in mine.items():
            if k in ("out_dir", "max_steps"):  # the run's own: --steps sets max_steps
                continue
            if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "options":
                diff(v, base[k], f"{prefix}{k}.")
            elif base.get(k) != v:
                sets.append(f"{prefix}{k}={json.dumps(v)}")

    diff(PRESETS[preset], PRESETS[parent], "")
    return parent, sets


def start(src: Path, out: Path, preset: str, steps: int, sets: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(src / "src"), OMP_NUM_THREADS="1", TOKENTRUST_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "tokentrust.cli", "train", "--preset", preset, "--out", str(out), "--quiet",
           "--set", f"max_steps={steps}", "--set", "log.trackers=[]"]
    for s in sets:
        cmd += ["--set", s]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(src))


def summarise(out: Path, wall: float, cpu: float) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step = [r["timing/step_s"] for r in rows]
    return {"wall": wall, "cpu": cpu, "step": statistics.median(step), "rest": wall - sum(step)}


def warm_up(src: Path, tmp: Path, name: str, preset: str, sets: list[str]) -> None:
    """Build (or find cached) the side's warm start and frequency table, untimed."""
    proc = start(src, tmp / f"warmup-{name}", preset, 0, [*sets, "task.eval_limit=0"])
    if proc.wait():
        raise RuntimeError(f"{name} warm-up failed; see {tmp / f'warmup-{name}.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="33e005c", help="git revision to compare against")
    ap.add_argument("--preset", default="tiny-arith-async", help="the study's preset")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run (the study runs 40)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override for this checkout's side only (e.g. to switch a lever off)")
    ap.add_argument("--common", action="append", default=[], metavar="KEY=VALUE",
                    help="override for both sides (the study's settings on top of the preset)")
    ap.add_argument("--baseline-task-from-checkout", action="store_true",
                    help="copy this checkout's tokentrust/tasks into the baseline tree (same problems)")
    args = ap.parse_args()
    b_preset, b_sets = baseline_preset(args.baseline, args.preset)
    args.base_preset, args.base_sets = b_preset, [*b_sets, *args.common]
    args.this_sets = [*args.common, *args.sets]
    with tempfile.TemporaryDirectory(prefix="tt-speed-") as tmp_s:
        tmp = Path(tmp_s)
        base = export(args.baseline, tmp / "baseline-src")
        if args.baseline_task_from_checkout:
            shutil.rmtree(base / "src" / "tokentrust" / "tasks")
            shutil.copytree(ROOT / "src" / "tokentrust" / "tasks", base / "src" / "tokentrust" / "tasks",
                            ignore=shutil.ignore_patterns("__pycache__"))
        this = snapshot_checkout(tmp / "this-src")
        print(f"baseline: --preset {b_preset} " + " ".join(f"--set {s}" for s in args.base_sets), flush=True)
        warm_up(base, tmp, "baseline", b_preset, args.base_sets)
        warm_up(this, tmp, "this", args.preset, args.this_sets)
        rounds = [_paired_round(base, this, tmp, i, args) for i in range(args.rounds)]
    print(f"\n{args.preset} {' '.join(args.common)}, {args.steps} RL steps + evaluation per run, 2 runs at a time x 1 thread; "
          f"{machine_summary()}; baseline {args.baseline}\n")
    print("| side | CPU s / run | runs / CPU hour | wall s / run | s / RL step (median, wall) | set-up + "
          "evaluation s (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    mean = {name: {k: statistics.mean(r[name][k] for r in rounds) for k in ("cpu", "wall", "step", "rest")}
            for name in ("baseline", "this checkout")}
    for name, m in mean.items():
        print(f"| {name} | {m['cpu']:.0f} | {3600 / m['cpu']:.2f} | {m['wall']:.0f} | {m['step']:.2f} | {m['rest']:.0f} |")
    ratio = mean["baseline"]["cpu"] / mean["this checkout"]["cpu"]
    print(f"\nruns per CPU hour, this checkout / baseline: **{ratio:.2f}x** (CPU time; wall-time ratio "
          f"{mean['baseline']['wall'] / mean['this checkout']['wall']:.2f}x; {args.rounds} round(s))")


def _paired_round(base: Path, this: Path, tmp: Path, i: int, args) -> dict:
    """Both sides at once; overrides apply to this checkout only. CPU time per process via wait4."""
    procs, t0, result = {}, time.perf_counter(), {}
    for name, src, preset, sets in (("baseline", base, args.base_preset, args.base_sets),
                                    ("this checkout", this, args.preset, args.this_sets)):
        out = tmp / f"{name.replace(' ', '-')}-{i}"
        procs[name] = (start(src, out, preset, args.steps, sets), out)
    while len(result) < len(procs):
        for name, (proc, out) in procs.items():
            if name in result:
                continue
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"{name} run failed:\n{(out.parent / (out.name + '.log')).read_text()[-2000:]}")
            result[name] = summarise(out, time.perf_counter() - t0, usage.ru_utime + usage.ru_stime)
        time.sleep(0.5)
    return result


if __name__ == "__main__":
    main()
