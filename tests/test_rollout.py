"""HFRollout records mu exactly: checked against a fresh full forward of the unchanged model."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from tokentrust.train.models import build_tiny_model, train_bpe_tokenizer
from tokentrust.train.rollout import HFRollout, RolloutBatch, make_rollout, processed_logprobs
from tokentrust.train.rollout.hf import sample_from_logprobs
from tokentrust.train.rollout.vllm import request_outputs_to_batch

NAMES = ["Zebulon", "Mira", "Tomas", "Ada", "Priya", "Kofi"]
ITEMS = ["quills", "apples", "marbles", "stamps", "shells"]


def _problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 30), rng.randint(1, 30)
        out.append((f"{name} has {a} {item}. They buy {b} more {item}. How many {item} does {name} have now?",
                     f"{a} + {b} = {a + b}. #### {a + b} {item}"))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe_tokenizer([q + "\n" + c for q, c in _problems(300, 0)], vocab_size=300)
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, max_positions=128, seed=0)
    with torch.no_grad():  # spread the logits so top-K orderings are far from float ties
        model.model.embed_tokens.weight.mul_(8.0)
    return model.eval(), tok


PROMPTS = ["Ada has 3 quills.\n", "Mira", "Kofi has 12 shells. They buy 7 more shells.\n", "How many"]


def _reference_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """HF-style warpers written independently: ascending sort, drop tokens whose ascending
    cumulative probability is <= 1 - top_p (keeping the most probable one), renormalise."""
    x = logits.double() / temperature
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1)  # ascending
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def _fresh_logits(model, batch: RolloutBatch) -> torch.Tensor:
    """Logits predicting each response token, from one uncached forward over [prompt + response]."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P = batch.prompt_ids.shape[1]
    return logits[:, P - 1:-1]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_behavior_logp_matches_fresh_forward(tiny, temperature, top_p):
    model, tok = tiny
    stops = list(range(40, 70))  # many stop ids: rows end at different steps (exercises compaction)
    ro = HFRollout(model, tok, max_new_tokens=14, temperature=temperature, top_p=top_p, record_topk=6,
                   record_entropy=True, stop_token_ids=stops)
    prompts = PROMPTS + PROMPTS[:2] + PROMPTS[:1]  # repeated prompts take the deduplicated prefill
    b = ro.generate(prompts, generator=torch.Generator().manual_seed(1))
    assert b.prompt_mask[:, 0].tolist() != b.prompt_mask[:, -1].tolist()  # genuinely left-padded
    lengths = b.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # some rows stopped early

    ref = _reference_logprobs(_fresh_logits(model, b), temperature, top_p)
    m = b.response_mask.bool()
    ref_tok = ref.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(ref_tok[m]).all()  # never sampled a filtered token
    torch.testing.assert_close(b.behavior_logp[m].double(), ref_tok[m], atol=1e-4, rtol=0)
    assert (b.behavior_logp[~m] == 0).all()

    # top-K: torch.topk of the fresh processed log-probs, the sampled token forced into the K-th slot
    vals, ids = torch.topk(ref, 6, dim=-1)
    absent = ~(ids == b.response_ids.unsqueeze(-1)).any(-1)
    ids[..., -1] = torch.where(absent, b.response_ids, ids[..., -1])
    vals[..., -1] = torch.where(absent, ref_tok, vals[..., -1])
    assert torch.equal(b.behavior_topk_ids[m], ids[m])
    torch.testing.assert_close(b.behavior_topk_logp[m].double(), vals[m], atol=1e-4, rtol=0)
    assert (b.behavior_topk_ids[m] == b.response_ids[m].unsqueeze(-1)).any(-1).all()

    p = ref.exp()
    ent = -(p * ref.masked_fill(p == 0, 0.0)).sum(-1)
    torch.testing.assert_close(b.behavior_entropy[m].double(), ent[m], atol=1e-4, rtol=0)
    if top_p < 1.0:
        assert (b.behavior_entropy[m] < math.log(len(tok)) - 0.05).all()


def test_masks_eos_and_compaction_keep_greedy_outputs(tiny):
    """Stopping some rows (and compacting the batch) must not change the rows that keep going."""
    model, tok = tiny
    free = HFRollout(model, tok, max_new_tokens=10, stop_token_ids=[len(tok) + 5]).generate(PROMPTS, greedy=True)
    assert free.response_mask.all() and free.response_ids.shape == (4, 10)
    stop = int(free.response_ids[0, 3])  # row 0 must stop at its first occurrence of this token
    b = HFRollout(model, tok, max_new_tokens=10, stop_token_ids=[stop]).generate(PROMPTS, greedy=True)
    for i in range(4):
        row = free.response_ids[i].tolist()
        end = row.index(stop) + 1 if stop in row else 10
        assert b.response_mask[i].tolist() == [1] * end + [0] * (b.response_ids.shape[1] - end)
        assert b.response_ids[i, :end].tolist() == row[:end]
        assert (b.response_ids[i, end:] == tok.pad_token_id).all()
        torch.testing.assert_close(b.behavior_logp[i, :end], free.behavior_logp[i, :end], atol=1e-5, rtol=0)
    assert b.response_mask[0].sum() <= 4
    assert b.num_generated_tokens == int(b.response_mask.sum())
    assert b.response_ids.shape[1] == int(b.response_mask.sum(-1).max())  # no all-padding columns


