"""A grid of methods x seeds with identical data order, rollout budget and evaluation.

Layout: ``GRID_DIR/grid.json`` (the resolved grid), ``GRID_DIR/runs/<method>/seed_<s>/`` (one run
directory each). Rerunning a grid skips runs that finished (``DONE``), resumes runs that have a
checkpoint and restarts the others, then rebuilds the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tokentrust.study.grids import GRID_PRESETS
from tokentrust.study.methods import METHODS
from tokentrust.study.secondary import parse_family
from tokentrust.train.config import ConfigError, deep_merge, load_file, resolve
from tokentrust.train.rundir import atomic_write_json, read_jsonl
from tokentrust.train.tracking import Progress


def load_grid(preset: str | None = None, file: str | None = None) -> dict[str, Any]:
    """A grid spec: {"preset"|"config", "methods": [names or {name: overrides}], "seeds", "overrides"}."""
    if preset is None and file is None:
        preset = "demo"
    if preset is not None:
        if preset not in GRID_PRESETS:
            raise ConfigError(f"unknown grid preset {preset!r}; available: {', '.join(sorted(GRID_PRESETS))}")
        spec = json.loads(json.dumps(GRID_PRESETS[preset]))
        spec["name"] = preset
    else:
        spec = load_file(file)
        spec.setdefault("name", Path(file).stem)
    unknown = set(spec) - {"name", "preset", "config", "methods", "seeds", "overrides", "primary", "secondary",
                           "parts"}
    if unknown:
        raise ConfigError(f"unknown grid key(s) {sorted(unknown)}; known: preset, config, methods, seeds, overrides, "
                          "primary, secondary, parts")
    try:
        family = parse_family(spec.get("secondary"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    names = set(expand_methods(spec["methods"]))
    for c in family:
        missing = [m for m in (c.method, c.baseline, *(m for m, _ in c.doses)) if m and m not in names]
        if c.grid is None and missing:
            raise ConfigError(f"grid.secondary.{c.key} names methods not in grid.methods: {missing}")
    if not spec.get("methods"):
        raise ConfigError("grid.methods must list at least one method")
    if not isinstance(spec.get("primary", {}), dict):
        raise ConfigError(f"grid.primary must be {{'method': ..., 'baseline': ...}}, got {spec['primary']!r}")
    if not spec.get("seeds") or not all(isinstance(s, int) for s in spec["seeds"]):
        raise ConfigError(f"grid.seeds must be a non-empty list of integers, got {spec.get('seeds')}")
    return spec


def part_runs(spec: dict[str, Any], part: str | None) -> set[tuple[str, int]] | None:
    """The (method, seed) pairs of grid part ``part`` (None: the whole grid).

    A part is a list of method names (each with all its seeds) or ``{"methods": [...], "seeds": [...]}``
    (either key may be left out: every method, or every seed of each method)."""
    if part is None:
        return None
    parts = spec.get("parts") or {}
    if str(part) not in parts:
        raise ConfigError(f"grid {spec.get('name')!r} has no part {part!r}; parts: {', '.join(parts) or 'none'}")
    entry = parts[str(part)]
    methods = expand_methods(spec["methods"])
    names = set(entry.get("methods", methods) if isinstance(entry, dict) else entry)
    unknown = names - set(methods)
    if unknown:
        raise ConfigError(f"grid.parts[{part!r}] names methods not in grid.methods: {sorted(unknown)}")
    only = set(entry["seeds"]) if isinstance(entry, dict) and "seeds" in entry else None
    return {(n, s) for n in names for s in methods[n].get("seeds", spec["seeds"]) if only is None or s in only}


def expand_methods(methods: list[Any]) -> dict[str, dict[str, Any]]:
    """Method names (from METHODS) or {"name": ..., "algo": ..., "family": ..., "seeds": [...]} dicts ->
    {name: entry}. A dict naming a METHODS entry without "algo" refines it (e.g. fewer seeds)."""
    out = {}
    for m in methods:
        if isinstance(m, str):
            if m not in METHODS:
                raise ConfigError(f"unknown method {m!r}; available: {', '.join(sorted(METHODS))}")
            out[m] = json.loads(json.dumps(METHODS[m]))
        elif isinstance(m, dict) and "name" in m:
            entry = {k: v for k, v in m.items() if k != "name"}
            if "algo" not in entry and m["name"] in METHODS:
                entry = deep_merge(json.loads(json.dumps(METHODS[m["name"]])), entry)
            entry.setdefault("family", "baseline")
            seeds = entry.get("seeds")
            if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
                raise ConfigError(f"grid.methods[{m['name']!r}].seeds must be a non-empty list of integers, got {seeds!r}")
            out[m["name"]] = entry
        else:
            raise ConfigError(f"grid.methods entries must be names or {{'name': ..., 'algo': ...}}, got {m!r}")
    return out


def run_configs(spec: dict[str, Any], grid_dir: Path, overrides: dict[str, Any] | None = None) -> list[tuple[str, int, Any]]:
    """Resolve every (method, seed) into a validated RunConfig (all before any run starts)."""
    methods = expand_methods(spec["methods"])
    base = deep_merge(spec.get("overrides", {}), overrides or {})
    out = []
    for name, entry in methods.items():
        run_over = json.loads(json.dumps({k: v for k, v in entry.items()
                                          if k not in ("family", "description", "seeds")}))
        # a method without a schedule is plain fixed-threshold, whatever the base preset says
        run_over.setdefault("algo", {}).setdefault("thresholds", {"kind": "constant"})
        for seed in entry.get("seeds", spec["seeds"]):
            over = deep_merge(deep_merge(base, run_over), {"seed": seed,
                                                           "out_dir": str(grid_dir / "runs" / name / f"seed_{seed}")})
            over.setdefault("log", {})["progress"] = False
            cfg = resolve(preset=spec.get("preset"), file=spec.get("config"), overrides=over)
            out.append((name, seed, cfg))
    return out


def run_status(run_dir: Path) -> str:
    if (run_dir / "DONE").exists():
        return "done"
    if (run_dir / "checkpoints" / "LATEST").exists():
        return "resume"
    return "new"


def _run_one(cfg: Any, status: str, threads: int) -> None:
    """Run one configuration in a subprocess (isolation, parallelism, and crash containment)."""
    run_dir = Path(cfg.out_dir)
    if status == "new" and run_dir.exists():
        shutil.rmtree(run_dir)  # a run that never checkpointed: start clean
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f".{run_dir.name}.config.json"
    atomic_write_json(cfg_file, cfg.to_dict())
    cmd = [sys.executable, "-m", "tokentrust.cli", "train", "--out", str(run_dir)]
    cmd += ["--resume"] if status == "resume" else ["--config", str(cfg_file)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENTRUST_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}); see {run_dir.parent / (run_dir.name + '.log')}")


class _GridWatch:
    """Follows the running runs of a grid through their metrics.jsonl and feeds the progress display."""

    def __init__(self, pending: list[tuple[str, int, Any, str]], bar: Progress):
        self.pending, self.bar = pending, bar
        self.steps = {i: self._last_step(i) for i in range(len(pending))}  # resumed runs start where they were
        self.done: set[int] = set()
        self.announced: set[int] = set()
        self.t0 = time.time()
        if sum(self.steps.values()):
            self.bar.update(sum(self.steps.values()))

    def _records(self, i: int) -> list[dict[str, Any]]:
        return read_jsonl(Path(self.pending[i][2].out_dir) / "metrics.jsonl")

    def _last_step(self, i: int) -> int:
        if self.pending[i][3] != "resume":
            return 0
        records = self._records(i)
        return int(records[-1]["step"]) if records else 0

    def poll(self, started: dict[int, float]) -> None:
        """Announce new runs, count their new steps and show the newest running run's state."""
        newest, advanced = None, 0
        for i in sorted(started, key=started.get):
            name, seed, cfg, status = self.pending[i]
            if i not in self.announced:
                self.announced.add(i)
                self.bar.note(f"[{len(self.announced)}/{len(self.pending)}] {name} seed {seed}: started ({status})"
                              + ("; the first run also builds the model's warm start" if len(self.announced) == 1 else ""))
            if i in self.done:
                continue
            records = self._records(i)
            step = int(records[-1]["step"]) if records else self.steps[i]
            advanced += max(0, step - self.steps[i])
            self.steps[i] = step
            last = records[-1] if records else None
            newest = f"{name} s{seed} " + (_run_state(last, cfg.max_steps) if last else "starting")
            if last and step >= cfg.max_steps:
                newest = f"{name} s{seed} evaluating"
        self.bar.update(advanced, newest)

    def finished(self, i: int) -> None:
        """A run ended: count any steps not yet seen (its full budget when it succeeded)."""
        self.done.add(i)
        records = self._records(i)
        step = int(records[-1]["step"]) if records else self.steps[i]
        self.bar.update(max(0, step - self.steps[i]))
        self.steps[i] = step


