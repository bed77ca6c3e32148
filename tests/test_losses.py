"""Policy losses checked against independent references.

Every expected value here comes from methods.md written out per token in plain Python
(math on floats, explicit loops) or from hand-computed cases, never from the library's own
tensor code. Gradients are compared in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokentrust.losses import NEEDS_PROX_LOGP, available_losses, get_loss
from tokentrust.losses.core import prepare
from tokentrust.losses.dppo import binary_kl, binary_tv, divergence_mask_loss, topk_divergence

torch.set_num_threads(1)
F64 = torch.float64
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MASK_ROWS = [  # full, right-padded, left-padded, fully masked, short
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
]


# --------------------------------------------------------------------------- helpers


def random_batch(seed: int, *, spread: float = 0.8, dtype=F64):
    """Probabilities mu, pi in (0, 1), ratios in ~[0.45, 2.2], mixed-sign advantages with some zeros."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(MASK_ROWS, dtype=torch.bool)
    b, t = mask.shape
    mu = torch.rand(b, t, generator=g, dtype=F64) * 0.9 + 0.05
    log_r = (torch.rand(b, t, generator=g, dtype=F64) * 2 - 1) * spread
    pi = (mu * log_r.exp()).clamp(max=0.995)
    adv = torch.randn(b, t, generator=g, dtype=F64)
    adv[torch.rand(b, t, generator=g) < 0.1] = 0.0
    logp = pi.log().to(dtype).requires_grad_(True)
    return logp, mu.log().to(dtype), adv.to(dtype), mask


def lists(logp, blogp, adv, mask):
    """Per-token Python floats: pi, mu, r, A, m."""
    pi = [[math.exp(v) for v in row] for row in logp.detach().tolist()]
    mu = [[math.exp(v) for v in row] for row in blogp.tolist()]
    r = [[p / q for p, q in zip(pr, qr)] for pr, qr in zip(pi, mu)]
    return pi, mu, r, adv.tolist(), mask.tolist()


def normalisers(mask: list[list[bool]], agg: str, horizon: int | None = None) -> list[list[float]]:
    """The divisor of each token's term under verl's agg_loss semantics (fully-masked rows excluded)."""
    n_tok = sum(sum(row) for row in mask)
    lens = [sum(row) for row in mask]
    n_seq = sum(1 for n in lens if n > 0)
    h = horizon if horizon is not None else len(mask[0])
    out = []
    for b, row in enumerate(mask):
        if agg == "token-mean":
            out.append([float(n_tok)] * len(row))
        elif agg == "seq-mean-token-mean":
            out.append([float(n_seq * lens[b])] * len(row))
        elif agg == "seq-mean-token-sum":
            out.append([float(n_seq)] * len(row))
        else:
            out.append([float(n_seq * h)] * len(row))
    return out


def aggregate_ref(values, mask, agg, horizon=None) -> float:
    norm = normalisers(mask, agg, horizon)
    return sum(v / n for vr, nr, mr in zip(values, norm, mask) for v, n, m in zip(vr, nr, mr) if m)


def grad_ref(weights, mask, agg, horizon=None) -> torch.Tensor:
    """d loss / d logp given the per-token d(objective)/d(logp) weights (loss = -objective)."""
    norm = normalisers(mask, agg, horizon)
    return torch.tensor([[-w / n if m else 0.0 for w, n, m in zip(wr, nr, mr)]
                         for wr, nr, mr in zip(weights, norm, mask)], dtype=F64)


def grad_of(out, logp) -> torch.Tensor:
    logp.grad = None
    out.loss.backward()
    return logp.grad.detach().clone()


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def binary_kl_ref(mu: float, pi: float) -> float:
    return mu * math.log(mu / pi) + (1 - mu) * math.log((1 - mu) / (1 - pi))


def dppo_keep_ref(pi, mu, r, a, m, delta, kind: str):
    """methods.md: masked iff (A>0, r>1, D>delta) or (A<0, r<1, D>delta)."""
    keep = []
    for b in range(len(m)):
        row = []
        for t in range(len(m[b])):
            d_t = delta[b][t] if isinstance(delta, list) else delta
            div = abs(pi[b][t] - mu[b][t]) if kind == "tv" else binary_kl_ref(mu[b][t], pi[b][t])
            away = (a[b][t] > 0 and r[b][t] > 1) or (a[b][t] < 0 and r[b][t] < 1)
            row.append(bool(m[b][t]) and not (away and div > d_t))
        keep.append(row)
    return keep


def ppo_ref(r, a, m, eps_low, eps_high):
    """Per token: objective min(rA, clip(r)A); gradient flows iff the unclipped term is the min."""
    keep, obj = [], []
    for b in range(len(m)):
        krow, orow = [], []
        for t in range(len(m[b])):
            unclipped = r[b][t] * a[b][t]
            clipped = min(max(r[b][t], 1 - eps_low), 1 + eps_high) * a[b][t]
            orow.append(min(unclipped, clipped))
            krow.append(bool(m[b][t]) and not clipped < unclipped)
        keep.append(krow)
        obj.append(orow)
    return keep, obj


