"""The comparison harness: a 2 x 2 grid end to end, and an interrupted grid finishing only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_overrides
from tokentrust.study.compare import expand_methods, load_grid, run_configs
from tokentrust.study.methods import METHODS


def _grid_file(tmp_path, methods=("ppo", "av-freq-norm"), seeds=(0, 1)):
    over = tiny_overrides(tmp_path / "unused")
    over.pop("out_dir")
    spec = {"preset": "tiny-arith", "methods": list(methods), "seeds": list(seeds), "overrides": over}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    return path


def _compare(grid_file, out, **popen):
    cmd = [sys.executable, "-m", "tokentrust.cli", "compare", "--config", str(grid_file), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_grid_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "grid"
    proc = _compare(_grid_file(tmp_path), out)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-3000:]
    for method in ("ppo", "av-freq-norm"):
        for seed in (0, 1):
            run = out / "runs" / method / f"seed_{seed}"
            assert (run / "DONE").exists() and (run / "eval" / "results.json").exists()
    report = (out / "report.md").read_text()
    assert "H1" in report and "H4" in report
    assert (out / "summary.csv").exists()
    for png in ("reward", "entropy", "rare_share", "kept_frac_buckets", "accuracy"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    grid = json.loads((out / "grid.json").read_text())
    assert grid["methods"]["av-freq-norm"]["family"] == "av-dppo"
    # identical data order across methods: the same prompts at every step for a given seed
    a = [json.loads(x)["prompt"] for x in (out / "runs/ppo/seed_0/samples.jsonl").read_text().splitlines()]
    b = [json.loads(x)["prompt"] for x in (out / "runs/av-freq-norm/seed_0/samples.jsonl").read_text().splitlines()]
    assert a == b and a
    # progress in a log (stdout is a pipe): plain lines, one per run start, no carriage returns
    assert "\r" not in log and log.count(": started (new)") == 4 and log.count(") finished in ") == 4


def test_grid_watch_reads_run_progress_from_metrics(tmp_path, monkeypatch):
    import io
    from types import SimpleNamespace

    from tokentrust.study.compare import _GridWatch
    from tokentrust.train.rundir import JsonlWriter
    from tokentrust.train.tracking import Progress

    monkeypatch.setenv("TOKENTRUST_PROGRESS", "plain")
    runs = [("ppo", 0, SimpleNamespace(out_dir=str(tmp_path / "a"), max_steps=3), "new"),
            ("dppo-tv", 1, SimpleNamespace(out_dir=str(tmp_path / "b"), max_steps=3), "new")]
    buf = io.StringIO()
    bar = Progress(6, "grid demo", "steps", stream=buf, every_s=0)
    watch = _GridWatch(runs, bar)
    watch.poll({0: 1.0})
    log = JsonlWriter(tmp_path / "a" / "metrics.jsonl")
    for step, kept in ((1, 0.5), (2, 0.0)):
        log.write({"step": step, "reward/mean": 0.25 * step, "trust_region/kept_frac": kept})
    watch.poll({0: 1.0})
    log.write({"step": 3, "reward/mean": 1.0})  # written just before the run ended, never polled
    watch.finished(0)
    watch.poll({0: 1.0, 1: 2.0})
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[1/2] ppo seed 0: started (new)")
    assert lines[1].startswith("grid demo: 0/6 steps") and lines[1].endswith("| ppo s0 starting")
    assert lines[2].startswith("grid demo: 2/6 steps") and lines[2].endswith("| ppo s0 step 2/3 reward 0.500 kept 0.000")
    assert bar.n == 3 and lines[3].startswith("grid demo: 3/6 steps")  # the unpolled last step is counted
    assert lines[4] == "[2/2] dppo-tv seed 1: started (new)" and lines[5].endswith("| dppo-tv s1 starting")


def test_interrupted_grid_finishes_only_missing_runs(tmp_path):
    out = tmp_path / "grid"
    grid_file = _grid_file(tmp_path, methods=("dppo-tv", "ppo"), seeds=(0, 1))
    proc = _compare(grid_file, out, start_new_session=True)
    first = out / "runs" / "dppo-tv" / "seed_0" / "DONE"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the grid and its current run die together
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("DONE")}
    assert 1 <= len(done_before) < 4
    proc = _compare(grid_file, out)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-3000:]
    assert f"{len(done_before)} already done" in log
    for p, mtime in done_before.items():  # finished runs were not rerun
        assert p.stat().st_mtime_ns == mtime
    assert len(list((out / "runs").rglob("DONE"))) == 4


def test_grid_validation_and_method_library():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_methods(["nope"])
    with pytest.raises(ValueError, match="seeds"):
        _bad_seeds()
    for name in ("ppo", "clip-higher", "dppo-tv", "dppo-kl", "dppo-topk-tv", "cppo", "drpo", "av-freq",
                 "av-freq-norm", "av-batch", "av-batch-norm", "av-entropy", "av-entropy-norm", "av-combined",
                 "av-combined-norm", "av-freq-inverse"):
        assert name in METHODS
    assert METHODS["av-freq-inverse"]["algo"]["thresholds"]["beta"] < 0


def _bad_seeds():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"preset": "tiny-arith", "methods": ["ppo"], "seeds": []}, f)
    load_grid(None, f.name)


def test_every_preset_grid_resolves(tmp_path):
    for name in ("demo", "cpu-study", "gpu-study"):
        runs = run_configs(load_grid(name, None), tmp_path / name)
        assert len({(m, s) for m, s, _ in runs}) == len(runs) >= 6


def test_a_method_may_run_fewer_seeds(tmp_path):
    """Grid presets run the primary pair with more seeds than the other methods."""
    from tokentrust.train.config import ConfigError

    spec = {"preset": "tiny-arith", "seeds": [0, 1, 2],
            "methods": ["dppo-tv", {"name": "pg-is", "seeds": [0, 1]}]}
    runs = run_configs(spec, tmp_path)
    assert [(n, s) for n, s, _ in runs] == [("dppo-tv", 0), ("dppo-tv", 1), ("dppo-tv", 2), ("pg-is", 0), ("pg-is", 1)]
    assert runs[-1][2].algo.loss == "pg-is"  # the named METHODS entry, refined by its seeds
    with pytest.raises(ConfigError, match=r"grid.methods\['pg-is'\].seeds"):
        expand_methods([{"name": "pg-is", "seeds": []}])


def test_auto_workers_one_per_core_on_cpu_bounded_by_runs_and_memory():
    from types import SimpleNamespace

    from tokentrust.study.compare import auto_workers

    def cfg(name="tiny", device="cpu"):
        return SimpleNamespace(model=SimpleNamespace(name=name, device=device))

    assert auto_workers([cfg()] * 8, cores=2, memory_gib=24) == 2  # 2 cores: 2 runs x 1 thread
    assert auto_workers([cfg()] * 8, cores=16, memory_gib=24) == 8  # never more than the runs
    assert auto_workers([cfg()], cores=2, memory_gib=24) == 1
    assert auto_workers([cfg("smollm2")] * 4, cores=16, memory_gib=24) == 3  # 6 GiB per real model, 80% of 24
    assert auto_workers([cfg(device="cuda")] * 4, cores=16, memory_gib=128) == 1  # one GPU: one run at a time
    assert auto_workers([], cores=2) == 1
