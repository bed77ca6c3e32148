"""The off-policy control ("pg-is") and AReaL's decoupled PPO, against independent references.

Expected values come from per-token Python loops over floats, hand-computed cases, or autograd
through a directly written objective; never from the library's tensor code.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_losses import AGGS, F64, aggregate_ref, capped, close, grad_of, grad_ref, lists, normalisers, random_batch
from tokentrust.study.compare import run_configs
from tokentrust.study.methods import METHODS
from tokentrust.train.config import loss_params, resolve
from tokentrust.losses import NEEDS_PROX_LOGP, get_loss, needs_prox_logp


def prox_between(seed: int, logp, blogp, spread: float = 0.5):
    """A third policy pi_prox: log mu plus a random shift (behaviour weights in ~[0.6, 1.65])."""
    g = torch.Generator().manual_seed(seed)
    return blogp + (torch.rand(blogp.shape, generator=g, dtype=F64) * 2 - 1) * spread


def decoupled_ref(pi, prox, mu, a, m, eps_low, eps_high, cap=None, behave_cap=None, mode="mask"):
    """Per token: (keep, objective, gradient weight) of decoupled PPO, from the formula in floats."""
    keep, obj, grad_w = [], [], []
    for b in range(len(m)):
        krow, orow, grow = [], [], []
        for t in range(len(m[b])):
            r = pi[b][t] / prox[b][t]
            w = prox[b][t] / mu[b][t]
            rejected = behave_cap is not None and w > behave_cap and mode == "mask"
            if behave_cap is not None and w > behave_cap:
                w = 0.0 if mode == "mask" else behave_cap
            unclipped = capped(r, cap) * a[b][t]
            clip_term = min(max(r, 1 - eps_low), 1 + eps_high) * a[b][t]
            clipped = clip_term < r * a[b][t]  # the clip term is the strict min: no gradient
            k = bool(m[b][t]) and not clipped and not rejected
            krow.append(k)
            orow.append(w * (clip_term if clipped else unclipped))
            grow.append(w * unclipped if k else 0.0)
        keep.append(krow)
        obj.append(orow)
        grad_w.append(grow)
    return keep, obj, grad_w


# --------------------------------------------------------------------------- registry / wiring


def test_new_losses_registered_and_prox_marker():
    assert NEEDS_PROX_LOGP == {"decoupled-ppo"}
    assert needs_prox_logp("decoupled-ppo") and not needs_prox_logp("pg-is") and not needs_prox_logp("ppo")


def test_config_accepts_new_losses_and_passes_their_keywords():
    cfg = resolve(overrides={"algo": {"loss": "decoupled-ppo", "eps_high": 0.28, "is_cap": 3.0,
                                      "params": {"behave_cap": 5.0}}})
    params = loss_params(cfg)
    assert params["eps_low"] == 0.2 and params["eps_high"] == 0.28 and params["behave_cap"] == 5.0
    assert "delta" not in params and "prox_logp" not in params  # prox_logp comes from the trainer
    cfg = resolve(overrides={"algo": {"loss": "pg-is", "is_cap": 5.0}})
    assert loss_params(cfg) == {"agg": "token-mean", "is_cap": 5.0}
    with pytest.raises(ValueError, match="algo.params.eps_low"):
        resolve(overrides={"algo": {"loss": "pg-is", "params": {"eps_low": 0.1}}})


def test_methods_entries_resolve(tmp_path):
    spec = {"preset": "tiny-arith", "methods": ["pg-is", "pg-is-capped", "decoupled-ppo"], "seeds": [0]}
    runs = {name: cfg for name, _, cfg in run_configs(spec, tmp_path)}
    assert runs["pg-is"].algo.loss == "pg-is" and runs["pg-is"].algo.is_cap is None
    assert runs["pg-is-capped"].algo.is_cap == 5.0
    assert runs["decoupled-ppo"].algo.loss == "decoupled-ppo" and runs["decoupled-ppo"].algo.eps_low == 0.2
    assert METHODS["pg-is"]["family"] == "control" and METHODS["decoupled-ppo"]["family"] == "baseline"


# --------------------------------------------------------------------------- pg-is (the control)


@pytest.mark.parametrize("cap", [None, 1.3])
@pytest.mark.parametrize("agg", AGGS)
def test_control_gradient_is_capped_ratio_advantage_over_normaliser(agg, cap):
    """d loss / d logp_t = -min(r_t, C) A_t / normaliser_t on every valid token; nothing masked."""
    logp, blogp, adv, mask = random_batch(40)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    out = get_loss("pg-is")(logp, blogp, adv, mask, agg=agg, is_cap=cap)
    assert torch.equal(out.keep, mask)
    norm = normalisers(m, agg)
    expected = torch.tensor([[-capped(r[b][t], cap) * a[b][t] / norm[b][t] if m[b][t] else 0.0
                              for t in range(len(m[b]))] for b in range(len(m))], dtype=F64)
    close(grad_of(out, logp), expected)
    obj = [[capped(r[b][t], cap) * a[b][t] for t in range(len(m[b]))] for b in range(len(m))]
    assert out.loss.item() == pytest.approx(-aggregate_ref(obj, m, agg), rel=1e-12, abs=1e-14)
    if cap is not None:  # the cap bit on some valid token with A != 0
        assert any(m[b][t] and r[b][t] > cap and a[b][t] != 0 for b in range(len(m)) for t in range(len(m[b])))
    assert out.metrics["kept_frac"] == 1.0 and out.metrics["masked_frac"] == 0.0


def test_control_hand_case():
    """mu = .4, r = [2, .5, 1, 3] (last token padding), A = [1, -1, 2, -.5], token-mean over 3 tokens.

    Uncapped: rA = [2, -.5, 2] -> loss -3.5/3, grad -[2, -.5, 2, 0]/3.
    C = 1.5: min(r, C) A = [1.5, -.5, 2] -> loss -1, grad -[1.5, -.5, 2, 0]/3; over-cap share 1/3.
    """
    mu = torch.full((1, 4), 0.4, dtype=F64)
    logp = (mu * torch.tensor([[2.0, 0.5, 1.0, 3.0]], dtype=F64)).log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, -0.5]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    out = get_loss("pg-is")(logp, mu.log(), adv, mask)
    assert out.loss.item() == pytest.approx(-3.5 / 3, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[-2.0, 0.5, -2.0, 0.0]], dtype=F64) / 3)
    out = get_loss("pg-is")(logp, mu.log(), adv, mask, is_cap=1.5)
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[-1.5, 0.5, -2.0, 0.0]], dtype=F64) / 3)
    assert out.metrics["over_cap_frac"] == pytest.approx(1 / 3)


def test_control_uncapped_equals_autograd_of_ratio_times_advantage():
    """Autograd through -sum(exp(logp - log mu) A)/n: value and gradient (r A has grad r A dlogp)."""
    logp, blogp, adv, mask = random_batch(41)
    leaf = logp.detach().clone().requires_grad_(True)
    ref = -((leaf - blogp).exp() * adv * mask).sum() / mask.sum()
    ref.backward()
    out = get_loss("pg-is")(logp, blogp, adv, mask)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    close(grad_of(out, logp), leaf.grad)


# --------------------------------------------------------------------------- decoupled PPO


@pytest.mark.parametrize("cap", [None, 1.3])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_decoupled_with_prox_equal_behaviour_is_ppo_exactly(eps_low, eps_high, agg, cap):
    logp, blogp, adv, mask = random_batch(42)
    kw = dict(eps_low=eps_low, eps_high=eps_high, agg=agg, is_cap=cap)
    dec = get_loss("decoupled-ppo")(logp, blogp, adv, mask, prox_logp=blogp.clone(), **kw)
    g_dec = grad_of(dec, logp)
    ppo = get_loss("ppo")(logp, blogp, adv, mask, **kw)
    assert torch.equal(dec.loss.detach(), ppo.loss.detach())
    assert torch.equal(g_dec, grad_of(ppo, logp))
    assert torch.equal(dec.keep, ppo.keep) and (~ppo.keep & mask).any()
    assert dec.metrics["behave_imp_weight_mean"] == 1.0 and dec.metrics["behave_imp_weight_max"] == 1.0


@pytest.mark.parametrize("agg", AGGS)
def test_decoupled_matches_autograd_of_direct_objective(agg):
    """Autograd through sum_t -(pi_prox/mu) min(r A, clamp(r) A) / normaliser_t, r = exp(logp - log pi_prox)."""
    logp, blogp, adv, mask = random_batch(43)
    prox = prox_between(0, logp, blogp)
    leaf = logp.detach().clone().requires_grad_(True)
    ratio = torch.exp(leaf - prox)
    behave = torch.exp(prox - blogp)
    obj = behave * torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    norm = torch.tensor(normalisers(mask.tolist(), agg), dtype=F64).clamp(min=1.0)  # 0 only on empty rows
    ref = -(torch.where(mask, obj / norm, torch.zeros_like(obj))).sum()
    ref.backward()
    out = get_loss("decoupled-ppo")(logp, blogp, adv, mask, prox_logp=prox, eps_low=0.2, eps_high=0.28, agg=agg)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    close(grad_of(out, logp), leaf.grad)
    # the three policies differ: the result is neither PPO against mu nor PPO against pi_prox
    ppo_mu = get_loss("ppo")(logp, blogp, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg)
    ppo_prox = get_loss("ppo")(logp, prox, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg)
    assert not torch.equal(out.keep, ppo_mu.keep)
    assert out.loss.item() != pytest.approx(ppo_prox.loss.item(), rel=1e-6)


@pytest.mark.parametrize("behave_cap, mode", [(None, "mask"), (1.3, "mask"), (1.3, "clamp")])
@pytest.mark.parametrize("cap", [None, 1.1])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_decoupled_matches_per_token_loop(agg, cap, behave_cap, mode):
    logp, blogp, adv, mask = random_batch(44)
    prox = prox_between(1, logp, blogp)
    pi, mu, _, a, m = lists(logp, blogp, adv, mask)
    px = [[math.exp(v) for v in row] for row in prox.tolist()]
    keep, obj, gw = decoupled_ref(pi, px, mu, a, m, 0.2, 0.2, cap, behave_cap, mode)
    out = get_loss("decoupled-ppo")(logp, blogp, adv, mask, prox_logp=prox, agg=agg, is_cap=cap,
                                    behave_cap=behave_cap, behave_cap_mode=mode)
    assert out.keep.tolist() == keep
    assert out.loss.item() == pytest.approx(-aggregate_ref(obj, m, agg), rel=1e-12, abs=1e-14)
    close(grad_of(out, logp), grad_ref(gw, m, agg))
    if behave_cap is not None:  # the behaviour cap acted on some valid token
        assert out.metrics["behave_over_cap_frac"] > 0


def test_decoupled_hand_case_and_metrics():
    """Three tokens, eps 0.2, token-mean.

    (mu, prox, pi, A): (.2, .4, .6, +1): w 2, r 1.5 -> clipped, objective 2 * 1.2 = 2.4, no gradient;
    (.5, .25, .275, +1): w .5, r 1.1 -> kept, .55; (.1, .6, .3, +1): w 6, r .5 -> kept, 3.
    loss -(2.4 + .55 + 3)/3, grad -[0, .55, 3]/3. behave_cap 5, mask: token 3 dropped -> -(2.95)/3;
    clamp: w 5 -> objective 2.5, grad -[0, .55, 2.5]/3.
    """
    mu = torch.tensor([[0.2, 0.5, 0.1]], dtype=F64)
    prox = torch.tensor([[0.4, 0.25, 0.6]], dtype=F64).log()
    logp = torch.tensor([[0.6, 0.275, 0.3]], dtype=F64).log().requires_grad_(True)
    adv = torch.ones(1, 3, dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = get_loss("decoupled-ppo")
    out = loss(logp, mu.log(), adv, mask, prox_logp=prox)
    assert out.keep.tolist() == [[False, True, True]]
    assert out.loss.item() == pytest.approx(-5.95 / 3, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[0.0, -0.55, -3.0]], dtype=F64) / 3)
    expected = {"importance_weight_mean": 3.1 / 3, "importance_weight_max": 1.5, "behave_imp_weight_mean": 8.5 / 3,
                "behave_imp_weight_max": 6.0, "clip_frac": 1 / 3, "kept_frac": 2 / 3, "behave_over_cap_frac": 0.0,
                "ratio_max": 3.0}  # ratio_* are pi/mu, as for every loss
    for key, val in expected.items():
        assert out.metrics[key] == pytest.approx(val, abs=1e-12), key
    out = loss(logp, mu.log(), adv, mask, prox_logp=prox, behave_cap=5.0)
    assert out.keep.tolist() == [[False, True, False]]
    assert out.loss.item() == pytest.approx(-2.95 / 3, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[0.0, -0.55, 0.0]], dtype=F64) / 3)
    assert out.metrics["behave_over_cap_frac"] == pytest.approx(1 / 3)
    assert out.metrics["behave_imp_weight_max"] == pytest.approx(6.0)  # logged before the cap
    out = loss(logp, mu.log(), adv, mask, prox_logp=prox, behave_cap=5.0, behave_cap_mode="clamp")
    assert out.keep.tolist() == [[False, True, True]]
    assert out.loss.item() == pytest.approx(-5.45 / 3, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[0.0, -0.55, -2.5]], dtype=F64) / 3)


@pytest.mark.parametrize("params, field", [
    ({}, "prox_logp"),
    ({"prox_logp": torch.zeros(2, 2, dtype=F64)}, "prox_logp"),
    ({"behave_cap": 0.9}, "behave_cap"),
    ({"behave_cap_mode": "drop"}, "behave_cap_mode"),
    ({"eps_low": -0.1}, "eps"),
    ({"agg": "mean"}, "agg"),
])
def test_decoupled_bad_params_raise_naming_field(params, field):
    logp, blogp, adv, mask = random_batch(0)
    params = {"prox_logp": blogp, **params} if field != "prox_logp" else params
    with pytest.raises(ValueError, match=field):
        get_loss("decoupled-ppo")(logp, blogp, adv, mask, **params)


@pytest.mark.parametrize("name", ["pg-is", "decoupled-ppo"])
@pytest.mark.parametrize("agg", AGGS)
def test_global_counts_make_micro_batches_sum_to_full_batch(name, agg):
    logp, blogp, adv, mask = random_batch(45)
    prox = prox_between(2, logp, blogp)
    extra = (lambda rows: {"prox_logp": prox[rows]}) if needs_prox_logp(name) else (lambda rows: {})
    full = get_loss(name)(logp, blogp, adv, mask, agg=agg, is_cap=1.5, **extra(slice(None)))
    g_full = grad_of(full, logp)
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    leaf = logp.detach().clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        out = get_loss(name)(leaf[rows], blogp[rows], adv[rows], mask[rows], agg=agg, is_cap=1.5,
                             global_tokens=n_tok, global_seqs=n_seq, **extra(rows))
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-12, abs=1e-14)
    close(leaf.grad, g_full)
