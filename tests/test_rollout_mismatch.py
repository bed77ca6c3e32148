"""Training-inference mismatch on purpose (rollout.dtype) and its measurement (log.mismatch), and the
pre-update forward that gives decoupled PPO its proximal log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_overrides
from tokentrust.train.config import resolve
from tokentrust.train.diagnostics import mismatch_metrics
from tokentrust.train.learner import logprobs_by_micro_batch, step_generator, takes_prox_logp, trim
from tokentrust.losses import get_loss
from tokentrust.train.loop import Trainer
from trainer_fixtures import synthetic_reward


def test_mismatch_metrics_by_hand():
    mu = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    old = torch.tensor([[-1.2, -2.0, -0.4], [-0.1, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    buckets = torch.tensor([[0, 1, 0], [2, 2, 1]])
    out = mismatch_metrics(mu, old, mask, buckets, num_buckets=4)
    d = [0.2, 0.0, -0.1, 0.0, -1.0]  # log mu - log pi_old on the five valid tokens
    k3 = [math.exp(-x) - 1 + x for x in d]
    assert out["mismatch/logp_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in d) / 5)
    assert out["mismatch/logp_abs_diff_max"] == pytest.approx(1.0)
    assert out["mismatch/kl_k1"] == pytest.approx(sum(d) / 5)
    assert out["mismatch/kl_k3"] == pytest.approx(sum(k3) / 5)
    assert out["mismatch/ratio_outside_10pct"] == pytest.approx(3 / 5)  # ratios e^-0.2=0.82, e^0.1=1.105, e^1
    assert out["mismatch/logp_abs_diff_mean/bucket_0"] == pytest.approx((0.2 + 0.1) / 2)
    assert out["mismatch/kl_k3/bucket_2"] == pytest.approx((k3[3] + k3[4]) / 2)
    assert out["mismatch/logp_abs_diff_mean/bucket_1"] == pytest.approx(0.0)  # the masked token is left out
    assert math.isnan(out["mismatch/kl_k3/bucket_3"])


def _first_record(tmp_path, one_thread, **rollout):
    over = tiny_overrides(tmp_path, max_steps=1, rollout={"group_size": 4, **rollout}, log={"mismatch": True})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
        try:
            return trainer.train_step()
        finally:
            trainer.close()


def test_bf16_rollout_gives_a_measured_mismatch_fp32_none(tmp_path, one_thread):
    same = _first_record(tmp_path / "same", one_thread)
    fp32_copy = _first_record(tmp_path / "fp32", one_thread, dtype="float32")
    bf16 = _first_record(tmp_path / "bf16", one_thread, dtype="bfloat16")
    for rec in (same, fp32_copy):
        assert rec["mismatch/logp_abs_diff_max"] < 1e-4 and abs(rec["mismatch/kl_k3"]) < 1e-8
    assert bf16["mismatch/logp_abs_diff_mean"] > 1e-3 and bf16["mismatch/kl_k3"] > 1e-6
    assert bf16["mismatch/logp_abs_diff_max"] > 100 * same["mismatch/logp_abs_diff_max"]
    assert any(math.isfinite(v) and v > 0 for k, v in bf16.items() if k.startswith("mismatch/kl_k3/bucket_"))


def test_a_loss_taking_prox_logp_gets_pi_old_and_mu(tmp_path, one_thread):
    """Decoupled PPO's hook: prox_logp = log-probs under the weights before the update, recomputed by the
    learner; behavior_logp stays mu (the rollout's). Checked at step 2 of a staleness-1 run, where the
    two differ: mu comes from the initial weights, pi_old from the weights after step 1."""
    ppo = get_loss("ppo")
    seen = []

    def prox_loss(logp, behavior_logp, advantages, mask, *, prox_logp=None, **params):
        seen.append((behavior_logp.clone(), prox_logp.clone(), mask.clone()))
        return ppo(logp, behavior_logp, advantages, mask, **params)

    assert takes_prox_logp(prox_loss) and not takes_prox_logp(ppo)
    over = tiny_overrides(tmp_path / "run", max_steps=2, rollout={"group_size": 4, "staleness": 1},
                          optim={"minibatches": 1, "ppo_epochs": 1}, algo={"loss": "ppo"})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
        trainer.loss_fn = prox_loss
        trainer.learner.needs_prox = takes_prox_logp(prox_loss)
        try:
            trainer.train_step()
            after_step_1 = {n: v.clone() for n, v in trainer.model.state_dict().items()}
            batch = trainer.pipeline.queue[0].batch.select(range(len(trainer.pipeline.queue[0].batch)))
            seen.clear()
            trainer.train_step()
            check = Trainer(resolve(overrides=tiny_overrides(tmp_path / "check")), quiet=True)
        finally:
            trainer.close()
    check.model.load_state_dict(after_step_1)
    # the one minibatch of step 2 holds the rows in the learner's permutation order
    batch = trim(batch.select(torch.randperm(len(batch), generator=step_generator(0, 2, salt=29))))
    pi_old = logprobs_by_micro_batch(check.model.eval(), batch, 1.0, 0)
    check.close()
    (mu, prox, mask), = seen
    m = batch.response_mask.bool()
    assert torch.equal(mask, m)
    torch.testing.assert_close(mu[m], batch.behavior_logp[m])  # mu untouched
    torch.testing.assert_close(prox[m], pi_old[m], rtol=1e-5, atol=1e-5)
    assert (prox[m] - mu[m]).abs().max() > 1e-3  # stale: pi_old is not mu


def test_prox_hook_agrees_with_the_losses_marker():
    from tokentrust.losses import available_losses, needs_prox_logp

    assert any(needs_prox_logp(n) for n in available_losses())
    for name in available_losses():
        assert takes_prox_logp(get_loss(name)) == needs_prox_logp(name), name


def _run(path, loss, k, steps=2):
    from tokentrust.train.rundir import read_jsonl
    from tokentrust.train.loop import run_training

    over = tiny_overrides(path, max_steps=steps, algo={"loss": loss}, rollout={"group_size": 4, "staleness": k},
                          log={"checkpoint_every": 0})
    with synthetic_reward():
        return read_jsonl(run_training(resolve(overrides=over), quiet=True, evaluate_at_end=False) / "metrics.jsonl")


def test_decoupled_ppo_is_ppo_on_policy_and_reweights_stale_batches(tmp_path, one_thread):
    """At k = 0 the sampler and the learner share weights, so pi_prox = mu and decoupled PPO trains
    exactly like PPO; at k = 1 the second step's batch is stale and the behaviour weight pi_prox/mu
    departs from 1."""
    keys = ("loss/policy", "actor/grad_norm", "reward/mean", "trust_region/kept_frac")
    ppo, dec = _run(tmp_path / "ppo", "ppo", 0), _run(tmp_path / "dec", "decoupled-ppo", 0)
    for a, b in zip(ppo, dec):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k
        assert b["trust_region/behave_imp_weight_max"] == pytest.approx(1.0, abs=1e-5)
    stale = _run(tmp_path / "stale", "decoupled-ppo", 1)
    assert stale[1]["rollout/staleness"] == 1
    assert abs(stale[1]["trust_region/behave_imp_weight_mean"] - 1.0) > 1e-3


def test_anchor_recompute_anchors_the_loss_on_pi_old_and_logs_mu(tmp_path, one_thread):
    """algo.anchor=recompute: the loss's anchor is pi_old, but |pi - mu| and the mechanism metrics still
    measure mu, the rollout's log-probs. At step 2 of a staleness-1 run the two differ (mu: initial
    weights, pi_old: after step 1); with one epoch of one minibatch pi = pi_old during the update."""
    ppo = get_loss("ppo")
    anchors = []

    def recording(logp, behavior_logp, advantages, mask, **params):
        anchors.append(behavior_logp.clone())
        return ppo(logp, behavior_logp, advantages, mask, **params)

    over = tiny_overrides(tmp_path / "run", max_steps=2, rollout={"group_size": 4, "staleness": 1},
                          optim={"minibatches": 1, "ppo_epochs": 1, "lr": 1e-2},
                          algo={"loss": "ppo", "anchor": "recompute"})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
        trainer.loss_fn = recording
        try:
            trainer.train_step()
            queued = trainer.pipeline.queue[0].batch
            batch = queued.select(range(len(queued)))
            pi_old = logprobs_by_micro_batch(trainer.model.eval(), batch, 1.0, 0)
            anchors.clear()
            rec = trainer.train_step()
            tokens = trainer.tokens
        finally:
            trainer.close()
    m = batch.response_mask.bool()
    mu = batch.behavior_logp
    assert (pi_old[m] - mu[m]).abs().max() > 1e-3  # stale: the two differ
    perm = torch.randperm(len(batch), generator=step_generator(0, 2, salt=29))
    (anchor,) = anchors
    width = anchor.shape[1]
    torch.testing.assert_close(anchor[m[perm][:, :width]], pi_old[perm][:, :width][m[perm][:, :width]],
                               rtol=1e-5, atol=1e-5)  # the ratio is anchored on pi_old
    expected = (pi_old.exp() - mu.exp()).abs()[m].double().mean().item()  # |pi - mu| with pi = pi_old
    assert expected > 1e-4
    assert rec["trust_region/epoch_0/abs_diff_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    plain = m & ~tokens.special[batch.response_ids]
    buckets = tokens.bucket[batch.response_ids]
    for i in range(tokens.num_buckets):
        sel = plain & (buckets == i)
        if sel.any():
            assert rec[f"mechanism/mu_mean/bucket_{i}"] == pytest.approx(mu[sel].double().exp().mean().item(),
                                                                           rel=1e-6)