def test_greedy_is_deterministic_and_matches_hf_generate(tiny):
    model, tok = tiny
    ro = HFRollout(model, tok, max_new_tokens=8, stop_token_ids=[len(tok) + 5])
    a, b = ro.generate(PROMPTS, greedy=True), ro.generate(PROMPTS, greedy=True)
    assert torch.equal(a.response_ids, b.response_ids)
    ids, mask = ro.tokenize(PROMPTS)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                             eos_token_id=len(tok) + 5, pad_token_id=tok.pad_token_id)
    assert torch.equal(a.response_ids, out[:, ids.shape[1]:])
    # greedy records the untempered model's log-prob of the argmax token
    ref = torch.log_softmax(_fresh_logits(model, a).double(), -1)
    assert torch.equal(ref.argmax(-1), a.response_ids)
    torch.testing.assert_close(a.behavior_logp.double(), ref.max(-1).values, atol=1e-4, rtol=0)


def test_prompt_dedup_changes_nothing(tiny):
    model, tok = tiny
    prompts = [p for p in PROMPTS for _ in range(3)]
    kw = dict(max_new_tokens=8, temperature=0.9, record_topk=3, stop_token_ids=list(range(40, 60)))
    a = HFRollout(model, tok, **kw).generate(prompts, generator=torch.Generator().manual_seed(3))
    b = HFRollout(model, tok, dedup_prompts=False, **kw).generate(prompts, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.behavior_logp, b.behavior_logp, atol=1e-5, rtol=0)
    assert torch.equal(a.behavior_topk_ids, b.behavior_topk_ids)


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    ro = HFRollout(model, tok, max_new_tokens=12, temperature=1.0, stop_token_ids=list(range(40, 50)))
    a = ro.generate(PROMPTS, generator=torch.Generator().manual_seed(7))
    b = ro.generate(PROMPTS, generator=torch.Generator().manual_seed(7))
    c = ro.generate(PROMPTS, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behavior_logp, b.behavior_logp)
    assert a.response_texts == b.response_texts
    assert a.response_ids.tolist() != c.response_ids.tolist()


