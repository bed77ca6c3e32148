"""End-to-end trainer tests on a seconds-long tiny-arith configuration."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from tokentrust.config import resolve
from tokentrust.runlog import read_jsonl
from tokentrust.trainer import NONDETERMINISTIC_KEYS, Trainer, group_advantages, run_training

AV = {"loss": "dppo-tv", "thresholds": {"kind": "frequency", "beta": 0.5, "normalize": True}}


def _deterministic(records):
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC_KEYS)} for r in records]


@pytest.mark.parametrize("algo", [{"loss": "ppo"}, {"loss": "dppo-tv"}, AV, {"loss": "cppo"}],
                         ids=["ppo", "dppo-tv", "av-dppo", "cppo"])
def test_two_steps_write_metrics_config_checkpoint(tmp_path, algo):
    out = run_training(resolve(overrides=tiny_overrides(tmp_path / "run", algo=algo)), quiet=True)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward/mean", "loss/total", "actor/grad_norm", "trust_region/kept_frac", "actor/entropy",
                "timing/generate_s", "perf/tokens_per_s", "rare/share/bucket_0", "trust_region/kept_frac/bucket_0"):
        assert key in records[0], key
    assert records[-1]["train/optimizer_steps"] == 2 * 2 * 2  # steps x epochs x minibatches
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algo"]["loss"] == algo["loss"]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").exists()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert 0 <= results["greedy_pass@1"] <= 1 and results["num_problems"] == 4
    assert (out / "DONE").exists() and (out / "final_model").is_dir()
    if algo is AV:  # the schedule really produced per-token thresholds
        assert records[0]["trust_region/delta_mean"] == pytest.approx(0.15, rel=1e-4)


def test_resume_gives_identical_metrics(tmp_path):
    full = run_training(resolve(overrides=tiny_overrides(tmp_path / "full", max_steps=4)), quiet=True,
                        evaluate_at_end=False)
    part_cfg = resolve(overrides=tiny_overrides(tmp_path / "part", max_steps=4))
    run_training(part_cfg, max_steps=2, quiet=True, evaluate_at_end=False)
    run_training(part_cfg, resume=True, quiet=True, evaluate_at_end=False)
    a = _deterministic(read_jsonl(full / "metrics.jsonl"))
    b = _deterministic(read_jsonl(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b


def test_metrics_are_reproducible_and_policy_moves(tmp_path):
    cfg = tiny_overrides(tmp_path / "a", max_steps=1)
    a = run_training(resolve(overrides=cfg), quiet=True, evaluate_at_end=False)
    b = run_training(resolve(overrides=tiny_overrides(tmp_path / "b", max_steps=1)), quiet=True, evaluate_at_end=False)
    assert _deterministic(read_jsonl(a / "metrics.jsonl")) == _deterministic(read_jsonl(b / "metrics.jsonl"))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(group_advantages(r, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    std = group_advantages(r, 3, std_norm=True)
    assert torch.allclose(std[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (r[:3].std() + 1e-6))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from tokentrust.trainer import NonFiniteError

    trainer = Trainer(resolve(overrides=tiny_overrides(tmp_path / "nan", optim={"max_nonfinite_steps": 3})),
                      quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer.loss_fn

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    trainer.loss_fn = poisoned
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.train_step()  # 2 epochs x 2 minibatches: the third non-finite step stops the run
    assert trainer.nonfinite_total == 3 and trainer.optimizer_steps == 0
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was applied
    trainer.close()
