"""Per-token thresholds (AV-DPPO) against hand computations from methods.md.

delta_t = delta * s_t with s = clamp(exp(beta (rho - rho_ref)), s_min, s_max) (frequency),
clamp((H / H_ref)^beta, ...) (entropy), their product clamped once (combined); optional
rescaling so the mean over valid tokens is delta.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokentrust.losses import get_loss
from tokentrust.thresholds import BatchFrequencyState, ThresholdSpec, compute_thresholds

torch.set_num_threads(1)
DELTA = 0.15
V = 8
# A corpus distribution over V ids: id 0 most common, id 7 rarest (strictly decreasing f).
CORPUS_F = torch.tensor([0.40, 0.20, 0.15, 0.10, 0.07, 0.04, 0.03, 0.01], dtype=torch.float64)
RARITY = -CORPUS_F.log()
RHO_REF = float((CORPUS_F * RARITY).sum())
TOKENS = torch.tensor([[0, 1, 2, 3, 7, 0], [5, 6, 4, 0, 2, 7], [1, 1, 3, 6, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
ENTROPY = torch.tensor([[0.5, 1.0, 2.0, 0.1, 3.0, 50.0], [1.5, 0.7, 0.2, 2.5, 1.0, 0.05],
                        [0.9, 4.0, 0.3, 80.0, 90.0, 0.0]])


def build(spec: ThresholdSpec, delta: float = DELTA, tokens=TOKENS, mask=MASK, entropy=ENTROPY, state=None):
    return compute_thresholds(spec, delta, tokens, mask, rarity=RARITY, rho_ref=RHO_REF, entropy=entropy,
                              vocab_size=V, state=state)


def valid_values(x: torch.Tensor, mask=MASK) -> list[float]:
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


def clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


KINDS = ["frequency", "batch-frequency", "entropy", "combined"]


# --------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "rarity"}, "kind"),
    ({"s_min": 2.0, "s_max": 1.0}, "s_min"),
    ({"s_min": 0.0}, "s_min"),
    ({"ema": 1.0}, "ema"),
    ({"ema": -0.1}, "ema"),
    ({"smoothing": 0.0}, "smoothing"),
    ({"beta": float("nan")}, "beta"),
])
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ThresholdSpec(**kwargs)


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="frequency"):
        compute_thresholds(ThresholdSpec(kind="frequency"), DELTA, TOKENS, MASK)
    with pytest.raises(ValueError, match="entropy"):
        compute_thresholds(ThresholdSpec(kind="entropy"), DELTA, TOKENS, MASK)
    with pytest.raises(ValueError, match="vocab_size"):
        compute_thresholds(ThresholdSpec(kind="batch-frequency"), DELTA, TOKENS, MASK)
    with pytest.raises(ValueError, match="delta"):
        build(ThresholdSpec(kind="constant"), delta=0.0)


# --------------------------------------------------------------------------- uniform cases


def test_constant_is_delta_everywhere():
    out = build(ThresholdSpec(kind="constant"))
    assert out.shape == TOKENS.shape
    assert torch.all(out == DELTA)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_beta_zero_is_uniform(kind, normalize):
    spec = ThresholdSpec(kind=kind, beta=0.0, entropy_beta=0.0 if kind == "combined" else None, normalize=normalize)
    out = build(spec)
    assert valid_values(out) == pytest.approx([DELTA] * int(MASK.sum()), rel=1e-6)


@pytest.mark.parametrize("beta", [0.5, -0.7, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_normalized_mean_over_valid_tokens_is_delta(kind, beta):
    out = build(ThresholdSpec(kind=kind, beta=beta, normalize=True))
    vals = valid_values(out)
    assert sum(vals) / len(vals) == pytest.approx(DELTA, rel=1e-6)
    assert max(vals) > min(vals) * 1.05  # it is actually adaptive


# --------------------------------------------------------------------------- frequency


def test_frequency_hand_values_and_clamps():
    """beta = 1: s(v) = f_ref_geo / f(v) where exp(-rho_ref) is the geometric mean; clamp [0.5, 2]."""
    s_min, s_max = 0.5, 2.0
    out = build(ThresholdSpec(kind="frequency", beta=1.0, s_min=s_min, s_max=s_max))
    hits = set()
    for v, tok in zip(out.flatten().tolist(), TOKENS.flatten().tolist()):
        raw = math.exp(float(RARITY[tok]) - RHO_REF)
        want = clamp(raw, s_min, s_max)
        assert v == pytest.approx(DELTA * want, rel=1e-5), tok
        hits.add("lo" if raw < s_min else "hi" if raw > s_max else "in")
    assert hits == {"lo", "hi", "in"}  # both bounds bit and some token was within them


@pytest.mark.parametrize("kind", ["frequency", "entropy", "combined", "batch-frequency"])
def test_clamps_respected_without_normalisation(kind):
    spec = ThresholdSpec(kind=kind, beta=3.0, s_min=0.4, s_max=2.5)
    scales = [v / DELTA for v in valid_values(build(spec))]
    assert min(scales) >= 0.4 - 1e-6 and max(scales) <= 2.5 + 1e-6
    assert min(scales) == pytest.approx(0.4, rel=1e-5) and max(scales) == pytest.approx(2.5, rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("beta", [0.6, -0.6])
def test_frequency_monotone_in_rarity(beta, normalize):
    out = build(ThresholdSpec(kind="frequency", beta=beta, s_min=0.1, s_max=10.0, normalize=normalize))
    pairs = [(float(RARITY[t]), d) for t, d, m in zip(TOKENS.flatten().tolist(), out.flatten().tolist(),
                                                       MASK.flatten().tolist()) if m]
    for rho_i, d_i in pairs:
        for rho_j, d_j in pairs:
            if rho_i > rho_j:  # token i is rarer
                assert (d_i >= d_j) if beta > 0 else (d_i <= d_j)
    rarest = max(pairs)[1]
    commonest = min(pairs)[1]
    assert (rarest > commonest) if beta > 0 else (rarest < commonest)


def test_frequency_normalised_is_rescaled_clamped_scale():
    """normalize=True: delta_t = delta * s_t / mean_valid(s), s clamped first (docstring contract)."""
    spec = ThresholdSpec(kind="frequency", beta=1.0, s_min=0.5, s_max=2.0, normalize=True)
    out = build(spec)
    s = [clamp(math.exp(float(RARITY[t]) - RHO_REF), 0.5, 2.0) for t in TOKENS.flatten().tolist()]
    s_valid = [v for v, m in zip(s, MASK.flatten().tolist()) if m]
    mean = sum(s_valid) / len(s_valid)
    for v, sv in zip(out.flatten().tolist(), s):
        assert v == pytest.approx(DELTA * sv / mean, rel=1e-5)


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("beta", [0.5, 1.0, -1.0])
def test_entropy_scale_is_power_of_relative_entropy(beta):
    """s_t = (H_t / H_ref)^beta, H_ref = mean entropy over VALID tokens (padding's 50/80/90 excluded)."""
    s_min, s_max = 0.2, 5.0
    out = build(ThresholdSpec(kind="entropy", beta=beta, s_min=s_min, s_max=s_max))
    h_valid = valid_values(ENTROPY)
    h_ref = sum(h_valid) / len(h_valid)
    assert h_ref == pytest.approx((0.5 + 1 + 2 + 0.1 + 3 + 1.5 + 0.7 + 0.2 + 2.5 + 1 + 0.05 + 0.9 + 4 + 0.3) / 14)
    for v, h, m in zip(out.flatten().tolist(), ENTROPY.flatten().tolist(), MASK.flatten().tolist()):
        if m:
            assert v == pytest.approx(DELTA * clamp((h / h_ref) ** beta, s_min, s_max), rel=1e-5)


@pytest.mark.parametrize("beta", [0.8, -0.8])
def test_entropy_monotone(beta):
    out = build(ThresholdSpec(kind="entropy", beta=beta, s_min=0.01, s_max=100.0))
    pairs = sorted(zip(valid_values(ENTROPY), valid_values(out)))
    ds = [d for _, d in pairs]
    assert ds == (sorted(ds) if beta > 0 else sorted(ds, reverse=True))


# --------------------------------------------------------------------------- combined


def test_combined_is_product_clamped_once():
    """rho_ref = 0, beta = 1 makes the frequency scale exp(rho(v)); entropy H_ref = 1 over valid tokens.

    token 0: freq 3, entropy 2.0 -> 6   -> clamped to s_max = 4 (each factor within [0.25, 4])
    token 1: freq .5, entropy 0.4 -> .2 -> clamped to s_min = .25 (each factor within bounds)
    token 2: freq 5, entropy 0.6  -> 3  (the frequency factor alone would be clamped to 4 -> 2.4)
    token 3: padding with entropy 97 (must not enter H_ref)
    """
    rarity = torch.tensor([math.log(3.0), math.log(0.5), math.log(5.0), 0.0])
    tokens = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[True, True, True, False]])
    entropy = torch.tensor([[2.0, 0.4, 0.6, 97.0]])
    spec = ThresholdSpec(kind="combined", beta=1.0, s_min=0.25, s_max=4.0)
    out = compute_thresholds(spec, 0.1, tokens, mask, rarity=rarity, rho_ref=0.0, entropy=entropy)
    assert out[0, :3].tolist() == pytest.approx([0.4, 0.025, 0.3], rel=1e-5)
    # a separate entropy exponent: entropy_beta = 2 squares the entropy factor only
    spec2 = ThresholdSpec(kind="combined", beta=1.0, entropy_beta=2.0, s_min=0.01, s_max=100.0)
    out2 = compute_thresholds(spec2, 0.1, tokens, mask, rarity=rarity, rho_ref=0.0, entropy=entropy)
    assert out2[0, :3].tolist() == pytest.approx([0.1 * 3 * 4, 0.1 * 0.5 * 0.16, 0.1 * 5 * 0.36], rel=1e-5)


