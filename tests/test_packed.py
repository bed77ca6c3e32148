"""The packed, prefix-shared learner forward equals the padded Hugging Face forward, values and
gradients, on Llama (with grouped-query attention) and Qwen2 (with q/k/v biases)."""

from __future__ import annotations

import pytest
import torch

from tokentrust.train.learner import response_logprobs
from tokentrust.train.packed import build_layout, packed_response_logprobs, unsupported_reason
from tokentrust.train.rollout.base import RolloutBatch

V = 61


def _llama(kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=None, eos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return _sharpen(LlamaForCausalLM(cfg))


def _sharpen(model):
    """Larger random weights than HF's init (std 0.02), so outputs depend on the context."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=None, eos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = _sharpen(Qwen2ForCausalLM(cfg))
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero; make them matter
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def _batch(seed: int = 0, groups: int = 3, group_size: int = 3, P: int = 7, T: int = 9) -> RolloutBatch:
    """Left-padded prompts of different lengths, each repeated group_size times; right-padded
    responses of lengths 1 .. T (one reaching the full width)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask, resp_ids, resp_mask = [], [], [], []
    for i in range(groups):
        n = [P, 3, 1, 5][i % 4]
        ids = torch.zeros(P, dtype=torch.long)
        ids[P - n:] = torch.randint(2, V, (n,), generator=g)
        mask = (torch.arange(P) >= P - n).long()
        for j in range(group_size):
            r = [T, 1, 4, 6, 2][(i * group_size + j) % 5]
            rid = torch.zeros(T, dtype=torch.long)
            rid[:r] = torch.randint(2, V, (r,), generator=g)
            prompt_ids.append(ids)
            prompt_mask.append(mask)
            resp_ids.append(rid)
            resp_mask.append((torch.arange(T) < r).long())
    st = torch.stack
    return RolloutBatch(prompt_ids=st(prompt_ids), prompt_mask=st(prompt_mask), response_ids=st(resp_ids),
                        response_mask=st(resp_mask), behavior_logp=torch.zeros(len(resp_ids), T),
                        response_texts=[""] * len(resp_ids), num_generated_tokens=0)


def _grads(model, batch: RolloutBatch, packed: bool, temperature: float):
    model.zero_grad(set_to_none=True)
    logp, _ = response_logprobs(model, batch, temperature, packed=packed)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that touches every token differently
    (logp * weights * batch.response_mask).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_packed_forward_matches_padded_forward_values_and_gradients(make, one_thread):
    model = make().train()
    batch = _batch()
    assert unsupported_reason(model) is None
    ref_logp, ref_grads = _grads(model, batch, packed=False, temperature=0.7)
    logp, grads = _grads(model, batch, packed=True, temperature=0.7)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    assert (logp[~mask] == 0).all()
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():  # float32 rounding, relative to the gradient's scale (measured <= 5e-6)
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_packed_topk_logprobs_match_padded(one_thread):
    model = _llama().eval()
    batch = _batch(seed=3)
    topk_ids = torch.randint(0, V, batch.response_ids.shape + (4,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ref = response_logprobs(model, batch, 1.0, topk_ids, packed=False)
        _, got = response_logprobs(model, batch, 1.0, topk_ids, packed=True)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_layout_shares_prompts_and_drops_padding():
    # two rows with the same prompt [5, 6] (left-padded to 3), responses [7, 8, 9] and [4]
    batch = RolloutBatch(prompt_ids=torch.tensor([[0, 5, 6], [0, 5, 6]]), prompt_mask=torch.tensor([[0, 1, 1]] * 2),
                         response_ids=torch.tensor([[7, 8, 9], [4, 0, 0]]),
                         response_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]), behavior_logp=torch.zeros(2, 3),
                         response_texts=["", ""], num_generated_tokens=4)
    lay = build_layout(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    # the prompt once, then the response inputs 7, 8 (9 and 4 are last tokens: they predict nothing)
    assert lay.tokens.tolist() == [5, 6, 7, 8]
    assert lay.positions.tolist() == [0, 1, 2, 3]
    assert lay.prompt_of_row.tolist() == [0, 0]
    assert lay.last_prompt.tolist() == [1]  # packed index of the prompt's last token, 6
    # rows [prompt's last token | response inputs 7, 8]: 7 is predicted by row 0, 8 by row 1 (7), 9 by
    # row 2 (8); row 2's 4 by the prompt's last token
    assert lay.predict_from.tolist() == [0, 1, 2, 0]


def test_unsupported_models_are_named():
    model = _llama()
    model.gradient_checkpointing_enable()
    assert "checkpointing" in unsupported_reason(model)
    from tokentrust.train.models import apply_lora

    assert "peft" in unsupported_reason(apply_lora(_llama(), r=2, target_modules=["q_proj"]))


def test_packed_rejects_right_padded_prompts():
    with pytest.raises(ValueError, match="left-padded"):
        build_layout(torch.tensor([[3, 0]]), torch.tensor([[1, 0]]), torch.tensor([[4]]), torch.tensor([[1]]))


class _Tok:
    """The least of a tokenizer HFRollout needs: ids are given, texts are not looked at."""

    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, rows, **_):
        return [" ".join(map(str, r)) for r in rows]


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
@pytest.mark.parametrize("group_size", [4, 1], ids=["shared-prompts", "distinct-prompts"])
def test_packed_decoder_samples_what_the_hf_cache_samples(make, greedy, group_size, one_thread):
    """Same tokens, and mu / top-K / entropy to float rounding, with duplicated prompts of different
    lengths and rows finishing early (a third of the vocabulary stops a row, so compaction runs).
    Shared prompts run ``SharedPromptDecoder`` (prompt keys once per prompt), distinct ones ``RowDecoder``."""
    from tokentrust.train.rollout import packed_decode
    from tokentrust.train.rollout.hf import HFRollout

    model = make().eval()
    batch = _batch(seed=5, groups=4 if group_size > 1 else 12, group_size=group_size)
    decoder = packed_decode.PackedDecoder(model, batch.prompt_ids, batch.prompt_mask, 2)
    assert isinstance(decoder, packed_decode.SharedPromptDecoder if group_size > 1 else packed_decode.RowDecoder)
    out = {}
    for packed in (False, True):
        r = HFRollout(model, _Tok(), max_new_tokens=12, temperature=0.8, top_p=0.95, record_topk=3,
                      record_entropy=True, packed=packed, stop_token_ids=list(range(1, V, 3)))
        out[packed] = r.generate_ids(batch.prompt_ids, batch.prompt_mask, greedy=greedy,
                                     generator=torch.Generator().manual_seed(7))
    a, b = out[False], out[True]
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    lengths = a.response_mask.sum(-1)
    assert (lengths < 12).any() and len(set(lengths.tolist())) > 2  # rows stopped at different steps
    for f in ("behavior_logp", "behavior_entropy", "behavior_topk_logp"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-5, atol=1e-5, msg=f)
    assert torch.equal(a.behavior_topk_ids, b.behavior_topk_ids)


def test_rms_norm_backward_matches_autograd_through_the_hf_formula():
    from tokentrust.train.packed import _rms_norm

    torch.manual_seed(0)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.rand(16, dtype=torch.float64) + 0.5)
    norm.variance_epsilon = 1e-6
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    # float64 takes the composite path: the reference; float32 copies take the hand-written backward
    assert torch.autograd.gradcheck(lambda a, w: _rms_norm32(a, w), (x, norm.weight))
    dy = torch.randn(5, 16, dtype=torch.float64)
    ref = torch.autograd.grad((_rms_norm(x, norm) * dy).sum(), (x, norm.weight))
    x32 = x.detach().float().requires_grad_()
    norm32 = torch.nn.Module()
    norm32.weight = torch.nn.Parameter(norm.weight.detach().float())
    norm32.variance_epsilon = 1e-6
    got = torch.autograd.grad((_rms_norm(x32, norm32) * dy.float()).sum(), (x32, norm32.weight))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def _rms_norm32(x, w):
    from tokentrust.train.packed import _RMSNorm32

    return _RMSNorm32.apply(x, w, 1e-6)


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_greedy_tokens_do_not_depend_on_the_batch_size(make, one_thread):
    """Evaluation decodes greedily in larger batches than it samples (``evaluate``'s
    ``greedy_batch_size``): the same tokens, and log-probs within 1e-5, whether rows are decoded
    one prompt group at a time or all at once (compaction drops different rows in each)."""
    from tokentrust.train.rollout.hf import HFRollout

    model = make().eval()
    batch = _batch(seed=9, groups=4, group_size=3)
    r = HFRollout(model, _Tok(), max_new_tokens=12, record_entropy=True, stop_token_ids=list(range(1, V, 3)))
    whole = r.generate_ids(batch.prompt_ids, batch.prompt_mask, greedy=True)
    for size in (1, 3, 5):
        parts = [r.generate_ids(batch.prompt_ids[i:i + size], batch.prompt_mask[i:i + size], greedy=True)
                 for i in range(0, len(batch), size)]
        for i, part in enumerate(parts):
            rows = slice(i * size, i * size + len(part))
            w = part.response_ids.shape[1]
            assert torch.equal(part.response_ids, whole.response_ids[rows, :w])
            assert not whole.response_mask[rows, w:].any()
            torch.testing.assert_close(part.behavior_logp, whole.behavior_logp[rows, :w], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(part.behavior_entropy, whole.behavior_entropy[rows, :w], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [1, 2, 4, 100])
def test_attention_chunks_do_not_change_the_result(chunks, monkeypatch, one_thread):
    """Attention runs on groups of rows of similar length (``packed.ATTENTION_CHUNKS``); any number
    of groups gives the padded HF forward's log-probs (1e-5) and gradients (1e-4 of their scale),
    with one prompt much longer than the others (it used to pad every row)."""
    import tokentrust.train.packed as packed

    monkeypatch.setattr(packed, "ATTENTION_CHUNKS", chunks)
    model = _llama().train()
    batch = _batch(seed=11, groups=5, group_size=3, P=16)
    long = torch.randint(2, V, (16,), generator=torch.Generator().manual_seed(3))
    batch.prompt_ids[:3], batch.prompt_mask[:3] = long, 1  # the first group's prompt fills all 16 columns
    ref_logp, ref_grads = _grads(model, batch, packed=False, temperature=1.0)
    logp, grads = _grads(model, batch, packed=True, temperature=1.0)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name
    lay = packed.build_layout(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    assert len(lay.resp_chunks) == min(chunks, len(batch))
    assert sum(len(c.back[0]) for c in lay.resp_chunks) == len(lay.tokens) - lay.num_prompt_tokens


def test_rope_equals_the_hf_formula_values_and_gradients():
    """packed._Rope (per half, no rotate_half tensor) gives HF's x * cos + rotate_half(x) * sin
    bit for bit in float32 (the same products and sums), and the same gradient (float64 gradcheck)."""
    from transformers.models.llama.modeling_llama import rotate_half

    from tokentrust.train.packed import _Rope, _rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 8, generator=g)
    ang = torch.randn(7, 4, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    assert torch.equal(_rope(x, cos, sin), x * cos[:, None] + rotate_half(x) * sin[:, None])
    x64 = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _Rope.apply(t, cos.double(), sin.double()), (x64,))
    xs = x.clone().requires_grad_()
    ref = x.clone().requires_grad_()
    w = torch.randn(x.shape, generator=g)
    (_rope(xs, cos, sin) * w).sum().backward()
    ((ref * cos[:, None] + rotate_half(ref) * sin[:, None]) * w).sum().backward()
    torch.testing.assert_close(xs.grad, ref.grad, rtol=1e-6, atol=1e-6)