def evaluate_warm_start(cfg: Any, grid_dir: Path, threads: int = 1) -> Path:
    """GRID_DIR/warm_start/: the first run's configuration with no RL step (the model every run starts
    from), evaluated exactly as the runs are; the report's reference row. Skipped once DONE."""
    run_dir = grid_dir / "warm_start"
    if not (run_dir / "DONE").exists():
        ref = cfg.model_copy(update={"max_steps": 0, "out_dir": str(run_dir)})
        _run_one(ref, "new", threads)
    return run_dir


def _run_state(record: dict[str, Any], max_steps: int) -> str:
    kept = record.get("trust_region/kept_frac")
    reward = record.get("reward/mean")
    return (f"step {record['step']}/{max_steps} reward {'nan' if reward is None else f'{reward:.3f}'} "
            f"kept {'nan' if kept is None else f'{kept:.3f}'}")


def auto_workers(configs: list[Any], cores: int | None = None, memory_gib: float | None = None) -> int:
    """Runs in parallel when ``--workers`` is not given: one on a GPU; on a CPU one per core (tiny
    models gain little from a second thread: a 2-core machine runs 2 runs x 1 thread), at most as
    many as there are runs and as fit in memory (about 1 GiB per tiny run, 6 GiB per real model)."""
    if not configs:
        return 1
    cores = cores or os.cpu_count() or 1
    if any(c.model.device == "cuda" for c in configs):
        return 1
    if any(c.model.device == "auto" for c in configs):
        import torch

        if torch.cuda.is_available():
            return 1
    if memory_gib is None:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    per_run = 1.0 if all(c.model.name == "tiny" for c in configs) else 6.0
    return max(1, min(cores, len(configs), int(memory_gib * 0.8 // per_run)))


def run_grid(spec: dict[str, Any], grid_dir: str | Path, *, workers: int | None = None,
             overrides: dict[str, Any] | None = None,
             command: str = "", build_report: bool = True, quiet: bool = False, part: str | None = None) -> Path:
    """Run (or finish) every run of the grid (or of its part ``part``), then write the report over all
    finished runs. grid.json always describes the whole grid.

    Progress (unless ``quiet``): an overall bar over all RL steps with ETA and the newest running run's
    step, reward and kept fraction on a terminal; otherwise a line per run start and end and a status
    line at most every 15 s (read from the runs' metrics.jsonl).
    """
    grid_dir = Path(grid_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    runs = run_configs(spec, grid_dir, overrides)
    methods = expand_methods(spec["methods"])
    atomic_write_json(grid_dir / "grid.json", {
        "name": spec.get("name"), "command": command, "seeds": spec["seeds"],
        **({"primary": spec["primary"]} if "primary" in spec else {}),
        **({"secondary": spec["secondary"]} if "secondary" in spec else {}),
        **({"parts": spec["parts"]} if "parts" in spec else {}),
        "methods": {n: {"family": e.get("family", "baseline"), "description": e.get("description", ""),
                        **e.get("algo", {})} for n, e in methods.items()},
        "config": {"preset": spec.get("preset"), "config": spec.get("config"),
                   "overrides": deep_merge(spec.get("overrides", {}), overrides or {})},
        "resolved_example": runs[0][2].to_dict() if runs else {},
    })
    selected = part_runs(spec, part)
    todo = [(n, s, c, run_status(Path(c.out_dir))) for n, s, c in runs if selected is None or (n, s) in selected]
    pending = [t for t in todo if t[3] != "done"]
    if workers is None:
        workers = auto_workers([c for _, _, c, _ in pending])
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    print(f"grid {spec.get('name')}{'' if part is None else f' part {part}'}: {len(todo)} runs, "
          f"{len(todo) - len(pending)} already done, "
          f"{len(pending)} to run with {workers} worker(s) x {threads} thread(s)", flush=True)
    if runs and runs[0][2].task.eval_limit > 0 and not (grid_dir / "warm_start" / "DONE").exists():
        # first, with every core: it builds the warm start (SFT) once, before the workers would race to
        print("warm start: building and evaluating the model every run starts from", flush=True)
        evaluate_warm_start(runs[0][2], grid_dir, threads=os.cpu_count() or 1)
    failures = []
    started: dict[int, float] = {}  # index in pending -> start time (set by the worker thread)

    def work(i, item):
        name, seed, cfg, status = item
        started[i] = time.time()
        _run_one(cfg, status, threads)
        return time.time() - started[i]

    total_steps = sum(c.max_steps for _, _, c, _ in pending)
    with Progress(total_steps, f"grid {spec.get('name')}", "steps", quiet=quiet) as bar, \
            ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        futures = {pool.submit(work, i, t): i for i, t in enumerate(pending)}
        watch = _GridWatch(pending, bar)
        waiting = set(futures)
        while waiting:
            finished, waiting = wait(waiting, timeout=1.0, return_when=FIRST_COMPLETED)
            watch.poll(started)
            for fut in sorted(finished, key=futures.get):
                name, seed, _, status = pending[futures[fut]]
                try:
                    secs = fut.result()
                    watch.finished(futures[fut])
                    bar.note(f"[{len(watch.done)}/{len(pending)}] {name} seed {seed} ({status}) finished in "
                             f"{secs:.0f}s (elapsed {time.time() - watch.t0:.0f}s)")
                except RuntimeError as e:
                    failures.append(str(e))
                    watch.finished(futures[fut])
                    bar.note(f"FAILED: {e}")
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed; rerun the same command to retry them. First: {failures[0]}")
    if build_report:
        from tokentrust.study.report.build import build_report as _build

        path = _build(grid_dir, baseline="dppo-tv" if "dppo-tv" in methods else next(iter(methods)))
        print(f"report: {path}")
    return grid_dir