def cppo_keep_ref(pi, mu, r, a, m, delta, w_min, delta_b):
    """CPPO from methods.md, one sequence at a time over its valid tokens t = 1..T."""
    keep = [[False] * len(row) for row in m]
    for b in range(len(m)):
        pos = [t for t in range(len(m[b])) if m[b][t]]
        n = len(pos)
        if n == 0:
            continue
        d = [abs(pi[b][t] - mu[b][t]) for t in pos]
        bud = min(max(float(np.percentile(d, 90)), delta_b), 2 * delta_b)
        s_prev = w_prev = 0.0
        for i, t in enumerate(pos, start=1):
            w = w_min + (1 - w_min) * (n - i) / (n - 1) if n > 1 else 1.0
            z = w * d[i - 1]
            c = min(delta, delta + bud * w_prev - s_prev)
            keep[b][t] = a[b][t] * (r[b][t] - 1) <= 0 or z <= c
            s_prev += z
            w_prev += w
    return keep


def capped(r: float, cap: float | None) -> float:
    return r if cap is None else min(r, cap)


# --------------------------------------------------------------------------- registry / params


def test_registry_lists_all_losses():
    assert set(available_losses()) >= {"ppo", "dppo-tv", "dppo-kl", "dppo-topk-tv", "dppo-topk-kl", "cppo", "drpo",
                                       "pg-is", "decoupled-ppo"}


def test_unknown_loss_lists_available():
    with pytest.raises(ValueError) as err:
        get_loss("not-a-loss")
    msg = str(err.value)
    assert "not-a-loss" in msg
    for name in available_losses():
        assert name in msg


@pytest.mark.parametrize("name, params, field", [
    ("dppo-tv", {"delta": 0.0}, "delta"),
    ("dppo-tv", {"delta": -0.1}, "delta"),
    ("dppo-kl", {"delta": 0.0}, "delta"),
    ("drpo", {"delta": 0.0}, "delta"),
    ("cppo", {"delta": -1.0}, "delta"),
    ("cppo", {"delta_b": 0.0}, "delta_b"),
    ("cppo", {"w_min": 1.5}, "w_min"),
    ("ppo", {"eps_low": -0.1}, "eps"),
    ("ppo", {"eps_high": -0.1}, "eps"),
    ("ppo", {"agg": "mean"}, "agg"),
    ("dppo-tv", {"agg": "token-sum"}, "agg"),
    ("cppo", {"agg": "bad"}, "agg"),
    ("drpo", {"agg": "bad"}, "agg"),
    ("dppo-tv", {"is_cap": 0.0}, "is_cap"),
    ("dppo-tv", {"surrogate": "nope"}, "surrogate"),
    ("dppo-tv", {"delta": torch.full((2, 2), 0.1)}, "delta"),  # wrong shape
    ("bandpo", {"delta": 0.0}, "delta"),
    ("bandpo", {"dual_clip": 1.0}, "dual_clip"),
    ("dcpo", {"upper_max": 0.5}, "upper_max"),
    ("dcpo", {"eps_low": -0.1}, "eps"),
    ("dcpo", {"agg": "bad"}, "agg"),
    ("dppo-tv-hybrid", {"tau": 0.0}, "tau"),
    ("dppo-tv-hybrid", {"eps_high": -0.1}, "eps"),
    ("ppo-lowmu-exempt", {"tau": 1.5}, "tau"),
])
def test_bad_params_raise_naming_field(name, params, field):
    logp, blogp, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match=field):
        get_loss(name)(logp, blogp, adv, mask, **params)


def test_bad_shapes_raise():
    logp, blogp, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="advantages"):
        get_loss("ppo")(logp, blogp, adv[:, :3], mask)
    with pytest.raises(ValueError, match="mask"):
        get_loss("ppo")(logp, blogp, adv, mask[:, :3])


# --------------------------------------------------------------------------- PPO


def test_ppo_hand_case_clip_higher():
    """r = [1.5, 0.5, 1.25, 0.7, 0.75], A = [1, -1, 1, 1, -1], eps_low = 0.2, eps_high = 0.28.

    min(rA, clip(r)A) = [1.28, -0.8, 1.25, 0.7, -0.8]  ->  loss = -1.63 / 5 = -0.326;
    clipped where the clip term is the (strict) min: tokens 0, 1, 4.
    """
    mu = torch.full((1, 5), 0.4, dtype=F64)
    r = torch.tensor([[1.5, 0.5, 1.25, 0.7, 0.75]], dtype=F64)
    logp = (mu * r).log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = get_loss("ppo")(logp, mu.log(), adv, mask, eps_low=0.2, eps_high=0.28)
    assert out.keep.tolist() == [[False, False, True, True, False]]
    assert out.loss.item() == pytest.approx(-0.326, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[0.0, 0.0, -0.25, -0.14, 0.0]], dtype=F64))
    # symmetric eps = 0.2 clips token 2 (r = 1.25 > 1.2) as well
    out = get_loss("ppo")(logp, mu.log(), adv, mask, eps_low=0.2)
    assert out.keep.tolist() == [[False, False, False, True, False]]


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.4)])
@pytest.mark.parametrize("agg", AGGS)
def test_ppo_matches_clipped_objective_loop(eps_low, eps_high, agg):
    logp, blogp, adv, mask = random_batch(1)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    keep, obj = ppo_ref(r, a, m, eps_low, eps_high)
    out = get_loss("ppo")(logp, blogp, adv, mask, eps_low=eps_low, eps_high=eps_high, agg=agg)
    assert out.keep.tolist() == keep
    assert any(not k for row, mr in zip(keep, m) for k, v in zip(row, mr) if v)  # something was clipped
    assert out.loss.item() == pytest.approx(-aggregate_ref(obj, m, agg), rel=1e-12, abs=1e-14)
    weights = [[r[b][t] * a[b][t] if keep[b][t] else 0.0 for t in range(len(m[b]))] for b in range(len(m))]
    close(grad_of(out, logp), grad_ref(weights, m, agg))