# --------------------------------------------------------------------------- batch frequency


def batch_probs_ref(tokens, mask, alpha: float) -> list[float]:
    counts = [0] * V
    for t, m in zip(tokens.flatten().tolist(), mask.flatten().tolist()):
        if m:
            counts[t] += 1
    n = sum(counts)
    return [(c + alpha) / (n + alpha * V) for c in counts]


def batch_thresholds_ref(probs, tokens, beta, s_min, s_max, mask=MASK) -> list[float]:
    """rho_ref is the mean rarity of the batch's valid tokens (methods.md), NOT the entropy of the
    smoothed distribution over all V ids (which counts the mass smoothing gives to unseen ids)."""
    rho = [-math.log(p) for p in probs]
    valid = valid_values(tokens, mask)
    rho_ref = sum(rho[int(t)] for t in valid) / len(valid)
    return [DELTA * clamp(math.exp(beta * (rho[t] - rho_ref)), s_min, s_max) for t in tokens.flatten().tolist()]


def test_batch_frequency_hand_counts():
    """Valid tokens of TOKENS: counts [2, 3, 2, 2, 1, 1, 1, 2] over 14 tokens (padding excluded);
    add-0.5 smoothing: f(v) = (c_v + .5) / (14 + 4)."""
    probs = batch_probs_ref(TOKENS, MASK, 0.5)
    assert probs == pytest.approx([2.5 / 18, 3.5 / 18, 2.5 / 18, 2.5 / 18, 1.5 / 18, 1.5 / 18, 1.5 / 18, 2.5 / 18])
    spec = ThresholdSpec(kind="batch-frequency", beta=0.8, smoothing=0.5, s_min=0.5, s_max=2.0)
    out = build(spec)
    assert out.flatten().tolist() == pytest.approx(batch_thresholds_ref(probs, TOKENS, 0.8, 0.5, 2.0), rel=1e-5)
    # rarer in this batch -> looser: id 4 (count 1) vs id 1 (count 3)
    assert out[1, 2] > out[0, 1]


