"""A run killed with SIGKILL at random moments resumes from its last complete checkpoint and,
once finished, has exactly the metrics of an uninterrupted run (nothing lost, nothing doubled)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_overrides
from tokentrust.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from tokentrust.train.config import resolve
from tokentrust.train.rundir import read_jsonl
from tokentrust.train.loop import NONDETERMINISTIC_KEYS, Trainer, run_training

STEPS = 8


def _det(records):
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC_KEYS)} for r in records]


def _complete_lines(path):
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "metrics.jsonl kept a partial line"
    return [json.loads(line) for line in text.splitlines()]


def _start(cfg_file, run_dir, resume):
    cmd = [sys.executable, "-m", "tokentrust.cli", "train", "--out", str(run_dir), "--no-eval"]
    cmd += ["--resume"] if resume else ["--config", str(cfg_file)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))


def test_sigkill_at_random_moments_then_resume(tmp_path):
    over = tiny_overrides(tmp_path / "ref", max_steps=STEPS, log={"checkpoint_every": 2, "keep_checkpoints": 2})
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(over))
    # the reference goes through the same entry point (a CLI subprocess), uninterrupted
    proc = _start(cfg_file, tmp_path / "ref", resume=False)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    ref = _det(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))

    run_dir = tmp_path / "killed"
    cfg_file.write_text(json.dumps(dict(over, out_dir=str(run_dir))))
    rng = random.Random(1234)
    kills = 0
    for attempt in range(12):
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        proc = _start(cfg_file, run_dir, resume)
        if kills < 3:
            # wait for the process to get going (imports take seconds), then kill it at a random moment
            before = len(_complete_lines(run_dir / "metrics.jsonl"))
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if len(_complete_lines(run_dir / "metrics.jsonl")) > before:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                lines = _complete_lines(run_dir / "metrics.jsonl")  # never a partial line
                ckpt = latest_checkpoint(run_dir / "checkpoints")
                if ckpt is not None:  # what LATEST points at is always complete
                    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.json").exists()
                    saved = json.loads((ckpt / "trainer_state.json").read_text())["step"]
                    assert saved <= len(lines) or not lines
                continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        if (run_dir / "DONE").exists() or len(read_jsonl(run_dir / "metrics.jsonl")) == STEPS:
            break
    assert kills >= 1
    got = _det(read_jsonl(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    diffs = [(r["step"], k, r.get(k), g.get(k)) for r, g in zip(ref, got) for k in set(r) | set(g) if r.get(k) != g.get(k)]
    assert not diffs, diffs[:10]


def test_interrupted_checkpoint_write_is_never_resumed(tmp_path):
    over = tiny_overrides(tmp_path / "run", max_steps=2, log={"checkpoint_every": 1})
    run_training(resolve(overrides=over), quiet=True, evaluate_at_end=False)
    ckpts = tmp_path / "run" / "checkpoints"
    # a crash while writing step 3 leaves a temporary folder and no LATEST update
    partial = ckpts / ".tmp_step_000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(ckpts).name == "step_000002"
    trainer = Trainer(resolve(overrides=over), resume=True, quiet=True)
    assert trainer.step == 2
    trainer.close()


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_checkpoint_gives_clear_error(tmp_path, damage):
    over = tiny_overrides(tmp_path / "run", max_steps=1, log={"checkpoint_every": 1})
    run_training(resolve(overrides=over), quiet=True, evaluate_at_end=False)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "tamper":
        opt = ckpt / "optimizer.pt"
        data = bytearray(opt.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
        opt.write_bytes(bytes(data))
    else:
        (ckpt / "trainer_state.json").unlink()
    trainer = Trainer(resolve(overrides=dict(over, out_dir=str(tmp_path / "other"))), quiet=True)
    with pytest.raises(CheckpointError, match=str(ckpt.name)):
        load_checkpoint(ckpt, trainer.model, trainer.optimizer)
    trainer.close()