def test_ppo_gradient_matches_autograd_of_textbook_formula():
    """Autograd through -mean(min(rA, clamp(r)A)) gives the same gradient (no cap, token-mean)."""
    logp, blogp, adv, mask = random_batch(2)
    leaf = logp.detach().clone().requires_grad_(True)
    ratio = (leaf - blogp).exp()
    obj = torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    (-(obj * mask).sum() / mask.sum()).backward()
    out = get_loss("ppo")(logp, blogp, adv, mask, eps_low=0.2, eps_high=0.28)
    close(grad_of(out, logp), leaf.grad)


def test_ppo_dual_clip_hand_case():
    """Dual-clip PPO, c = 3, eps = 0.2: r = [4, 2.5, 4, 0.5], A = [-1, -1, 1, -1].

    per-token loss: token 0 min(max(4, 1.2), 3) = 3 (capped: no gradient), token 1 2.5 (kept),
    token 2 -1.2 (clipped), token 3 0.8 (clipped)  ->  loss = 5.1 / 4; without the dual clip 6.1 / 4.
    """
    mu = torch.full((1, 4), 0.2, dtype=F64)
    r = torch.tensor([[4.0, 2.5, 4.0, 0.5]], dtype=F64)
    logp = (mu * r).log().requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = get_loss("ppo")(logp, mu.log(), adv, mask, eps_low=0.2, dual_clip=3.0)
    assert out.keep.tolist() == [[False, True, False, False]]
    assert out.loss.item() == pytest.approx(5.1 / 4, abs=1e-12)
    close(grad_of(out, logp), torch.tensor([[0.0, 0.625, 0.0, 0.0]], dtype=F64))
    plain = get_loss("ppo")(logp, mu.log(), adv, mask, eps_low=0.2)
    assert plain.loss.item() == pytest.approx(6.1 / 4, abs=1e-12) and plain.keep[0, 0]
    with pytest.raises(ValueError, match="dual_clip"):
        get_loss("ppo")(logp, mu.log(), adv, mask, dual_clip=1.0)


@pytest.mark.parametrize("agg", AGGS)
def test_ppo_dual_clip_matches_autograd_of_textbook_formula(agg):
    """Autograd through where(A < 0, min(c (-A), max(-rA, -clip(r) A)), max(...)), as verl writes it."""
    logp, blogp, adv, mask = random_batch(4, spread=1.5)
    leaf = logp.detach().clone().requires_grad_(True)
    ratio = (leaf - blogp).exp()
    clip1 = torch.maximum(-ratio * adv, -ratio.clamp(0.8, 1.28) * adv)
    per_token = torch.where(adv < 0, torch.minimum(-adv * 1.7, clip1), clip1)
    m = mask.double()
    if agg == "token-mean":
        ref = (per_token * m).sum() / m.sum()
    else:
        lens = m.sum(-1)
        n_seq = (lens > 0).sum()
        if agg == "seq-mean-token-mean":
            ref = ((per_token * m).sum(-1) / lens.clamp(min=1)).sum() / n_seq
        elif agg == "seq-mean-token-sum":
            ref = (per_token * m).sum() / n_seq
        else:
            ref = (per_token * m).sum() / n_seq / mask.shape[1]
    ref.backward()
    out = get_loss("ppo")(logp, blogp, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=1.7, agg=agg)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    close(grad_of(out, logp), leaf.grad)
    r = ratio.detach()
    assert bool(((adv < 0) & (r > 1.7) & mask).any())  # the dual clip is exercised


# --------------------------------------------------------------------------- DPPO masks


def test_binary_kl_hand_case():
    """mu = 0.5, pi = 0.7: KL = 0.5 ln(5/7) + 0.5 ln(5/3) = 0.0871760..., A > 0 and r > 1."""
    kl = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert kl == pytest.approx(0.087176, abs=1e-6)
    logp = torch.tensor([[math.log(0.7)]], dtype=F64, requires_grad=True)
    blogp = torch.tensor([[math.log(0.5)]], dtype=F64)
    adv, mask = torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=torch.bool)
    x = prepare(logp, blogp, adv, mask)
    assert binary_kl(x).item() == pytest.approx(kl, rel=1e-10)
    assert not get_loss("dppo-kl")(logp, blogp, adv, mask, delta=0.08).keep.item()
    assert get_loss("dppo-kl")(logp, blogp, adv, mask, delta=0.09).keep.item()
    # the same move with A < 0 goes back toward mu: never masked
    assert get_loss("dppo-kl")(logp, blogp, -adv, mask, delta=0.01).keep.item()


@pytest.mark.parametrize("kind, deltas", [("tv", [0.02, 0.1, 0.15, 0.3]), ("kl", [0.005, 0.05, 0.2])])
@pytest.mark.parametrize("seed", [3, 4])
def test_dppo_mask_matches_loop(kind, deltas, seed):
    logp, blogp, adv, mask = random_batch(seed)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    masked_any = False
    for delta in deltas:
        keep = dppo_keep_ref(pi, mu, r, a, m, delta, kind)
        out = get_loss(f"dppo-{kind}")(logp, blogp, adv, mask, delta=delta)
        assert out.keep.tolist() == keep, delta
        masked_any |= any(not k for row, mr in zip(keep, m) for k, v in zip(row, mr) if v)
    assert masked_any


