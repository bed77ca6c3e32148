"""Per-token ratio bounds (BandPO, DCPO), the hybrid, its converse ablation and DPPO's default IS cap.

References are independent of the library's tensor code: scipy's brentq on the published KL
equation (solved for the lower bound directly, not through the mirror formula the code uses),
closed forms at p = 1/2, hand-computed cases, and per-token Python loops of the PPO objective.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq

from test_losses import AGGS, F64, aggregate_ref, close, grad_of, grad_ref, lists, random_batch
from tokentrust.losses import available_losses, get_loss
from tokentrust.losses.bandpo import bandkl_bounds, dcpo_bounds, relax_and_limit

P_GRID = [1e-6, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99]


def kl_binary(p: float, log_u: float) -> float:
    """Binary KL(p || p u) from log u: (1-p)[log(1-p) - log(1-p u)] - p log u (methods.md)."""
    return (1 - p) * (math.log1p(-p) - math.log1p(-p * math.exp(log_u))) - p * log_u


def bandkl_ref(p: float, delta: float) -> tuple[float, float]:
    """(lower, upper): the two roots of KL(p || p u) = delta, below and above u = 1, by brentq in log u."""
    f = lambda y: kl_binary(p, y) - delta  # noqa: E731
    upper = math.exp(brentq(f, 1e-300, -math.log(p) - 1e-9, xtol=1e-300, rtol=1e-14))
    lower = math.exp(brentq(f, -1e6, -1e-300, xtol=1e-300, rtol=1e-14))
    return lower, upper


def bounds_at(fn, ps, *args):
    low, high = fn(torch.tensor([math.log(p) for p in ps], dtype=F64), *args)
    return low.tolist(), high.tolist()


# --------------------------------------------------------------------------- BandPO bounds


@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_bandkl_bounds_match_brentq(delta):
    """Both bounds solve the KL equation to ~1e-12; the lower bound is checked as the root below 1
    (the code computes it by the mirror l(p) = [1 - (1-p) u(1-p)] / p)."""
    low, high = bounds_at(bandkl_bounds, P_GRID, delta)
    for p, lo, hi in zip(P_GRID, low, high):
        ref_lo, ref_hi = bandkl_ref(p, delta)
        assert hi == pytest.approx(ref_hi, rel=1e-10), p
        assert lo == pytest.approx(ref_lo, abs=1e-10), p
        assert abs(kl_binary(p, math.log(hi)) - delta) < 1e-9


@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_bandkl_closed_form_at_one_half(delta):
    """p = 1/2: KL = -log(u (2 - u)) / 2 = delta, so u = 1 +- sqrt(1 - e^(-2 delta))."""
    (lo,), (hi,) = bounds_at(bandkl_bounds, [0.5], delta)
    s = math.sqrt(1 - math.exp(-2 * delta))
    assert hi == pytest.approx(1 + s, rel=1e-12)
    assert lo == pytest.approx(1 - s, rel=1e-12)


def test_bandkl_limits_and_per_token_delta():
    """p -> 1: (e^-delta, 1); p -> 0: l -> 0 and u -> (1 - e^-delta) / p; a [B, T] delta is used per token."""
    low, high = bandkl_bounds(torch.tensor([0.0, -1e-9, math.log(1e-9)], dtype=F64), 0.05)
    assert low[:2].tolist() == pytest.approx([math.exp(-0.05)] * 2, abs=1e-6)
    assert high[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert float(low[2]) == pytest.approx(0.0, abs=1e-12)
    assert float(high[2]) == pytest.approx((1 - math.exp(-0.05)) / 1e-9, rel=1e-6)
    lp = torch.log(torch.tensor([[0.2, 0.6]], dtype=F64))
    lo_t, hi_t = bandkl_bounds(lp, torch.tensor([[0.05, 0.1]], dtype=F64))
    for j, d in enumerate((0.05, 0.1)):
        ref_lo, ref_hi = bandkl_ref([0.2, 0.6][j], d)
        assert float(hi_t[0, j]) == pytest.approx(ref_hi, rel=1e-10)
        assert float(lo_t[0, j]) == pytest.approx(ref_lo, abs=1e-10)


def test_bandkl_bounds_widen_as_p_falls():
    """The point of the method: the window u - l grows monotonically as the old probability falls."""
    ps = [0.99, 0.9, 0.5, 0.1, 0.01, 1e-3]
    low, high = bounds_at(bandkl_bounds, ps, 0.05)
    widths = [h - lo for lo, h in zip(low, high)]
    assert all(a < b for a, b in zip(widths, widths[1:]))


# --------------------------------------------------------------------------- DCPO bounds


def test_dcpo_bounds_hand_cases():
    """high = (1 + sqrt(1 + 4 e_h / p)) / 2, low = (1 + sqrt(max(1 - 4 e_l / p, 0))) / 2:
    p = .14, e_h = .28 -> (1 + 3) / 2 = 2; p = .5 -> (1 + 1.8) / 2 = 1.4;
    p = 1, e_l = .16 -> (1 + .6) / 2 = .8; p = .32, e_l = .06 -> (1 + .5) / 2 = .75; p = .5, e_l = .16 -> .5."""
    low, high = bounds_at(dcpo_bounds, [0.14, 0.5], 0.16, 0.28)
    assert high == pytest.approx([2.0, 1.4], rel=1e-12)
    assert low[1] == pytest.approx(0.5, rel=1e-12)  # 1 - 4 * .16 / .5 < 0: the max(., 0) branch
    assert bounds_at(dcpo_bounds, [1.0], 0.16, 0.28)[0] == pytest.approx([0.8], rel=1e-12)
    assert bounds_at(dcpo_bounds, [0.32], 0.06, 0.28)[0] == pytest.approx([0.75], rel=1e-12)


# --------------------------------------------------------------------------- relax and limit


def test_relax_widens_to_the_constant_clip_only_where_narrower():
    """p = .9: BandPO (delta .05) gives about [.867, 1.076], inside [.8, 1.28]: relaxed to [.8, 1.28].
    p = .01 gives [.0025, 7.81], already wider: unchanged."""
    low, high = bandkl_bounds(torch.log(torch.tensor([0.9, 0.01], dtype=F64)), 0.05)
    rl, rh = relax_and_limit(low, high, eps_low=0.2, eps_high=0.28, relax=True, upper_max=100.0)
    assert rl.tolist() == pytest.approx([0.8, float(low[1])], rel=1e-12)
    assert rh.tolist() == pytest.approx([1.28, float(high[1])], rel=1e-12)
    nl, nh = relax_and_limit(low, high, eps_low=0.2, eps_high=0.28, relax=False, upper_max=100.0)
    assert torch.equal(nl, low) and torch.equal(nh, high)


def test_upper_limit():
    """BandPO at p = 1e-3 (u = 53.5) and 1e-4 (u = 494.6): limited at 10 (recipe) or 100 (operator default)."""
    low, high = bandkl_bounds(torch.log(torch.tensor([1e-3, 1e-4], dtype=F64)), 0.05)
    assert relax_and_limit(low, high, eps_low=0.2, eps_high=0.2, relax=False, upper_max=10.0)[1].tolist() == [10.0,
                                                                                                              10.0]
    lim = relax_and_limit(low, high, eps_low=0.2, eps_high=0.2, relax=False, upper_max=100.0)[1].tolist()
    assert lim[0] == pytest.approx(53.548087, rel=1e-6) and lim[1] == 100.0
    with pytest.raises(ValueError, match="upper_max"):
        relax_and_limit(low, high, eps_low=0.2, eps_high=0.2, relax=False, upper_max=0.5)


# --------------------------------------------------------------------------- the losses


def clip_objective_ref(r, a, m, low, high, dual):
    """Per token: min(rA, clip(r, l, u) A), then max(., c A) for A < 0 (dual clip); the gradient flows
    iff the unclipped term rA is the one selected."""
    keep, obj = [], []
    for b in range(len(m)):
        krow, orow = [], []
        for t in range(len(m[b])):
            un = r[b][t] * a[b][t]
            cl = min(max(r[b][t], low[b][t]), high[b][t]) * a[b][t]
            o = min(un, cl)
            dual_bites = dual is not None and a[b][t] < 0 and dual * a[b][t] > o
            orow.append(dual * a[b][t] if dual_bites else o)
            krow.append(bool(m[b][t]) and not cl < un and not dual_bites)
        keep.append(krow)
        obj.append(orow)
    return keep, obj


def ref_bounds(name, mu, kw):
    """Bounds from the references above (brentq / closed formula), relaxed and limited in plain Python."""
    out_lo, out_hi = [], []
    for row in mu:
        lo_row, hi_row = [], []
        for p in row:
            if name == "bandpo":
                lo, hi = bandkl_ref(p, kw["delta"])
            else:
                lo = 0.5 + 0.5 * math.sqrt(max(1 - 4 * kw["eps_low"] / p, 0.0))
                hi = 0.5 + 0.5 * math.sqrt(1 + 4 * kw["eps_high"] / p)
            if kw["relax"]:
                lo, hi = min(lo, 1 - kw["eps_low"]), max(hi, 1 + kw["eps_high"])
            lo_row.append(min(max(lo, 0.0), 1.0))
            hi_row.append(min(max(hi, 1.0), kw["upper_max"]))
        out_lo.append(lo_row)
        out_hi.append(hi_row)
    return out_lo, out_hi


BOUND_CASES = [
    ("bandpo", dict(delta=0.05, eps_low=0.2, eps_high=0.28, relax=False, upper_max=10.0, dual_clip=10.0)),
    ("bandpo", dict(delta=0.1, eps_low=0.2, eps_high=0.28, relax=True, upper_max=1.9, dual_clip=1.6)),
    ("dcpo", dict(eps_low=0.16, eps_high=0.28, relax=False, upper_max=10.0, dual_clip=10.0)),
    ("dcpo", dict(eps_low=0.2, eps_high=0.2, relax=True, upper_max=1.7, dual_clip=None)),
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name, kw", BOUND_CASES)
def test_bounded_losses_match_clipped_objective_loop(name, kw, agg):
    """Value, keep mask and gradient of bandpo / dcpo equal the PPO objective with the reference
    bounds; the bounds depend on mu only, the gradient flows through the surrogate (weight r A)."""
    logp, blogp, adv, mask = random_batch(31, spread=1.2)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    low, high = ref_bounds(name, mu, kw)
    keep, obj = clip_objective_ref(r, a, m, low, high, kw["dual_clip"])
    out = get_loss(name)(logp, blogp, adv, mask, agg=agg, **kw)
    assert out.keep.tolist() == keep
    assert out.loss.item() == pytest.approx(-aggregate_ref(obj, m, agg), rel=1e-10, abs=1e-12)
    weights = [[r[b][t] * a[b][t] if keep[b][t] else 0.0 for t in range(len(m[b]))] for b in range(len(m))]
    close(grad_of(out, logp), grad_ref(weights, m, agg))
    flat = [(keep[b][t], r[b][t], a[b][t], low[b][t], high[b][t]) for b in range(len(m)) for t in range(len(m[b]))
            if m[b][t]]
    assert any(not k for k, *_ in flat) and any(k and rr > 1.3 for k, rr, *_ in flat)  # bounds bite, and vary
    assert any(hi > 1.3 for *_, hi in flat) and any(hi < 1.3 for *_, hi in flat)


def test_bounded_losses_defaults_are_the_published_recipes():
    """bandpo: radius .05, no relax, upper <= 10, dual clip 10; dcpo: no relax, upper <= 10, dual clip 10."""
    import inspect

    for name, expect in (("bandpo", dict(delta=0.05, relax=False, upper_max=10.0, dual_clip=10.0, is_cap=None)),
                         ("dcpo", dict(relax=False, upper_max=10.0, dual_clip=10.0, is_cap=None))):
        params = inspect.signature(get_loss(name)).parameters
        assert {k: params[k].default for k in expect} == expect, name
    logp, blogp, adv, mask = random_batch(32, spread=1.2)
    explicit = get_loss("bandpo")(logp, blogp, adv, mask, delta=0.05, relax=False, upper_max=10.0, dual_clip=10.0)
    assert get_loss("bandpo")(logp, blogp, adv, mask).loss.item() == explicit.loss.item()


def test_bounded_loss_metrics_report_mean_bounds():
    """mu = .5 everywhere (p = 1/2 closed form) on two valid tokens: mean bounds are 1 -+ sqrt(1 - e^-.1)."""
    mu = torch.full((1, 3), 0.5, dtype=F64)
    logp = torch.log(torch.tensor([[0.55, 0.45, 0.5]], dtype=F64)).requires_grad_(True)
    out = get_loss("bandpo")(logp, mu.log(), torch.tensor([1.0]), torch.tensor([[True, True, False]]))
    s = math.sqrt(1 - math.exp(-0.1))
    assert out.metrics["bound_high_mean"] == pytest.approx(1 + s, rel=1e-12)
    assert out.metrics["bound_low_mean"] == pytest.approx(1 - s, rel=1e-12)
    assert out.metrics["kept_frac"] == 1.0


# --------------------------------------------------------------------------- converse ablation


def exempt_case():
    """mu = [.005, .5, .005, .5], r = [3, 1.5, .3, .5], A = [1, 1, -1, -1]."""
    mu = torch.tensor([[0.005, 0.5, 0.005, 0.5]], dtype=F64)
    r = torch.tensor([[3.0, 1.5, 0.3, 0.5]], dtype=F64)
    logp = (mu * r).log().requires_grad_(True)
    return logp, mu.log(), torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64), torch.ones(1, 4, dtype=torch.bool)


@pytest.mark.parametrize("sides, keep", [("both", [True, False, True, False]),
                                         ("positive", [True, False, False, False]),
                                         ("negative", [False, False, True, False])])
def test_ppo_lowmu_exempt_hand_case(sides, keep):
    """PPO eps .2 clips tokens 2 (A > 0, r 1.5) and 4 (A < 0, r .5) whatever mu, and tokens 1 / 3 (mu .005
    < tau .01) unless exempt on their side. Exempt tokens: value -r A, gradient r A (/4 tokens)."""
    logp, blogp, adv, mask = exempt_case()
    out = get_loss("ppo-lowmu-exempt")(logp, blogp, adv, mask, tau=0.01, sides=sides)
    assert out.keep.tolist() == [keep]
    obj = [3.0 if keep[0] else 1.2, 1.2, -0.3 if keep[2] else -0.8, -0.8]  # min(rA, clip(r) A)
    assert out.loss.item() == pytest.approx(-sum(obj) / 4, rel=1e-12)
    weights = [[3.0 * keep[0], 0.0, -0.3 * keep[2], 0.0]]
    close(grad_of(out, logp), grad_ref(weights, [[1, 1, 1, 1]], "token-mean"))
    assert out.metrics["exempt_frac"] == 0.5


def test_ppo_lowmu_exempt_without_low_mu_is_ppo():
    """No token below tau: exactly ppo (loss, keep, gradient), bit for bit."""
    logp, blogp, adv, mask = random_batch(33)
    a = get_loss("ppo-lowmu-exempt")(logp, blogp, adv, mask, tau=0.01, eps_high=0.28)
    ga = grad_of(a, logp)
    b = get_loss("ppo")(logp, blogp, adv, mask, eps_high=0.28)
    assert a.loss.item() == b.loss.item() and torch.equal(a.keep, b.keep) and torch.equal(ga, grad_of(b, logp))
    with pytest.raises(ValueError, match="sides"):
        get_loss("ppo-lowmu-exempt")(logp, blogp, adv, mask, sides="up")
    with pytest.raises(ValueError, match="tau"):
        get_loss("ppo-lowmu-exempt")(logp, blogp, adv, mask, tau=0.0)


# --------------------------------------------------------------------------- the hybrid


def hybrid_case():
    """(mu, pi, A): 1 (.005, .02, +1) r 4, D .015; 2 (.005, .0055, +1) r 1.1; 3 (.005, .0001, -1) r .02;
    4 (.5, .7, +1) r 1.4, D .2; 5 (.5, .6, +1) r 1.2, D .1; 6 (.009, .0135, +1) r 1.5, D .0045."""
    mu = torch.tensor([[0.005, 0.005, 0.005, 0.5, 0.5, 0.009]], dtype=F64)
    pi = torch.tensor([[0.02, 0.0055, 0.0001, 0.7, 0.6, 0.0135]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, 1.0]], dtype=F64)
    return pi.log().requires_grad_(True), mu.log(), adv, torch.ones(1, 6, dtype=torch.bool)


def test_hybrid_hand_case():
    """delta .15, tau .01, eps .2, C 3. dppo-tv masks only 4 (D .2 > .15). The hybrid also masks 1 and 6
    (A > 0, mu < .01, r > 1.2), not 2 (r 1.1) nor 3 (A < 0). Gradient: min(r, 3) A on kept tokens / 6."""
    logp, blogp, adv, mask = hybrid_case()
    tv = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=0.15)
    assert tv.keep.tolist() == [[True, True, True, False, True, True]]
    out = get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, delta=0.15, tau=0.01)
    assert out.keep.tolist() == [[False, True, True, False, True, False]]
    weights = [[0.0, 1.1, -0.02, 0.0, 1.2, 0.0]]
    close(grad_of(out, logp), grad_ref(weights, [[1] * 6], "token-mean"), tol=1e-9)
    assert out.loss.item() == pytest.approx(-(1.1 - 0.02 + 1.2) / 6, rel=1e-9)
    assert out.metrics["ratio_bounded_frac"] == pytest.approx(2 / 6)
    assert out.metrics["kept_frac"] == pytest.approx(3 / 6)
    # tau .006 leaves token 6 (mu .009) loose; eps_high .6 lets token 6 (r 1.5) through but not 1 (r 4)
    assert get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, tau=0.006).keep.tolist()[0][5]
    assert get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, eps_high=0.6).keep.tolist() == [
        [False, True, True, False, True, True]]


def test_hybrid_per_token_delta_and_cap():
    """A [B, T] delta keeps token 4 (delta .25 > D .2) as in dppo-tv; the IS cap (default 3) truncates
    token 1 (r 4) once tau no longer bounds it: weight 3, or 4 with is_cap None."""
    logp, blogp, adv, mask = hybrid_case()
    delta = torch.tensor([[0.15, 0.15, 0.15, 0.25, 0.15, 0.15]], dtype=F64)
    out = get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, delta=delta)
    assert out.keep.tolist() == [[False, True, True, True, True, False]]
    assert out.metrics["delta_mean"] == pytest.approx(1.0 / 6)
    loose = get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, delta=delta, tau=0.001)
    g = grad_of(loose, logp)
    assert float(g[0, 0]) == pytest.approx(-3.0 / 6, rel=1e-9)
    uncapped = get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, delta=delta, tau=0.001, is_cap=None)
    assert float(grad_of(uncapped, logp)[0, 0]) == pytest.approx(-4.0 / 6, rel=1e-9)


def test_hybrid_without_low_mu_is_dppo_tv():
    """random_batch has mu >= .05: with tau .01 the hybrid is dppo-tv bit for bit (scalar and [B, T] delta)."""
    logp, blogp, adv, mask = random_batch(34)
    for delta in (0.1, torch.rand(logp.shape, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.3 + 0.01):
        a = get_loss("dppo-tv-hybrid")(logp, blogp, adv, mask, delta=delta)
        ga = grad_of(a, logp)
        b = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=delta)
        assert a.loss.item() == b.loss.item() and torch.equal(a.keep, b.keep) and torch.equal(ga, grad_of(b, logp))


# --------------------------------------------------------------------------- DPPO's IS cap


@pytest.mark.parametrize("name", ["dppo-tv", "dppo-kl", "dppo-tv-hybrid"])
def test_dppo_default_is_cap_is_three(name):
    """A kept token with r = 4 (A < 0, moving back towards mu: never masked) gets weight min(4, 3) A by
    default, 4 A with is_cap=None."""
    mu = torch.tensor([[0.1, 0.5]], dtype=F64)
    logp = torch.log(torch.tensor([[0.4, 0.5]], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = get_loss(name)(logp, mu.log(), adv, mask)
    assert out.keep.tolist() == [[True, True]]
    close(grad_of(out, logp), grad_ref([[-3.0, 1.0]], [[1, 1]], "token-mean"))
    assert out.metrics["over_cap_frac"] == 0.5
    out = get_loss(name)(logp, mu.log(), adv, mask, is_cap=None)
    close(grad_of(out, logp), grad_ref([[-4.0, 1.0]], [[1, 1]], "token-mean"))


def test_new_losses_registered():
    assert {"bandpo", "dcpo", "dppo-tv-hybrid", "ppo-lowmu-exempt"} <= set(available_losses())


# --------------------------------------------------------------------------- config and METHODS


def test_config_is_cap_defaults_to_the_losses_own():
    """Unset algo.is_cap resolves to the loss's default (dppo-*: 3, others: none); an explicit null stays
    uncapped, also when a stored config is resolved again (resume)."""
    from tokentrust.train.config import loss_params, resolve

    assert resolve(overrides={"algo": {"loss": "dppo-tv"}}).algo.is_cap == 3.0
    assert resolve(overrides={"algo": {"loss": "dppo-kl"}}).algo.is_cap == 3.0
    assert resolve(overrides={"algo": {"loss": "ppo"}}).algo.is_cap is None
    assert resolve(overrides={"algo": {"loss": "bandpo"}}).algo.is_cap is None
    off = resolve(overrides={"algo": {"loss": "dppo-tv", "is_cap": None}})
    assert off.algo.is_cap is None and loss_params(off)["is_cap"] is None
    assert resolve(base=off.to_dict()).algo.is_cap is None
    assert loss_params(resolve(overrides={"algo": {"loss": "dppo-tv"}}))["is_cap"] == 3.0


def test_committed_grids_keep_their_meaning():
    """The stress study ran dppo-tv before the cap: its stored resolved config says is_cap null, and
    resolving it again still gives an uncapped run (what `--resume` does with a stored config)."""
    import json
    from pathlib import Path

    from tokentrust.train.config import resolve

    grid = json.loads((Path(__file__).resolve().parents[1] / "docs/results/stress-study/grid.json").read_text())
    assert grid["resolved_example"]["algo"]["loss"] == "dppo-tv"
    assert grid["resolved_example"]["algo"]["is_cap"] is None
    assert resolve(base=grid["resolved_example"]).algo.is_cap is None


def test_methods_entries_for_caps_competitors_and_hybrid(tmp_path):
    from tokentrust.study.compare import run_configs
    from tokentrust.study.methods import METHODS

    names = ["dppo-tv", "dppo-kl", "dppo-tv-uncapped", "dppo-kl-uncapped", "av-freq-norm", "av-freq-norm-uncapped",
             "av-hybrid", "bandpo", "bandpo-relax", "dcpo", "ppo-lowmu-exempt"]
    runs = {n: c for n, _, c in run_configs({"preset": "tiny-arith", "methods": names, "seeds": [0]}, tmp_path)}
    caps = {n: runs[n].algo.is_cap for n in names}
    assert caps == {"dppo-tv": 3.0, "dppo-kl": 3.0, "dppo-tv-uncapped": None, "dppo-kl-uncapped": None,
                    "av-freq-norm": 3.0, "av-freq-norm-uncapped": None, "av-hybrid": 3.0, "bandpo": None,
                    "bandpo-relax": None, "dcpo": None, "ppo-lowmu-exempt": None}
    # every DPPO-based AV method carries the same cap as dppo-tv (the primary pair stays matched)
    assert all(m["algo"]["is_cap"] == 3.0 for n, m in METHODS.items()
               if m["algo"]["loss"].startswith("dppo") and not n.endswith("-uncapped"))
    hyb, av = runs["av-hybrid"].algo, runs["av-freq-norm"].algo
    assert hyb.loss == "dppo-tv-hybrid" and hyb.params == {"tau": 0.01}
    assert (hyb.delta, hyb.thresholds) == (av.delta, av.thresholds)
    assert runs["bandpo"].algo.delta == 0.05 and runs["bandpo-relax"].algo.params == {"relax": True}
    assert runs["dcpo"].algo.delta is None and runs["dcpo"].algo.eps_high == 0.28
    assert {METHODS[n]["family"] for n in ("bandpo", "bandpo-relax", "dcpo")} == {"baseline"}


def test_hybrid_preregistration_grid_is_declared_and_runs_in_the_chosen_regime(tmp_path):
    """The pre-registered grid loads, names only registered methods, fresh seeds (2000+, used by no grid
    preset), av-hybrid vs av-freq-norm as its primary comparison, and its placeholder regime has been
    replaced by the off-policy regime issue 18 chose (the one permitted edit)."""
    from pathlib import Path

    from tokentrust.study.compare import load_grid, run_configs
    from tokentrust.study.grids import GRID_PRESETS
    from tokentrust.study.methods import METHODS
    from tokentrust.study.verdicts import resolve_plan

    path = Path(__file__).resolve().parents[1] / "docs/results/hybrid-preregistration.grid.yaml"
    spec = load_grid(file=str(path))
    assert set(spec["methods"]) <= set(METHODS) and "av-hybrid" in spec["methods"]
    assert min(spec["seeds"]) >= 2000 and len(spec["seeds"]) == 8
    used = {s for g in GRID_PRESETS.values() for s in g["seeds"]}
    assert not used & set(spec["seeds"])
    plan = resolve_plan(spec, spec["methods"], "dppo-tv")
    assert plan.declared and set(plan.comparisons.values()) == {("av-hybrid", "av-freq-norm")}
    assert plan.margins["H2"] == 0.05
    assert spec["preset"] == "tiny-arith-offpolicy"
    runs = run_configs(spec, tmp_path)
    assert len(runs) == 40 and all(cfg.rollout.staleness == 4 and cfg.max_steps == 250 for _, _, cfg in runs)


@pytest.mark.parametrize("method", ["bandpo", "dcpo", "av-hybrid", "ppo-lowmu-exempt"])
def test_new_methods_train_end_to_end(tmp_path, method, one_thread):
    """Each new METHODS entry runs through the trainer (config -> loss keywords -> metrics): two steps,
    finite losses, its own metric logged, the resolved config as declared."""
    from conftest import tiny_overrides
    from tokentrust.study.methods import METHODS
    from tokentrust.train.config import resolve
    from tokentrust.train.rundir import read_jsonl
    from tokentrust.train.loop import run_training

    algo = {"thresholds": {"kind": "constant"}, **METHODS[method]["algo"]}
    cfg = resolve(overrides=tiny_overrides(tmp_path / method, algo=algo))
    assert cfg.algo.loss == algo["loss"] and cfg.algo.params == algo.get("params", {})
    out = run_training(cfg, quiet=True, evaluate_at_end=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) for r in records)
    own = {"bandpo": "bound_high_mean", "dcpo": "bound_high_mean", "av-hybrid": "ratio_bounded_frac",
           "ppo-lowmu-exempt": "exempt_frac"}[method]
    assert f"trust_region/{own}" in records[0]
    if method == "av-hybrid":  # the AV schedule applied: mean delta 0.15, lower for frequent tokens than rare ones
        r = records[0]
        assert r["trust_region/delta_mean"] == pytest.approx(0.15, rel=1e-4)
        assert r["trust_region/delta_mean/bucket_0"] < 0.15 < r["trust_region/delta_mean/bucket_4"]
