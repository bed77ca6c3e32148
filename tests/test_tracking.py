"""Trackers: W&B offline run files hold the run's metrics, config and samples; progress output modes."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_overrides
from tokentrust.train.config import ConfigError, resolve
from tokentrust.train.rundir import read_jsonl
from tokentrust.train.tracking import Progress, Trackers, numeric_items
from tokentrust.train.loop import run_training


def read_wandb_records(path: Path) -> list:
    """Decode a ``run-*.wandb`` file (wandb's LevelDB-style log of protobuf Records), written here
    from the format description so the test does not rely on wandb reading its own files."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL, or the LAST piece of a record split over blocks
            out.append(pb.Record.FromString(pending))
            pending = b""
    return out


def test_wandb_offline_run_holds_metrics_config_and_samples(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    cfg = resolve(overrides=tiny_overrides(tmp_path / "run", task={"eval_limit": 0},
                                           log={"trackers": ["wandb"], "project": "tt-test", "group": "g"}))
    out = run_training(cfg, quiet=True)
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # finish() hands the records to wandb's service process; teardown waits until it wrote them
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    run_id = (out / "wandb_run_id").read_text().strip()
    records = read_wandb_records(run_dir / f"run-{run_id}.wandb")

    history: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(int(items.get("_step", r.history.step.num)), {}).update(items)
    expected = read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in expected] == [1, 2]
    for e in expected:
        logged = history[e["step"]]
        for key, value in numeric_items(e):
            assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), key
        assert "rollout/weights_fingerprint" not in logged or isinstance(e["rollout/weights_fingerprint"], (int, float))
    assert any(k.startswith("samples") for k in history[2])  # the samples table of step 2

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    for r in records:  # later config updates, if any
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert {k: config[k] for k in cfg.to_dict()} == json.loads(json.dumps(cfg.to_dict()))
    assert (run.project, run.run_group, run.run_id) == ("tt-test", "g", run_id)
    (table,) = (run_dir / "files" / "media" / "table").glob("samples_2_*.table.json")  # the step-2 table
    rows = json.loads(table.read_text())["data"]
    assert [row[-1] for row in rows] == [s["reward"] for s in read_jsonl(out / "samples.jsonl") if s["step"] == 2]


def test_wandb_tracker_needs_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.trackers has 'wandb' but wandb is not installed"):
        resolve(overrides={"log": {"trackers": ["wandb"]}})


def test_trackers_fan_out_numbers_only():
    seen = []

    class Fake:
        def log(self, record, step):
            seen.append((step, record))

        def log_samples(self, rows, step):
            seen.append((step, rows))

        def close(self):
            seen.append("closed")

    t = Trackers([Fake(), Fake()])
    t.log(dict(numeric_items({"a/b": 1.5, "s": "x", "flag": True, "nan": float("nan"), "n": 3})), 4)
    t.close()
    assert seen == [(4, {"a/b": 1.5, "n": 3})] * 2 + ["closed"] * 2


def test_progress_plain_lines_are_rate_limited_and_carriage_return_free(monkeypatch):
    monkeypatch.delenv("TOKENTRUST_PROGRESS", raising=False)
    clock = [100.0]
    monkeypatch.setattr("tokentrust.train.tracking.time.monotonic", lambda: clock[0])
    buf = io.StringIO()  # not a terminal: plain lines
    with Progress(10, "compare", "steps", stream=buf, every_s=15) as p:
        p.note("[1/2] ppo seed 0 started")
        for i in range(10):
            clock[0] += 4.0
            p.update(1, f"step {i + 1}")
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "[1/2] ppo seed 0 started"
    # updates at t = 4, 8, ..., 40 s: a line at the first update after each 15 s gap, then the final one
    assert lines[1:] == ["compare: 1/10 steps [00:04, ETA 00:36] | step 1",
                         "compare: 5/10 steps [00:20, ETA 00:20] | step 5",
                         "compare: 9/10 steps [00:36, ETA 00:04] | step 9",
                         "compare: 10/10 steps [00:40] | step 10"]


def test_progress_quiet_and_terminal_modes(monkeypatch):
    monkeypatch.delenv("TOKENTRUST_PROGRESS", raising=False)
    buf = io.StringIO()
    with Progress(3, "x", stream=buf, quiet=True) as p:
        p.note("hidden")
        p.update(3)
    assert buf.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress(3, "train", "steps", stream=tty) as p:
        p.update(2, "reward 0.5")
    assert p.mode == "bar" and "\r" in tty.getvalue() and "reward 0.5" in tty.getvalue()
    monkeypatch.setenv("TOKENTRUST_PROGRESS", "off")
    assert Progress(3, "x", stream=Tty()).mode == "off"
    # regression (review): quiet on a terminal still drew the tqdm bar
    monkeypatch.delenv("TOKENTRUST_PROGRESS")
    quiet_tty = Tty()
    with Progress(3, "train", "steps", stream=quiet_tty, quiet=True) as p:
        p.update(2, "reward 0.5")
    assert p.bar is None and quiet_tty.getvalue() == ""


def test_tensorboard_tracker_writes_the_scalars_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Trackers.open(["tensorboard"], tmp_path, {"seed": 0})
    t.log({"reward/mean": 0.5, "note": "x", "loss/total": -1.25}, 1)
    t.log({"reward/mean": 0.75}, 2)
    t.log_samples([{"step": 2, "prompt": "a|b", "completion": "c\nd", "reward": 1.0}], 2)
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    assert [e.value for e in acc.Scalars("loss/total")] == [-1.25] and "note" not in acc.Tags()["scalars"]
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "a\\|b" in text and "c d" in text