@pytest.mark.parametrize("seed", [5, 6])
def test_binary_divergences_match_hand_formulas(seed):
    logp, blogp, adv, mask = random_batch(seed)
    pi, mu, _, _, _ = lists(logp, blogp, adv, mask)
    x = prepare(logp, blogp, adv, mask)
    tv = [[abs(p - q) for p, q in zip(pr, qr)] for pr, qr in zip(pi, mu)]
    kl = [[binary_kl_ref(q, p) for p, q in zip(pr, qr)] for pr, qr in zip(pi, mu)]
    close(binary_tv(x), torch.tensor(tv, dtype=F64))
    close(binary_kl(x), torch.tensor(kl, dtype=F64), tol=1e-9)


@pytest.mark.parametrize("delta", [0.1, 0.2, 0.35])
@pytest.mark.parametrize("agg", AGGS)
def test_dppo_with_ratio_divergence_is_ppo(delta, agg):
    """methods.md: with D_t = |r_t - 1| the DPPO mask is PPO's clip with eps_low = eps_high = delta."""
    logp, blogp, adv, mask = random_batch(7)
    x = prepare(logp, blogp, adv, mask)
    out = divergence_mask_loss(x, (x.ratio - 1).abs(), delta, agg=agg, is_cap=None, surrogate_kind="ratio",
                               horizon=None, global_tokens=None, global_seqs=None)
    g_dppo = grad_of(out, logp)
    ref = get_loss("ppo")(logp, blogp, adv, mask, eps_low=delta, eps_high=delta, agg=agg)
    assert torch.equal(out.keep, ref.keep)
    assert (~ref.keep & mask).any()
    close(g_dppo, grad_of(ref, logp))


def test_mixed_delta_tensor_each_token_own_threshold():
    logp, blogp, adv, mask = random_batch(8)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(mask.shape, generator=g, dtype=F64) * 0.3 + 0.005
    keep = dppo_keep_ref(pi, mu, r, a, m, delta.tolist(), "tv")
    out = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=delta)
    assert out.keep.tolist() == keep
    # the per-token values matter: one scalar threshold at their mean gives a different mask
    assert keep != dppo_keep_ref(pi, mu, r, a, m, float(delta[mask].mean()), "tv")
    kl_keep = dppo_keep_ref(pi, mu, r, a, m, (delta / 3).tolist(), "kl")
    assert get_loss("dppo-kl")(logp, blogp, adv, mask, delta=delta / 3).keep.tolist() == kl_keep


@pytest.mark.parametrize("name", ["dppo-tv", "dppo-kl", "drpo"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_filled_delta_tensor_equals_scalar(name, dtype):
    logp, blogp, adv, mask = random_batch(9, dtype=dtype)
    delta = 0.12 if name != "dppo-kl" else 0.04
    a = get_loss(name)(logp, blogp, adv, mask, delta=delta, agg="seq-mean-token-mean", is_cap=1.6)
    ga = grad_of(a, logp)
    b = get_loss(name)(logp, blogp, adv, mask, delta=torch.full(mask.shape, delta, dtype=dtype),
                       agg="seq-mean-token-mean", is_cap=1.6)
    gb = grad_of(b, logp)
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.loss.detach(), b.loss.detach())
    assert torch.equal(ga, gb)
    assert b.metrics["delta_mean"] == pytest.approx(delta, rel=1e-6)


# --------------------------------------------------------------------------- gradients per aggregation


LOSS_KEEP = {
    "ppo": lambda pi, mu, r, a, m: ppo_ref(r, a, m, 0.2, 0.28)[0],
    "dppo-tv": lambda pi, mu, r, a, m: dppo_keep_ref(pi, mu, r, a, m, 0.1, "tv"),
    "dppo-kl": lambda pi, mu, r, a, m: dppo_keep_ref(pi, mu, r, a, m, 0.03, "kl"),
    "cppo": lambda pi, mu, r, a, m: cppo_keep_ref(pi, mu, r, a, m, 0.15, 0.8, 0.02),
    "pg-is": lambda pi, mu, r, a, m: [[bool(v) for v in row] for row in m],  # the control masks nothing
}
LOSS_PARAMS = {"ppo": {"eps_low": 0.2, "eps_high": 0.28}, "dppo-tv": {"delta": 0.1}, "dppo-kl": {"delta": 0.03},
               "cppo": {"delta": 0.15, "w_min": 0.8, "delta_b": 0.02}, "pg-is": {}}


@pytest.mark.parametrize("cap", [None, 1.3])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name", list(LOSS_KEEP))
def test_gradient_is_keep_truncated_ratio_advantage_over_normaliser(name, agg, cap):
    logp, blogp, adv, mask = random_batch(10)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    keep = LOSS_KEEP[name](pi, mu, r, a, m)
    out = get_loss(name)(logp, blogp, adv, mask, agg=agg, is_cap=cap, **LOSS_PARAMS[name])
    assert out.keep.tolist() == keep
    weights = [[capped(r[b][t], cap) * a[b][t] if keep[b][t] else 0.0 for t in range(len(m[b]))]
               for b in range(len(m))]
    close(grad_of(out, logp), grad_ref(weights, m, agg))
    if cap is not None:  # the cap actually bit on some kept token with A != 0
        assert any(keep[b][t] and r[b][t] > cap and a[b][t] != 0 for b in range(len(m)) for t in range(len(m[b])))


@pytest.mark.parametrize("cap", [None, 1.3])
@pytest.mark.parametrize("agg", AGGS)
def test_dppo_value_both_surrogates(agg, cap):
    """ratio surrogate: -keep min(r,C) A; logp surrogate (verl): -keep min(r,C) A logp. Same gradient."""
    logp, blogp, adv, mask = random_batch(11)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    keep = dppo_keep_ref(pi, mu, r, a, m, 0.1, "tv")
    lp = logp.detach().tolist()
    obj_ratio = [[capped(r[b][t], cap) * a[b][t] * keep[b][t] for t in range(len(m[b]))] for b in range(len(m))]
    obj_logp = [[obj_ratio[b][t] * lp[b][t] for t in range(len(m[b]))] for b in range(len(m))]
    out_r = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=0.1, agg=agg, is_cap=cap)
    out_l = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=0.1, agg=agg, is_cap=cap, surrogate="logp")
    assert out_r.loss.item() == pytest.approx(-aggregate_ref(obj_ratio, m, agg), rel=1e-12, abs=1e-14)
    assert out_l.loss.item() == pytest.approx(-aggregate_ref(obj_logp, m, agg), rel=1e-12, abs=1e-14)
    close(grad_of(out_r, logp), grad_of(out_l, logp))


