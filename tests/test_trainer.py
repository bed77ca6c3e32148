"""End-to-end trainer tests on a seconds-long tiny-arith configuration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_overrides
from tokentrust.train.config import resolve
from tokentrust.train.rundir import read_jsonl
from tokentrust.train.loop import NONDETERMINISTIC_KEYS, Trainer, group_advantages, run_training

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
    from tokentrust.train.loop import NonFiniteError

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


# ------------------------------------------------------------------ issue 9 defects (regression tests)

def test_token_lookups_live_on_the_model_device(tmp_path):
    """Issue 9: `bucket_of[ids]` indexed a CPU table with GPU ids. The tables now live on the model's
    device. No CUDA here: the 'meta' device stands in for it (a CPU table indexed by meta ids gives a
    CPU tensor of garbage rather than an error, so the device of the result is what is checked)."""
    from tokentrust.train.loop import token_tables

    trainer = Trainer(resolve(overrides=tiny_overrides(tmp_path / "run")), quiet=True)
    try:
        t = trainer.tokens
        assert {x.device for x in (t.rarity, t.bucket, t.rare, t.special)} == {trainer.device}
        edges = trainer.cfg.algo.thresholds.bucket_edges
        rows = len(t.bucket) + 7  # more model rows than tokenizer ids: padded as unseen
        meta = token_tables(trainer.table, edges, rows, "meta")
        ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
        for table in (meta.rarity, meta.bucket, meta.rare, meta.special):
            assert table.device.type == "meta" and table[ids].device.type == "meta" and len(table) == rows
        padded = token_tables(trainer.table, edges, rows, "cpu")
        assert (padded.bucket[-7:] == len(edges) + 1).all() and padded.rare[-7:].all()  # "unseen"
        assert torch.equal(padded.bucket[:len(t.bucket)], t.bucket)
    finally:
        trainer.close()


def test_kl_and_recompute_with_micro_batches(tmp_path, one_thread):
    """Issue 9: the extra forwards (KL reference, anchor=recompute) concatenated trimmed micro-batches
    of different widths and crashed whenever micro_batch_size > 0. Now they train, and the log-probs
    equal those of one whole-batch forward on every valid token."""
    from tokentrust.train.learner import logprobs_by_micro_batch
    from trainer_fixtures import synthetic_reward

    algo = {"loss": "ppo", "kl_coef": 0.05, "anchor": "recompute"}
    over = tiny_overrides(tmp_path / "run", max_steps=1, algo=algo, optim={"micro_batch_size": 1},
                          rollout={"group_size": 4, "max_new_tokens": 24})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
        try:
            data = trainer.collector.collect(0)
            lengths = data.batch.response_mask.sum(-1)
            assert len(set(lengths.tolist())) > 1, "the test needs responses of different lengths"
            by_micro = logprobs_by_micro_batch(trainer.ref_model, data.batch, 1.0, micro_batch_size=1)
            whole = logprobs_by_micro_batch(trainer.ref_model, data.batch, 1.0, micro_batch_size=0)
            mask = data.batch.response_mask.bool()
            assert by_micro.shape == whole.shape == mask.shape
            torch.testing.assert_close(by_micro[mask], whole[mask], rtol=1e-5, atol=1e-5)
            rec = trainer.train_step()
            assert math.isfinite(rec["loss/kl"]) and rec["loss/kl"] >= 0
        finally:
            trainer.close()


def test_trust_region_diagnostics_are_token_weighted_with_true_maxima(tmp_path, one_thread):
    """Issue 9: diagnostics were averaged with sequence weights, and ratio_max / abs_diff_max were
    averaged over micro-batches and optimizer steps. Reference: the same quantities computed directly
    on all valid tokens every loss call of the step saw (micro-batches x minibatches x epochs)."""
    from trainer_fixtures import synthetic_reward

    over = tiny_overrides(tmp_path / "run", max_steps=1, optim={"micro_batch_size": 1},
                          rollout={"group_size": 4, "max_new_tokens": 24})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
    calls = []
    real = trainer.loss_fn

    def recording(logp, behavior_logp, advantages, mask, **params):
        out = real(logp, behavior_logp, advantages, mask, **params)
        m = mask.bool()
        calls.append({"logp": logp.detach()[m], "mu": behavior_logp[m], "adv": advantages[:, None].expand_as(m)[m],
                      "keep": out.keep[m]})
        return out

    trainer.loss_fn = recording
    try:
        with synthetic_reward():
            rec = trainer.train_step()
    finally:
        trainer.close()
    pool = {k: torch.cat([c[k] for c in calls]) for k in calls[0]}
    assert len(calls) == 2 * 8 and len({len(c["keep"]) for c in calls}) > 1  # epochs x sequences, unequal lengths
    pi, mu = pool["logp"].double().exp(), pool["mu"].double().exp()
    ratio, diff, keep = pi / mu, (pi - mu).abs(), pool["keep"].double()
    pos, neg = pool["adv"] > 0, pool["adv"] < 0
    expected = {"kept_frac": keep.mean(), "kept_frac_pos": keep[pos].mean(), "kept_frac_neg": keep[neg].mean(),
                "masked_frac": 1 - keep.mean(), "abs_diff_mean": diff.mean(), "abs_diff_max": diff.max(),
                "ratio_mean": ratio.mean(), "ratio_max": ratio.max()}
    assert float(ratio.max()) > 1.0 + 1e-3, "the policy must move within the step for the test to bite"
    for k, v in expected.items():
        assert rec[f"trust_region/{k}"] == pytest.approx(float(v), rel=1e-5, abs=1e-7), k


def test_minibatch_split_makes_the_configured_number_of_minibatches():
    """n = 9 sequences in 4 minibatches gave 3 (chunks of ceil(9 / 4) = 3); now 4 of sizes 2-3."""
    from tokentrust.train.learner import _split

    parts = _split(list(range(9)), 4)
    assert len(parts) == 4 and sorted(len(p) for p in parts) == [2, 2, 2, 3]
    assert sum(parts, []) == list(range(9))
    assert _split(list(range(128)), 4) == [list(range(i, i + 32)) for i in range(0, 128, 32)]  # divisible: unchanged
    assert _split([0, 1], 4) == [[0], [1]]


@pytest.mark.parametrize("loss", ["ppo", "dppo-tv", "decoupled-ppo"])
def test_every_keyword_the_learner_passes_is_refused_in_algo_params(tmp_path, one_thread, loss):
    """algo.params may not set what the learner's loss call supplies: each keyword seen in a real step
    (empty algo.params) fails validation naming algo.params.<key>."""
    from tokentrust.train.config import ConfigError
    from tokentrust.losses import get_loss

    real, passed = get_loss(loss), set()

    def recording(logp, behavior_logp, advantages, mask, **params):
        passed.update(params)
        return real(logp, behavior_logp, advantages, mask, **params)

    trainer = Trainer(resolve(overrides=tiny_overrides(tmp_path / "run", max_steps=1, algo={"loss": loss})),
                      quiet=True)
    trainer.loss_fn = recording
    try:
        trainer.train_step()
    finally:
        trainer.close()
    assert {"agg", "is_cap"} <= passed and ("prox_logp" in passed) == (loss == "decoupled-ppo")
    for key in sorted(passed):
        with pytest.raises(ConfigError, match=f"^algo.params.{key} is supplied by the trainer"):
            resolve(overrides={"algo": {"loss": loss, "params": {key: 0.5}}})