def test_batch_frequency_ema_over_two_batches():
    ema, alpha, beta = 0.6, 1.0, 0.9
    spec = ThresholdSpec(kind="batch-frequency", beta=beta, smoothing=alpha, ema=ema, s_min=0.1, s_max=10.0)
    state = BatchFrequencyState()
    tokens2 = torch.tensor([[7, 7, 7, 6, 6, 0], [5, 5, 7, 7, 7, 1]])
    mask2 = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)

    p1 = batch_probs_ref(TOKENS, MASK, alpha)
    out1 = build(spec, state=state)
    assert out1.flatten().tolist() == pytest.approx(batch_thresholds_ref(p1, TOKENS, beta, 0.1, 10.0), rel=1e-5)
    assert state.probs.tolist() == pytest.approx(p1, rel=1e-6)

    p2 = batch_probs_ref(tokens2, mask2, alpha)
    blended = [ema * a + (1 - ema) * b for a, b in zip(p1, p2)]
    out2 = compute_thresholds(spec, DELTA, tokens2, mask2, vocab_size=V, state=state)
    assert out2.flatten().tolist() == pytest.approx(batch_thresholds_ref(blended, tokens2, beta, 0.1, 10.0, mask2),
                                                     rel=1e-5)
    assert state.probs.tolist() == pytest.approx(blended, rel=1e-6)
    # without the state the second batch alone gives a different answer (the EMA did something)
    alone = compute_thresholds(spec, DELTA, tokens2, mask2, vocab_size=V)
    assert not torch.allclose(alone, out2)
    # state round-trips
    fresh = BatchFrequencyState()
    fresh.load_state_dict(state.state_dict())
    assert torch.equal(fresh.probs, state.probs)