def test_norm_aggregation_uses_horizon():
    logp, blogp, adv, mask = random_batch(12)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    keep = dppo_keep_ref(pi, mu, r, a, m, 0.1, "tv")
    out = get_loss("dppo-tv")(logp, blogp, adv, mask, delta=0.1, agg="seq-mean-token-sum-norm", horizon=20)
    weights = [[r[b][t] * a[b][t] if keep[b][t] else 0.0 for t in range(len(m[b]))] for b in range(len(m))]
    close(grad_of(out, logp), grad_ref(weights, m, "seq-mean-token-sum-norm", horizon=20))


@pytest.mark.parametrize("name, params", [("ppo", {}), ("dppo-tv", {"delta": 0.1}), ("drpo", {"delta": 0.2})])
@pytest.mark.parametrize("agg", AGGS)
def test_global_counts_make_micro_batches_sum_to_full_batch(name, params, agg):
    """Splitting the batch by sequences with global_tokens/global_seqs reproduces loss and gradient."""
    logp, blogp, adv, mask = random_batch(13)
    full = get_loss(name)(logp, blogp, adv, mask, agg=agg, **params)
    g_full = grad_of(full, logp)
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    leaf = logp.detach().clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        out = get_loss(name)(leaf[rows], blogp[rows], adv[rows], mask[rows], agg=agg,
                             global_tokens=n_tok, global_seqs=n_seq, **params)
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-12, abs=1e-14)
    close(leaf.grad, g_full)


# --------------------------------------------------------------------------- Top-K


def full_distributions(seed: int, n: int, vocab: int = 50):
    """n random (mu, pi) pairs over `vocab` ids and a token y ~ mu for each, all float64."""
    g = torch.Generator().manual_seed(seed)
    logits_mu = torch.randn(n, vocab, generator=g, dtype=F64) * 2.0
    logits_pi = logits_mu + torch.randn(n, vocab, generator=g, dtype=F64) * 0.6
    mu, pi = logits_mu.softmax(-1), logits_pi.softmax(-1)
    y = torch.multinomial(mu.float(), 1, generator=g).squeeze(-1)
    return mu, pi, y


def topk_ids(mu_row: list[float], y: int, k: int) -> list[int]:
    """mu's K most probable ids; the sampled id replaces the K-th if absent."""
    ids = sorted(range(len(mu_row)), key=lambda v: -mu_row[v])[:k]
    if y not in ids:
        ids[-1] = y
    return ids


def reduced_divergence_ref(mu_row, pi_row, ids, kind: str) -> float:
    """TV or KL over the K kept ids plus one 'other' bucket, in float64 Python."""
    q = [mu_row[v] for v in ids] + [sum(mu_row[v] for v in range(len(mu_row)) if v not in ids)]
    p = [pi_row[v] for v in ids] + [sum(pi_row[v] for v in range(len(pi_row)) if v not in ids)]
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(q, p))
    return sum(a * math.log(a / b) for a, b in zip(q, p) if a > 0)


