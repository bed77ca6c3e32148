"""Where the trust region binds: masked fraction and |pi - mu| per PPO epoch (by advantage sign and
frequency bucket), and the run's most-masked token ids in RUN_DIR/masked_tokens.json. Reference:
the same quantities counted directly from what every loss call of the run saw."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from tokentrust.train.config import resolve
from tokentrust.train.loop import Trainer
from trainer_fixtures import synthetic_reward


def test_per_epoch_masking_and_most_masked_tokens(tmp_path, one_thread):
    over = tiny_overrides(tmp_path / "run", max_steps=2, algo={"loss": "dppo-tv", "delta": 0.002},
                          rollout={"group_size": 4}, optim={"lr": 3e-3, "ppo_epochs": 3, "minibatches": 2},
                          log={"checkpoint_every": 0})
    with synthetic_reward():
        trainer = Trainer(resolve(overrides=over), quiet=True)
    calls = []
    real = trainer.loss_fn

    def recording(logp, behavior_logp, advantages, mask, **params):
        out = real(logp, behavior_logp, advantages, mask, **params)
        m = mask.bool()
        calls.append({"pi": logp.detach().double().exp()[m], "mu": behavior_logp.double().exp()[m],
                      "adv": advantages[:, None].expand_as(m)[m], "masked": ~out.keep[m], "ids": None})
        return out

    trainer.loss_fn = recording
    ids_of_call = []
    real_add = trainer.learner.masked_tokens.add
    trainer.learner.masked_tokens.add = lambda ids, keep, mask: (ids_of_call.append(ids[mask.bool()]),
                                                                  real_add(ids, keep, mask))
    try:
        with synthetic_reward():
            records = trainer.train(2)
        buckets = trainer.tokens.bucket
        tokenizer = trainer.tokenizer
    finally:
        trainer.close()
    for c, ids in zip(calls, ids_of_call):
        c["ids"] = ids
    per_step = 3 * 2  # epochs x minibatches (one micro-batch each)
    assert len(calls) == 2 * per_step
    masked_any = False
    for s, rec in enumerate(records):
        for e in range(3):
            part = calls[s * per_step + 2 * e: s * per_step + 2 * e + 2]
            pool = {k: torch.cat([c[k] for c in part]) for k in part[0]}
            masked, diff, adv = pool["masked"].double(), (pool["pi"] - pool["mu"]).abs(), pool["adv"]
            b = buckets[pool["ids"]]
            pre = f"trust_region/epoch_{e}"
            assert rec[f"{pre}/masked_frac"] == pytest.approx(float(masked.mean()), abs=1e-12)
            assert rec[f"{pre}/abs_diff_mean"] == pytest.approx(float(diff.mean()), rel=1e-6)
            for sign, sel in (("/pos", adv > 0), ("/neg", adv < 0)):
                assert rec[f"{pre}/masked_frac{sign}"] == pytest.approx(float(masked[sel].mean()), abs=1e-12)
                assert rec[f"{pre}/abs_diff_mean{sign}"] == pytest.approx(float(diff[sel].mean()), rel=1e-6)
            for i in torch.unique(b).tolist():
                assert rec[f"{pre}/masked_frac/bucket_{i}"] == pytest.approx(float(masked[b == i].mean()), abs=1e-12)
            masked_any |= bool(masked.any())
        # the ratio pi / mu per bucket and sign, pooled over the step's updates (numpy's percentile)
        step = {k: torch.cat([c[k] for c in calls[s * per_step:(s + 1) * per_step]]) for k in calls[0]}
        ratio, adv, b = (step["pi"] / step["mu"]).numpy(), step["adv"].numpy(), buckets[step["ids"]].numpy()
        for sign, sel in (("pos", adv > 0), ("neg", adv < 0)):
            for i in range(int(buckets.max()) + 1):
                r = ratio[sel & (b == i)]
                got_mean, got_p99 = (rec[f"mechanism/ratio_{k}/{sign}/bucket_{i}"] for k in ("mean", "p99"))
                if r.size == 0:
                    assert math.isnan(got_mean) and math.isnan(got_p99)
                else:
                    assert got_mean == pytest.approx(float(r.mean()), rel=1e-9)
                    assert got_p99 == pytest.approx(float(np.percentile(r, 99)), rel=1e-9)
    assert masked_any, "delta must be small enough for the region to bind"
    # the run's most-masked tokens
    counts = Counter(i for c in calls for i in c["ids"][c["masked"]].tolist())
    seen = Counter(i for c in calls for i in c["ids"].tolist())
    top = json.loads((tmp_path / "run" / "masked_tokens.json").read_text())
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert [(t["id"], t["masked"]) for t in top["top"]] == want
    assert all(t["seen"] == seen[t["id"]] and t["text"] == tokenizer.decode([t["id"]]) for t in top["top"])
    assert top["masked_total"] == sum(counts.values()) and top["step"] == 2


def test_bucket_delta_is_logged_only_for_losses_with_a_threshold():
    """Regression: ppo / pg-is (no delta) logged a mean threshold of 0 per bucket."""
    from tokentrust.train.diagnostics import BucketStats

    buckets = torch.tensor([0, 1, 2])
    ids = torch.tensor([[0, 1, 2, 2]])
    keep = torch.tensor([[True, False, True, True]])
    mask = torch.tensor([[True, True, True, False]])
    adv = torch.ones(1, 4)
    without = BucketStats(3, torch.device("cpu"))
    without.add(buckets[ids], keep, mask, adv, None)
    m = without.metrics()
    assert not any(k.startswith("trust_region/delta_mean") for k in m)
    assert m["trust_region/kept_frac/bucket_1"] == 0.0 and m["trust_region/kept_frac/bucket_2"] == 1.0
    with_delta = BucketStats(3, torch.device("cpu"))
    with_delta.add(buckets[ids], keep, mask, adv, torch.tensor([[0.1, 0.2, 0.4, 9.0]]))
    m = with_delta.metrics()
    assert [m[f"trust_region/delta_mean/bucket_{i}"] for i in range(3)] == pytest.approx([0.1, 0.2, 0.4])