def test_batch_frequency_reference_is_the_typical_token_with_a_large_vocabulary():
    """Regression: with V = 50k ids and a 200-token batch, the old rho_ref (entropy of the smoothed
    distribution over all V) sat near log V, far above every seen token's rarity, so about half of
    all tokens were pinned at s_min. The batch's mean rarity keeps s around 1."""
    vocab, gen = 50_000, torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (4, 50), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    spec = ThresholdSpec(kind="batch-frequency", beta=0.5, s_min=0.25, s_max=4.0)
    out = compute_thresholds(spec, DELTA, tokens, mask, vocab_size=vocab)
    pinned = float((out <= DELTA * 0.25 + 1e-9).float().mean())
    assert pinned < 0.05
    # mean log-scale over the batch is exactly 0 before clamping: geometric mean of s is 1
    assert float((out / DELTA).log().mean()) == pytest.approx(0.0, abs=1e-4)


SPECIAL = torch.zeros(V, dtype=torch.bool)
SPECIAL[7] = True  # the rarest id plays EOS: never counted in a corpus tokenized without special tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_special_tokens_get_the_base_delta(kind, normalize):
    """Regression (EOS confound): special tokens get s = 1 under every schedule, and the schedule
    of the other tokens is what it would be without the special tokens in the batch."""
    spec = ThresholdSpec(kind=kind, beta=1.0, normalize=normalize, s_min=0.25, s_max=4.0)
    out = compute_thresholds(spec, DELTA, TOKENS, MASK, rarity=RARITY, rho_ref=RHO_REF, entropy=ENTROPY,
                             vocab_size=V, special=SPECIAL)
    is_special = TOKENS == 7
    assert torch.all(out[is_special] == DELTA)
    without = compute_thresholds(spec, DELTA, TOKENS, MASK & ~is_special, rarity=RARITY, rho_ref=RHO_REF,
                                 entropy=ENTROPY, vocab_size=V)
    keep = MASK & ~is_special
    assert torch.allclose(out[keep], without[keep])
    if normalize:
        assert float(out[keep].mean()) == pytest.approx(DELTA, rel=1e-5)
    # and without the mask id 7, the rarest token, gets a very different threshold than delta
    plain = compute_thresholds(spec, DELTA, TOKENS, MASK, rarity=RARITY, rho_ref=RHO_REF, entropy=ENTROPY,
                               vocab_size=V)
    if kind in ("frequency", "batch-frequency"):
        assert not torch.allclose(plain[is_special & MASK], torch.tensor(DELTA))


# --------------------------------------------------------------------------- into the loss


def test_thresholds_feed_dppo_mask_per_token():
    """A frequency schedule changes which tokens DPPO-TV masks exactly as the per-token rule says."""
    spec = ThresholdSpec(kind="frequency", beta=1.0, s_min=0.25, s_max=4.0)
    delta = build(spec, delta=0.05)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(TOKENS.shape, generator=g, dtype=torch.float64) * 0.6 + 0.2
    pi = (mu + 0.12 * (torch.rand(TOKENS.shape, generator=g, dtype=torch.float64) * 2 - 1)).clamp(0.01, 0.99)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    out = get_loss("dppo-tv")(pi.log(), mu.log(), adv, MASK, delta=delta.double())
    for b in range(3):
        for t in range(6):
            p, q, d = float(pi[b, t]), float(mu[b, t]), float(delta[b, t])
            a = float(adv[b])
            away = (a > 0 and p > q) or (a < 0 and p < q)
            assert out.keep[b, t].item() == (bool(MASK[b, t]) and not (away and abs(p - q) > d)), (b, t)