def topk_inputs(mu, pi, y, k):
    mu_l, pi_l = mu.tolist(), pi.tolist()
    ids = [topk_ids(mu_l[i], int(y[i]), k) for i in range(len(mu_l))]
    idx = torch.tensor(ids)
    return ids, mu.gather(-1, idx).log(), pi.gather(-1, idx).log()


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_with_k_equal_v_is_full_divergence(kind):
    vocab = 50
    mu, pi, y = full_distributions(14, 24, vocab)
    _, lq, lp = topk_inputs(mu, pi, y, vocab)
    mu_l, pi_l = mu.tolist(), pi.tolist()
    if kind == "tv":
        full = [0.5 * sum(abs(a - b) for a, b in zip(mu_l[i], pi_l[i])) for i in range(24)]
    else:
        full = [sum(a * math.log(a / b) for a, b in zip(mu_l[i], pi_l[i])) for i in range(24)]
    got = topk_divergence(lq.view(4, 6, vocab), lp.view(4, 6, vocab), kind).double().flatten()
    torch.testing.assert_close(got, torch.tensor(full, dtype=F64), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_reduced_divergence_matches_hand_lumping_and_is_below_full(kind, k):
    mu, pi, y = full_distributions(15, 24)
    ids, lq, lp = topk_inputs(mu, pi, y, k)
    mu_l, pi_l = mu.tolist(), pi.tolist()
    reduced = [reduced_divergence_ref(mu_l[i], pi_l[i], ids[i], kind) for i in range(24)]
    full = [reduced_divergence_ref(mu_l[i], pi_l[i], list(range(50)), kind) for i in range(24)]
    got = topk_divergence(lq.view(4, 6, k), lp.view(4, 6, k), kind).double().flatten()
    torch.testing.assert_close(got, torch.tensor(reduced, dtype=F64), rtol=1e-4, atol=2e-6)
    assert all(g <= f + 1e-6 for g, f in zip(got.tolist(), full))
    assert all(y[i].item() in ids[i] for i in range(24))


@pytest.mark.parametrize("kind, delta", [("tv", 0.12), ("kl", 0.04)])
@pytest.mark.parametrize("k", [50, 5])
def test_topk_loss_mask_uses_reduced_divergence(kind, delta, k):
    """The Top-K loss masks with the (K = V: full) divergence in the DPPO condition."""
    b, t = 4, 6
    mu, pi, y = full_distributions(16, b * t)
    ids, lq, lp = topk_inputs(mu, pi, y, k)
    mu_l, pi_l = mu.tolist(), pi.tolist()
    div = [reduced_divergence_ref(mu_l[i], pi_l[i], ids[i], kind) for i in range(b * t)]
    logp = pi.gather(-1, y[:, None]).log().view(b, t).requires_grad_(True)
    blogp = mu.gather(-1, y[:, None]).log().view(b, t)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(b, t, generator=g, dtype=F64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[3, 4:] = False
    out = get_loss(f"dppo-topk-{kind}")(logp, blogp, adv, mask, delta=delta, behavior_topk_logp=lq.view(b, t, k),
                                        topk_logp=lp.view(b, t, k))
    r = (logp.detach() - blogp).exp().flatten().tolist()
    a, m = adv.flatten().tolist(), mask.flatten().tolist()
    for i in range(b * t):
        if abs(div[i] - delta) < 1e-4:  # float32 inside topk_divergence: skip razor-edge ties
            continue
        away = (a[i] > 0 and r[i] > 1) or (a[i] < 0 and r[i] < 1)
        assert out.keep.flatten()[i].item() == (m[i] and not (away and div[i] > delta)), i
    assert (~out.keep & mask).any() and (out.keep & mask).any()


def test_binary_divergences_are_below_full_divergence():
    mu, pi, y = full_distributions(17, 24)
    mu_l, pi_l = mu.tolist(), pi.tolist()
    logp = pi.gather(-1, y[:, None]).log().view(4, 6)
    blogp = mu.gather(-1, y[:, None]).log().view(4, 6)
    x = prepare(logp, blogp, torch.ones(4, 6, dtype=F64), torch.ones(4, 6, dtype=torch.bool))
    tv, kl = binary_tv(x).flatten().tolist(), binary_kl(x).flatten().tolist()
    for i in range(24):
        assert tv[i] <= 0.5 * sum(abs(a - b) for a, b in zip(mu_l[i], pi_l[i])) + 1e-12
        assert kl[i] <= sum(a * math.log(a / b) for a, b in zip(mu_l[i], pi_l[i])) + 1e-12


def test_topk_bad_shapes_raise():
    logp, blogp, adv, mask = random_batch(0)
    bad = torch.zeros(2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match="behavior_topk_logp"):
        get_loss("dppo-topk-tv")(logp, blogp, adv, mask, behavior_topk_logp=bad, topk_logp=bad)
    with pytest.raises(ValueError, match="kind"):
        topk_divergence(bad, bad, "js")


# --------------------------------------------------------------------------- CPPO


@pytest.mark.parametrize("delta, w_min, delta_b", [(0.15, 0.8, 0.02), (0.1, 0.5, 0.05), (0.3, 0.0, 0.01)])
@pytest.mark.parametrize("seed", [18, 19, 20])
def test_cppo_matches_per_token_loop(seed, delta, w_min, delta_b):
    logp, blogp, adv, mask = random_batch(seed, spread=0.5)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    keep = cppo_keep_ref(pi, mu, r, a, m, delta, w_min, delta_b)
    out = get_loss("cppo")(logp, blogp, adv, mask, delta=delta, w_min=w_min, delta_b=delta_b)
    assert out.keep.tolist() == keep


def test_cppo_prefix_drift_tightens_later_tokens():
    """Hand case, one sequence, w_min = 1 (flat weights), delta = 0.15, delta_b = 0.02.

    D = [0.10, 0.10, 0.10, 0.10], A > 0, r > 1 everywhere. P90 of D = 0.10 -> b = 2 delta_b = 0.04.
    c_1 = 0.15; c_2 = 0.15 + 0.04 - 0.10 = 0.09 < 0.10 -> masked; c_3 = 0.15 + 0.08 - 0.20 = 0.03.
    The same D under plain DPPO-TV (0.10 <= 0.15) keeps everything.
    """
    mu = torch.full((1, 4), 0.5, dtype=F64)
    logp = (mu + 0.10).log().requires_grad_(True)
    adv, mask = torch.ones(1, 4, dtype=F64), torch.ones(1, 4, dtype=torch.bool)
    out = get_loss("cppo")(logp, mu.log(), adv, mask, delta=0.15, w_min=1.0, delta_b=0.02)
    assert out.keep.tolist() == [[True, False, False, False]]
    assert get_loss("dppo-tv")(logp, mu.log(), adv, mask, delta=0.15).keep.all()
    # moving back toward mu (A < 0 with r > 1) is never masked
    assert get_loss("cppo")(logp, mu.log(), -adv, mask, delta=0.15, w_min=1.0, delta_b=0.02).keep.all()


def test_cppo_single_token_sequence_is_finite():
    """T = 1: the position weight is that of a first token (1); c_1 = delta."""
    mu = torch.tensor([[0.5, 0.5]], dtype=F64)
    logp = torch.tensor([[0.6, 0.8]], dtype=F64).log().requires_grad_(True)
    adv, mask = torch.ones(1, 2, dtype=F64), torch.tensor([[True, False]])
    out = get_loss("cppo")(logp, mu.log(), adv, mask, delta=0.15)
    assert out.keep.tolist() == [[True, False]]  # D = 0.1 <= 0.15
    out = get_loss("cppo")(logp, mu.log(), adv, mask, delta=0.05)
    assert out.keep.tolist() == [[False, False]]
    assert torch.isfinite(grad_of(out, logp)).all()


# --------------------------------------------------------------------------- DRPO


@pytest.mark.parametrize("cap", [None, 1.3])
@pytest.mark.parametrize("agg", AGGS)
def test_drpo_gradient_weight_and_value(agg, cap):
    delta = 0.2
    logp, blogp, adv, mask = random_batch(21)
    pi, mu, r, a, m = lists(logp, blogp, adv, mask)
    out = get_loss("drpo")(logp, blogp, adv, mask, delta=delta, agg=agg, is_cap=cap)
    weights, keep, obj = [], [], []
    for b in range(len(m)):
        wr, kr, orow = [], [], []
        for t in range(len(m[b])):
            s = (a[b][t] * (r[b][t] - 1) > 0) - (a[b][t] * (r[b][t] - 1) < 0)
            damp = 1 - s * abs(pi[b][t] - mu[b][t]) / delta
            wr.append(capped(r[b][t], cap) * a[b][t] * damp)
            kr.append(bool(m[b][t]) and damp > 0)
            orow.append(r[b][t] * a[b][t] - abs(a[b][t]) / (2 * delta) * mu[b][t] * (r[b][t] - 1) ** 2)
        weights.append(wr)
        keep.append(kr)
        obj.append(orow)
    close(grad_of(out, logp), grad_ref(weights, m, agg))
    assert out.keep.tolist() == keep
    assert any(not k for row, mr in zip(keep, m) for k, v in zip(row, mr) if v)  # some gradient reversed
    if cap is None:
        assert out.loss.item() == pytest.approx(-aggregate_ref(obj, m, agg), rel=1e-12, abs=1e-14)


def test_drpo_gradient_equals_autograd_of_objective():
    """Without a cap the gradient weight is exactly d/dlogp of r A - |A|/(2 delta) mu (r - 1)^2."""
    delta = 0.15
    logp, blogp, adv, mask = random_batch(22)
    leaf = logp.detach().clone().requires_grad_(True)
    r = (leaf - blogp).exp()
    obj = r * adv - adv.abs() / (2 * delta) * blogp.exp() * (r - 1) ** 2
    (-(obj * mask).sum() / mask.sum()).backward()
    out = get_loss("drpo")(logp, blogp, adv, mask, delta=delta)
    close(grad_of(out, logp), leaf.grad)


# --------------------------------------------------------------------------- edge cases


ALL_CASES = [("ppo", {}), ("dppo-tv", {"delta": 0.1}), ("dppo-kl", {"delta": 0.02}), ("cppo", {}),
             ("drpo", {"delta": 0.1}), ("dppo-topk-tv", {"delta": 0.1}), ("dppo-topk-kl", {"delta": 0.02}),
             ("pg-is", {}), ("decoupled-ppo", {}), ("bandpo", {}), ("dcpo", {}), ("dppo-tv-hybrid", {"tau": 0.3}),
             ("ppo-lowmu-exempt", {"tau": 0.3})]


def call(name, params, logp, blogp, adv, mask, **kw):
    if name.startswith("dppo-topk"):
        # a 2-id top-K: the sampled token and one other id, both moved
        params = dict(params, behavior_topk_logp=torch.stack([blogp, blogp - 1.0], -1),
                      topk_logp=torch.stack([logp.detach(), logp.detach() - 1.5], -1))
    if name in NEEDS_PROX_LOGP:  # pi_prox = mu here; test_losses_offpolicy.py covers pi_prox != mu
        params = dict(params, prox_logp=blogp)
    return get_loss(name)(logp, blogp, adv, mask, **params, **kw)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name, params", ALL_CASES)
def test_zero_advantage_gives_zero_loss_and_grad(name, params, agg):
    logp, blogp, adv, mask = random_batch(23)
    out = call(name, params, logp, blogp, torch.zeros_like(adv), mask, agg=agg, is_cap=2.0)
    assert out.loss.item() == 0.0
    assert torch.equal(grad_of(out, logp), torch.zeros_like(logp))
    assert torch.equal(out.keep, mask)


@pytest.mark.parametrize("name, params", ALL_CASES)
def test_ratio_one_keeps_everything(name, params):
    logp, blogp, adv, mask = random_batch(24)
    same = blogp.clone().requires_grad_(True)
    out = call(name, params, same, blogp, adv, mask)
    assert torch.equal(out.keep, mask)
    m = mask.tolist()
    weights = [[v for v in row] for row in adv.tolist()]  # r = 1: the weight is A
    close(grad_of(out, same), grad_ref(weights, m, "token-mean"))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name, params", ALL_CASES)
def test_all_masked_is_finite_zero(name, params, agg):
    logp, blogp, adv, mask = random_batch(25)
    out = call(name, params, logp, blogp, adv, torch.zeros_like(mask), agg=agg, is_cap=3.0)
    assert out.loss.item() == 0.0
    g = grad_of(out, logp)
    assert torch.isfinite(g).all() and not g.any()
    assert not out.keep.any()
    # kept fraction by advantage sign is undefined without tokens of that sign: NaN (logged as null)
    undefined = {"kept_frac_pos", "kept_frac_neg"}
    assert all(math.isfinite(v) for k, v in out.metrics.items() if k not in undefined)
    assert all(math.isnan(out.metrics[k]) for k in undefined)


@pytest.mark.parametrize("name, params", ALL_CASES)
def test_padding_values_do_not_leak(name, params):
    """Garbage log-probs/advantages at masked positions change neither loss nor gradient."""
    logp, blogp, adv, mask = random_batch(26)
    out = call(name, params, logp, blogp, adv, mask, agg="seq-mean-token-mean")
    g = grad_of(out, logp)
    pad = ~mask
    logp2 = torch.where(pad, torch.full_like(logp, -30.0), logp.detach()).requires_grad_(True)
    blogp2 = torch.where(pad, torch.full_like(blogp, -1e-9), blogp)
    adv2 = torch.where(pad, torch.full_like(adv, 1e6), adv)
    out2 = call(name, params, logp2, blogp2, adv2, mask, agg="seq-mean-token-mean")
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-12, abs=1e-14)
    close(grad_of(out2, logp2), g)
    assert torch.equal(out.keep, out2.keep)


@pytest.mark.parametrize("name, params", ALL_CASES)
def test_per_sequence_advantages_broadcast(name, params):
    logp, blogp, _, mask = random_batch(27)
    adv_b = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.7], dtype=F64)
    a = call(name, params, logp, blogp, adv_b, mask, agg="seq-mean-token-sum")
    ga = grad_of(a, logp)
    b = call(name, params, logp, blogp, adv_b[:, None].expand_as(logp).clone(), mask, agg="seq-mean-token-sum")
    assert torch.equal(a.keep, b.keep)
    assert a.loss.item() == b.loss.item()
    assert torch.equal(ga, grad_of(b, logp))


