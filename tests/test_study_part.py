"""scripts/study_part.py: run health without outcomes, and the archive of a finished part."""

import json
import tarfile
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def sp():
    return load_script("study_part")


def _grid(tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"preset": "tiny-arith", "methods": ["ppo", "dppo-tv"], "seeds": [0, 1],
                             "overrides": {"max_steps": 3}, "parts": {"1": ["ppo"], "2": ["dppo-tv"]}}))
    return str(f)


def _run(d: Path, steps: int, done: bool, loss: float = 0.1) -> None:
    d.mkdir(parents=True)
    recs = [{"step": t, "reward/mean": 0.5, "loss/total": loss if t == steps else 0.1} for t in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n" + '{"step": 9, "rew')
    (d / "config.json").write_text("{}")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "big.pt").write_text("x")
    if done:
        (d / "eval").mkdir()
        (d / "eval" / "results.json").write_text("{}")
        (d / "DONE").write_text("")


def test_health_flags_unfinished_and_nonfinite_runs_and_prints_no_outcome(tmp_path, sp, capsys):
    cfg, grid = _grid(tmp_path), tmp_path / "out"
    _run(grid / "runs" / "ppo" / "seed_0", 3, True)
    _run(grid / "runs" / "ppo" / "seed_1", 2, False)
    _run(grid / "runs" / "dppo-tv" / "seed_0", 3, True, loss=float("nan"))
    _run(grid / "runs" / "dppo-tv" / "seed_1", 3, True)
    assert sp.run_health(grid / "runs" / "ppo" / "seed_0", 3)["healthy"]
    h = sp.run_health(grid / "runs" / "ppo" / "seed_1", 3)
    assert (h["steps"], h["done"], h["healthy"]) == (2, False, False)
    assert not sp.run_health(grid / "runs" / "dppo-tv" / "seed_0", 3)["finite"]
    assert sp.health(grid, cfg, "1") == 1
    assert sp.health(grid, cfg, "2") == 1
    out = capsys.readouterr().out
    assert "reward" not in out and "pass@1" not in out
    (grid / "runs" / "ppo" / "seed_1" / "DONE").write_text("")
    assert sp.run_health(grid / "runs" / "ppo" / "seed_1", 3)["healthy"] is False  # 2 of 3 steps, no eval


def test_pack_holds_the_part_records_without_checkpoints(tmp_path, sp):
    cfg, grid = _grid(tmp_path), tmp_path / "out"
    (grid / "warm_start" / "eval").mkdir(parents=True)
    (grid / "warm_start" / "eval" / "results.json").write_text("{}")
    (grid / "grid.json").write_text("{}")
    _run(grid / "runs" / "ppo" / "seed_0", 3, True)
    _run(grid / "runs" / "ppo" / "seed_1", 2, False)  # unfinished: left out
    _run(grid / "runs" / "dppo-tv" / "seed_0", 3, True)  # another part: left out
    assert sp.pack(grid, cfg, "1", tmp_path / "p1.tar.xz") == 0
    with tarfile.open(tmp_path / "p1.tar.xz") as tar:
        names = set(tar.getnames())
    assert {"grid.json", "warm_start/eval/results.json", "runs/ppo/seed_0/metrics.jsonl",
            "runs/ppo/seed_0/eval/results.json", "runs/ppo/seed_0/DONE"} <= names
    assert not any("checkpoints" in n or "seed_1" in n or "dppo-tv" in n for n in names)


def test_pack_one_method(tmp_path, sp):
    cfg, grid = _grid(tmp_path), tmp_path / "out"
    _run(grid / "runs" / "ppo" / "seed_0", 3, True)
    _run(grid / "runs" / "dppo-tv" / "seed_0", 3, True)
    assert sp.pack(grid, cfg, None, tmp_path / "d.tar.xz", method="dppo-tv") == 0
    with tarfile.open(tmp_path / "d.tar.xz") as tar:
        names = set(tar.getnames())
    assert "runs/dppo-tv/seed_0/metrics.jsonl" in names and not any("ppo/" in n and "dppo" not in n for n in names)
