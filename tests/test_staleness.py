"""Bounded staleness (rollout.staleness = k): the batch updated at step t was sampled by the policy
weights of step t - k, overlap does not change the result, and a resume with batches in flight
equals an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from tokentrust.train.config import ConfigError, resolve
from tokentrust.train.learner import logprobs_by_micro_batch
from tokentrust.train.rollout.weights import weight_fingerprint
from tokentrust.train.rundir import read_jsonl
from tokentrust.train.loop import NONDETERMINISTIC_KEYS, Trainer, run_training
from trainer_fixtures import synthetic_reward


def _over(path, k, **extra):
    return tiny_overrides(path, rollout={"group_size": 4, "staleness": k, **extra.pop("rollout", {})}, **extra)


def _deterministic(records):
    return [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC_KEYS)} for r in records]


@pytest.mark.parametrize("k", [1, 2])
def test_batch_at_step_t_was_sampled_by_the_weights_of_step_t_minus_k(tmp_path, one_thread, k):
    """Fingerprints of the learner's weights after each update identify the sampler, and the recorded
    mu equals the log-probs of the batch recomputed with a copy of exactly those weights."""
    steps = k + 3
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=_over(tmp_path / "run", k, max_steps=steps)), quiet=True)
        versions = {0: ({n: v.clone() for n, v in trainer.model.state_dict().items()},
                        weight_fingerprint(trainer.model))}
        updated_on = []
        real_update = trainer.learner.update

        def recording(data, step, timings):
            updated_on.append((data.batch.select(range(len(data.batch))), data.policy_version, data.fingerprint))
            return real_update(data, step, timings)

        trainer.learner.update = recording
        records = []
        try:
            for t in range(1, steps + 1):
                records.append(trainer.train_step())
                versions[t] = ({n: v.clone() for n, v in trainer.model.state_dict().items()},
                               weight_fingerprint(trainer.model))
            scratch = Trainer(resolve(overrides=_over(tmp_path / "scratch", 0)), quiet=True)
        finally:
            trainer.close()
    try:
        assert len({fp for _, fp in versions.values()}) == steps + 1, "every update must change the weights"
        for t, (rec, (batch, version, fp)) in enumerate(zip(records, updated_on), start=1):
            expected = max(t - 1 - k, 0)
            assert version == rec["rollout/policy_version"] == expected
            assert rec["rollout/staleness"] == t - 1 - expected
            assert fp == rec["rollout/weights_fingerprint"] == versions[expected][1]
            scratch.model.load_state_dict(versions[expected][0])
            mu = logprobs_by_micro_batch(scratch.model.eval(), batch, 1.0, 0)
            mask = batch.response_mask.bool()
            torch.testing.assert_close(batch.behavior_logp[mask], mu[mask], rtol=1e-4, atol=1e-4)
            if expected != t - 1:  # and it is not what the current weights would give
                scratch.model.load_state_dict(versions[t - 1][0])
                now = logprobs_by_micro_batch(scratch.model.eval(), batch, 1.0, 0)
                assert (now[mask] - batch.behavior_logp[mask]).abs().max() > 1e-3
        assert [r["rollout/staleness"] for r in records][-1] == k
    finally:
        scratch.close()


def test_overlap_does_not_change_the_run(tmp_path, one_thread):
    with synthetic_reward():
        a = run_training(resolve(overrides=_over(tmp_path / "a", 1, max_steps=3)), quiet=True, evaluate_at_end=False)
        b = run_training(resolve(overrides=_over(tmp_path / "b", 1, max_steps=3, rollout={"overlap": True})),
                         quiet=True, evaluate_at_end=False)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert _deterministic(ra) == _deterministic(rb)
    assert all("timing/wait_rollout_s" in r for r in rb) and not any("timing/wait_rollout_s" in r for r in ra)


def test_resume_with_batches_in_flight_equals_an_uninterrupted_run(tmp_path, one_thread):
    """k = 2: a checkpoint after step 2 holds batches 2 and 3 (sampled by versions 0 and 1). The resumed
    run trains on them and continues; it samples with overlap, the uninterrupted run without."""
    from tokentrust.train.checkpoint import latest_checkpoint, load_checkpoint

    with synthetic_reward():
        full = run_training(resolve(overrides=_over(tmp_path / "full", 2, max_steps=5)), quiet=True,
                            evaluate_at_end=False)
        part = resolve(overrides=_over(tmp_path / "part", 2, max_steps=5, rollout={"overlap": True}))
        run_training(part, max_steps=2, quiet=True, evaluate_at_end=False)
        probe = Trainer(resolve(overrides=_over(tmp_path / "probe", 2)), quiet=True)
        _, extra = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"), probe.model, restore_rng=False)
        probe.close()
        assert [(b["index"], b["policy_version"]) for b in extra["in_flight"]] == [(2, 0), (3, 1)]
        run_training(part, resume=True, quiet=True, evaluate_at_end=False)
    a = _deterministic(read_jsonl(full / "metrics.jsonl"))
    b = _deterministic(read_jsonl(tmp_path / "part" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert a == b
    # the run's masked-token counts survive the resume too
    assert (full / "masked_tokens.json").read_text() == (tmp_path / "part" / "masked_tokens.json").read_text()


def test_resume_refuses_a_different_staleness(tmp_path):
    run_training(resolve(overrides=_over(tmp_path / "run", 1, max_steps=1)), quiet=True, evaluate_at_end=False)
    with pytest.raises(ValueError, match="rollout.staleness is 2 but checkpoint step_000001 was written with staleness 1"):
        Trainer(resolve(overrides=_over(tmp_path / "run", 2, max_steps=2)), resume=True, quiet=True)


@pytest.mark.parametrize("rollout, message", [
    ({"staleness": -1}, "rollout.staleness must be >= 0"),
    ({"overlap": True}, "rollout.overlap needs rollout.staleness >= 1"),
    ({"dtype": "int8"}, "rollout.dtype must be"),
    ({"dtype": "bfloat16", "backend": "vllm"}, "needs rollout.backend='hf'"),
])
def test_bad_rollout_settings_name_the_field(tmp_path, rollout, message):
    with pytest.raises(ConfigError, match=message):
        resolve(overrides=tiny_overrides(tmp_path, rollout=rollout))


def test_async_preset_differs_from_tiny_arith_only_in_the_off_policy_settings():
    base, stale = resolve(preset="tiny-arith").to_dict(), resolve(preset="tiny-arith-async").to_dict()
    assert stale["model"] == base["model"] and stale["task"] == base["task"]
    assert (stale["rollout"]["staleness"], stale["rollout"]["overlap"], stale["log"]["mismatch"]) == (4, True, True)
    assert {k for k in stale["rollout"] if stale["rollout"][k] != base["rollout"][k]} == {"staleness", "overlap"}