def test_float32_inputs_stay_float32():
    logp, blogp, adv, mask = random_batch(28, dtype=torch.float32)
    out = get_loss("dppo-tv")(logp, blogp, adv, mask)
    assert out.loss.dtype == torch.float32
    assert grad_of(out, logp).dtype == torch.float32


# --------------------------------------------------------------------------- metrics


def metrics_case():
    """B = 2, T = 3. Row 0: A = +1, (mu, pi) = (.5,.7) (.2,.4) (.6,.3); row 1: A = -1,
    (.5,.45) (.1,.4) and a padded (.9,.01)."""
    mu = torch.tensor([[0.5, 0.2, 0.6], [0.5, 0.1, 0.9]], dtype=F64)
    pi = torch.tensor([[0.7, 0.4, 0.3], [0.45, 0.4, 0.01]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return pi.log().requires_grad_(True), mu.log(), adv, mask


def test_metrics_hand_case_scalar_delta():
    """delta = 0.1, C = 1.5. r = 1.4, 2, .5 | .9, 4. D = .2, .2, .3 | .05, .3.

    Masked: (0,0) and (0,1) (A > 0, r > 1, D > .1). kept 3/5; pos 1/3; neg 2/2.
    |pi-mu| mean 1.05/5 = .21, max .3; ratio mean 8.8/5 = 1.76, max 4; over cap {2, 4}: 2/5.
    """
    out = get_loss("dppo-tv")(*metrics_case(), delta=0.1, is_cap=1.5)
    mt = out.metrics
    expected = {"kept_frac": 0.6, "masked_frac": 0.4, "kept_frac_pos": 1 / 3, "kept_frac_neg": 1.0,
                "abs_diff_mean": 0.21, "abs_diff_max": 0.3, "ratio_mean": 1.76, "ratio_max": 4.0,
                "over_cap_frac": 0.4, "delta_mean": 0.1}
    for key, val in expected.items():
        assert mt[key] == pytest.approx(val, abs=1e-9), key
    assert out.keep.tolist() == [[False, False, True], [True, True, False]]


def test_metrics_hand_case_delta_tensor():
    """Per-token delta [[.1, .3, .1], [.1, .1, 9]]: (0,1) now kept (D = .2 <= .3).

    kept 4/5, pos 2/3; delta_mean over valid tokens = (.1+.3+.1+.1+.1)/5 = .14 (the 9 is padding).
    """
    delta = torch.tensor([[0.1, 0.3, 0.1], [0.1, 0.1, 9.0]], dtype=F64)
    out = get_loss("dppo-tv")(*metrics_case(), delta=delta, is_cap=None)
    mt = out.metrics
    assert mt["kept_frac"] == pytest.approx(0.8)
    assert mt["kept_frac_pos"] == pytest.approx(2 / 3)
    assert mt["kept_frac_neg"] == pytest.approx(1.0)
    assert mt["delta_mean"] == pytest.approx(0.14)
    assert mt["over_cap_frac"] == 0.0  # no cap
    # the default cap C = 3 (verl's clip_ratio_c): only r = 4 exceeds it
    assert get_loss("dppo-tv")(*metrics_case(), delta=delta).metrics["over_cap_frac"] == pytest.approx(0.2)


def test_ppo_metrics_hand_case():
    """PPO eps = 0.2 on the same tokens: A > 0 clipped where r > 1.2 -> (0,0), (0,1); A < 0 where r < .8: none."""
    out = get_loss("ppo")(*metrics_case(), eps_low=0.2, is_cap=3.0)
    assert out.metrics["kept_frac"] == pytest.approx(0.6)
    assert out.metrics["kept_frac_pos"] == pytest.approx(1 / 3)
    assert out.metrics["over_cap_frac"] == pytest.approx(0.2)  # only r = 4