def test_response_texts_decode_masked_tokens(tiny):
    model, tok = tiny
    b = HFRollout(model, tok, max_new_tokens=6).generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    for i, text in enumerate(b.response_texts):
        n = int(b.response_mask[i].sum())
        assert text == tok.decode(b.response_ids[i, :n].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("vocab,scale", [(20000, 6.0), (20000, 2.5), (3000, 0.5)])
def test_top_p_filter_matches_full_sort_reference(vocab, scale):
    """The partial-sort nucleus (top-256, then top-4096, then a full sort) equals the HF rule."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g) * scale * torch.linspace(0.5, 1.5, 6).unsqueeze(1)
    got = processed_logprobs(logits, 0.9, 0, 0.85)
    ref = _reference_logprobs(logits, 0.9, 0.85)
    # float32 vs float64 may only disagree on tokens whose preceding mass is within 1e-5 of top_p
    sorted_p, order = torch.sort(torch.softmax(logits.double() / 0.9, -1), -1, descending=True)
    mass_before = torch.empty_like(sorted_p).scatter(-1, order, sorted_p.cumsum(-1) - sorted_p)
    differ = torch.isfinite(got) != torch.isfinite(ref)
    assert ((mass_before[differ] - 0.85).abs() < 1e-5).all()
    same = ~differ.any(-1, keepdim=True) & torch.isfinite(ref)  # rows with identical support
    torch.testing.assert_close(got[same].double(), ref[same], atol=1e-5, rtol=0)
    near = torch.isfinite(ref) & torch.isfinite(got)  # otherwise only the renormalisation moves
    torch.testing.assert_close(got[near].double(), ref[near], atol=1e-3, rtol=0)
    kept = torch.isfinite(got).sum(-1)
    assert kept.min() >= 1 and kept.max() < vocab


def test_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    got = processed_logprobs(logits, 1.0, 3, 1.0)
    expect = torch.tensor([4.0, 3.0, 2.0]).log_softmax(-1)
    torch.testing.assert_close(got[0, :3], expect)
    assert torch.isinf(got[0, 3:]).all()
    # top-p 0.7 on the top-3 renormalised (0.665, 0.245, 0.09): keeps the first two
    got = processed_logprobs(logits, 1.0, 3, 0.7)
    torch.testing.assert_close(got[0, :2], torch.tensor([4.0, 3.0]).log_softmax(-1))
    assert torch.isinf(got[0, 2:]).all()


@pytest.mark.parametrize("block", [1, 4, 256])  # 4: two blocks, the last one padded
def test_sampler_draws_from_the_given_distribution(block):
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(40000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logprobs(probs.log(), g, block=block)
    counts = torch.bincount(draws, minlength=6).double() / len(draws)
    assert counts[[0, 2, 5]].sum() == 0  # zero-probability (filtered) tokens are never drawn
    torch.testing.assert_close(counts, probs[0].double(), atol=0.01, rtol=0)


def test_sequences_and_select_and_to(tiny):
    model, tok = tiny
    b = HFRollout(model, tok, max_new_tokens=5, record_topk=3).generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    ids, mask, pos = b.sequences()
    assert ids.shape == mask.shape == pos.shape == (4, b.prompt_ids.shape[1] + b.response_ids.shape[1])
    first_real = mask.argmax(-1)
    assert (pos[torch.arange(4), first_real] == 0).all()
    sub = b.select([2, 0])
    assert torch.equal(sub.response_ids, b.response_ids[[2, 0]]) and sub.response_texts == [b.response_texts[2],
                                                                                              b.response_texts[0]]
    assert sub.num_generated_tokens == int(b.response_mask[[2, 0]].sum())
    moved = b.to("cpu")
    assert moved.behavior_topk_ids is not None and torch.equal(moved.behavior_topk_ids, b.behavior_topk_ids)


def test_make_rollout_factory(tiny):
    model, tok = tiny
    assert isinstance(make_rollout("hf", model, tok, max_new_tokens=3), HFRollout)
    with pytest.raises(ValueError):
        make_rollout("nope", model, tok, max_new_tokens=3)
    with pytest.raises(ValueError):
        make_rollout("vllm", model, tok, max_new_tokens=3)  # an HF policy needs workdir=


# ----------------------------------------------------------------------------- vLLM output conversion

def _lp(v: float):
    return SimpleNamespace(logprob=v, rank=None, decoded_token=None)


def _fake_request_output(token_ids, step_dicts, text):
    comp = SimpleNamespace(token_ids=token_ids, logprobs=[{k: _lp(v) for k, v in d.items()} for d in step_dicts],
                           text=text, finish_reason="stop")
    return SimpleNamespace(outputs=[comp])


def test_vllm_outputs_to_batch():
    ln = math.log
    outs = [
        # step 0: sampled 7 is in the top-2; step 1: sampled 9 (outside the top-2) comes as an extra entry
        _fake_request_output([7, 9, 2], [{7: ln(0.6), 5: ln(0.3)}, {4: ln(0.5), 3: ln(0.3), 9: ln(0.1)},
                                         {2: ln(0.9), 8: ln(0.05)}], "a b"),
        _fake_request_output([5], [{7: ln(0.5), 5: ln(0.5)}], "c"),
    ]
    b = request_outputs_to_batch(outs, [[11, 12, 13], [14]], pad_id=0, eos_ids=[2], record_topk=2,
                                 record_entropy=True)
    assert b.prompt_ids.tolist() == [[11, 12, 13], [0, 0, 14]] and b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.response_ids.tolist() == [[7, 9, 2], [5, 0, 0]]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(b.behavior_logp, torch.tensor([[ln(0.6), ln(0.1), ln(0.9)], [ln(0.5), 0, 0]]))
    assert b.behavior_topk_ids[0].tolist() == [[7, 5], [4, 9], [2, 8]]  # 9 replaced the 2nd-best (3)
    torch.testing.assert_close(b.behavior_topk_logp[0, 1], torch.tensor([ln(0.5), ln(0.1)]))
    # entropy of the returned entries plus one lumped "rest" outcome
    h = lambda ps: -sum(p * ln(p) for p in ps + [1 - sum(ps)] if p > 0)  # noqa: E731
    torch.testing.assert_close(b.behavior_entropy[0], torch.tensor([h([0.6, 0.3]), h([0.5, 0.3, 0.1]),
                                                                   h([0.9, 0.05])]))
    assert b.response_texts == ["a b", "c"] and b.num_generated_tokens == 4


def test_vllm_outputs_require_the_sampled_token():
    outs = [_fake_request_output([7], [{5: math.log(0.5)}], "x")]
    with pytest.raises(ValueError):
        request_outputs_to_batch(outs, [[1]], pad_id=0, eos_ids=[2])
