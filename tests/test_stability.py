"""Stability metrics that must rank a collapsing run as less stable, and the seen/unseen split of
the rare-token share; against hand computations, scipy's beta-binomial and the design-effect formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tokentrust.study import metrics as M

P, G = 16, 8  # prompts x samples per step


def _grpo_run(rng, ps, rho=0.3):
    """Step records of binary rewards: per step P prompts whose success rates are Beta with mean p
    and intra-class correlation rho, G samples each (how GRPO batches are correlated)."""
    recs = []
    for t, p in enumerate(ps):
        q = np.full(P, p) if p in (0.0, 1.0) else rng.beta(p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho, P)
        x = rng.random((P, G)) < q[:, None]
        recs.append({"step": t + 1, "reward/mean": float(x.mean()),
                     "reward/zero_std_groups": float((x.std(1) == 0).mean())})
    return recs


def test_drawdown_smoothed_hand_case():
    # 3-step trailing means of [0, 3, 3, 0, 0, 0, 3]: 2, 2, 1, 0, 1 -> worst fall 2 - 0 = 2
    assert M.drawdown_smoothed([0, 3, 3, 0, 0, 0, 3], window=3) == pytest.approx(2.0)
    assert M.drawdown_smoothed(np.arange(10.0)) == 0.0  # steady learning never falls
    assert math.isnan(M.drawdown_smoothed([1.0, float("nan"), 2.0]))  # fewer than 5 finite points


def test_uniform_group_probability_matches_scipy_betabinom():
    for p, rho in ((0.3, 0.2), (0.5, 0.6), (0.05, 0.1)):
        a, b = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
        ref = stats.betabinom.pmf(0, G, a, b) + stats.betabinom.pmf(G, G, a, b)
        assert M.uniform_group_probability(p, rho, G) == pytest.approx(ref, rel=1e-10)
    assert M.uniform_group_probability(0.3, 0.0, G) == pytest.approx(0.3**8 + 0.7**8)
    assert M.uniform_group_probability(0.3, 1.0, G) == 1.0


def test_design_effect_noise_is_one_for_correlated_sampling_noise():
    """A level run (p = 0.4, rho = 0.3): sampling noise alone. Its z-scores under independent draws
    have std sqrt(1 + (G - 1) rho) = 1.76; corrected for the design effect about 1."""
    recs = _grpo_run(np.random.default_rng(0), [0.4] * 400)
    assert M.reward_noise_normalized(recs, P * G) == pytest.approx(math.sqrt(1 + 7 * 0.3), rel=0.1)
    assert M.reward_noise_design_effect(recs, P, G) == pytest.approx(1.0, abs=0.15)
    assert math.isnan(M.reward_noise_design_effect(recs, None, G))
    assert math.isnan(M.reward_noise_design_effect([{"reward/mean": 0.5}] * 5, P, G))  # no uniform share


def test_a_collapsing_run_is_less_stable():
    """The defect of H1's old primary: a run that collapses to ~0 after 12 steps sits where its
    Bernoulli noise is tiny, so `reward_noise_norm` rates it at least as stable as a healthy level
    run. The smoothed drawdown (H1's primary now) and the collapse count rate it less stable."""
    rng = np.random.default_rng(1)
    old_gap = []
    for _ in range(10):
        healthy = _grpo_run(rng, [0.5] * 40)
        collapse = _grpo_run(rng, [0.5] * 12 + [0.3, 0.1] + [0.02] * 26)
        old_gap.append(M.reward_noise_normalized(collapse, P * G) - M.reward_noise_normalized(healthy, P * G))
        h, c = M.summarize_records(healthy, P * G, G), M.summarize_records(collapse, P * G, G)
        assert c["stability/drawdown_smoothed"] > h["stability/drawdown_smoothed"] + 0.2
        assert c["stability/collapse_count"] > h["stability/collapse_count"]
    # the old primary cannot tell the collapse from healthy noise (its sd across runs is ~0.2)
    assert abs(np.mean(old_gap)) < 0.15


def test_rare_share_is_split_into_seen_rare_and_unseen_tokens():
    """DPPO-TV seed 2 of the stress study: rare share 0.247, of which 0.201 corpus-unseen tokens."""
    res = {"rare_share": 0.247, "bucket_shares": [0.6, 0.1, 0.03, 0.016, 0.201, 0.0]}
    out = M.summarize_eval(res)
    assert out["coherence/unseen_token_share"] == 0.201
    assert out["rare/share_rare_seen"] == pytest.approx(0.046)
    assert out["rare/share_rare"] == 0.247  # kept, for continuity
    assert "rare/share_rare_seen" not in M.summarize_eval({"rare_share": 0.1})  # no bucket shares


def test_icc_is_recovered_from_the_uniform_group_share():
    from tokentrust.study.metrics.stability import _icc_from_uniform_share

    for p, rho in ((0.3, 0.2), (0.5, 0.6), (0.1, 0.05)):
        assert _icc_from_uniform_share(p, M.uniform_group_probability(p, rho, G), G) == pytest.approx(rho, abs=1e-6)
    assert _icc_from_uniform_share(0.5, 0.0, G) == 0.0  # fewer uniform groups than independence gives
    assert _icc_from_uniform_share(0.5, 1.0, G) == 1.0
