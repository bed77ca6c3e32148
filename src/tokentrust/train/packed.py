"""The learner's forward without padding, each distinct prompt computed once (Llama / Qwen2 models).

The learner needs log pi of the sampled response tokens, many times per batch (ppo_epochs x
minibatches forwards and backwards). The Hugging Face forward computes every column of a padded
[N, P + T] batch: on the tiny arithmetic preset about 40% of them are padding, and the G samples
of a GRPO group repeat their prompt G times. This forward runs the same network on

* the real tokens of each *distinct* prompt once (``torch.unique`` over the rows), and
* the real response tokens of each row except its last (whose output predicts nothing),

packed into one [S, D] tensor for every linear layer, norm and activation. Only attention goes
back to a padded layout: prompts attend causally within themselves; response tokens attend to their
prompt's keys and causally to their own response. Logits are computed only where a response token
is predicted. Same parameters, same math as ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (RMSNorm in
float32, rotary embedding in float32 then cast, SwiGLU, tied or separate head), so values and
gradients equal the padded forward's up to float rounding (tests/test_packed.py checks both,
and the trainer-level reference test checks whole trajectories).

Models it does not cover (LoRA / peft wrappers, gradient checkpointing, other architectures, rope
scaling, sliding windows) make ``unsupported_reason`` name the reason, and the learner falls back to
the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokentrust.logits import gather_logprobs, sampled_logprobs

SUPPORTED_TYPES = ("llama", "qwen2")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the packed forward cannot run ``model`` (None when it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_TYPES}"
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return "peft (LoRA) wrapper"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return "MLP bias or tensor-parallel pretraining split"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    return None


# ------------------------------------------------------------------------------------- layout

ATTENTION_CHUNKS = 4  # attention runs in up to this many groups of rows of similar length (see Layout)


@dataclass
class _PromptChunk:
    """Distinct prompts of similar length, attended causally together."""

    gather: torch.Tensor  # [Uc, Pc] index into tokens per (prompt, column), left-aligned
    back: tuple[torch.Tensor, torch.Tensor]  # (prompt, column) of each real cell, in packed order


@dataclass
class _ResponseChunk:
    """Rows of similar length: each row's response inputs attend to [its prompt | its own prefix]."""

    queries: torch.Tensor  # [Nc, Rc] index into the response inputs (tokens[Sp:]) per (row, column)
    keys: torch.Tensor  # [Nc, Lc] index into tokens: the row's prompt, then its response inputs
    mask: torch.Tensor  # [Nc, 1, Rc, Lc] bool: keys a query may attend to
    back: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each real query, in packed order


@dataclass
class Layout:
    """Where each real token sits in the packed [S] sequence (distinct prompts' tokens, then response
    inputs) and in the padded views attention uses. Padding slots point at row 0: their queries'
    outputs are never read back and their keys are masked, so their values do not matter.

    Attention is the only part of the network that mixes tokens, and it is computed per row. So the
    distinct prompts are ordered by length and the rows by key length (prompt + response inputs),
    tokens are packed in that order, and attention runs on up to ``ATTENTION_CHUNKS`` groups of
    consecutive prompts / rows, each padded only to its own longest member (one long prompt no longer
    pads every row). The outputs of the chunks, concatenated, are already in packed order."""

    tokens: torch.Tensor  # [S] input ids
    positions: torch.Tensor  # [S] rotary positions
    num_prompt_tokens: int  # Sp: tokens[:Sp] are the distinct prompts', tokens[Sp:] the response inputs
    prompt_gather: torch.Tensor  # [U, Pm] index into tokens[:Sp] per (prompt, column), left-aligned
    prompt_valid: torch.Tensor  # [U, Pm] bool
    last_prompt: torch.Tensor  # [U] packed index of each distinct prompt's last token
    resp_gather: torch.Tensor  # [N, Rm] index into tokens[Sp:] per (row, response input column)
    prompt_of_row: torch.Tensor  # [N] which distinct prompt row n continues
    prompt_back: tuple[torch.Tensor, torch.Tensor]  # [Sp] (prompt, column) of each packed prompt token
    prompt_chunks: list[_PromptChunk]
    resp_chunks: list[_ResponseChunk]
    predict_from: torch.Tensor  # [M] row of [last prompt tokens (U); response inputs (Sr)] predicting each token
    valid: torch.Tensor  # [N, T] bool, the response mask (M = valid.sum())


def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    chunks = max(1, min(chunks, n))
    cuts = [i * n // chunks for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def build_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, chunks: int | None = None) -> Layout:
    """The packed layout of left-padded prompts and right-padded responses (as ``RolloutBatch`` holds them);
    ``chunks``: attention groups (default ``ATTENTION_CHUNKS``)."""
    device = prompt_ids.device
    chunks = ATTENTION_CHUNKS if chunks is None else chunks
    pm, rm = prompt_mask.bool(), response_mask.bool()
    if not bool(pm.any(-1).all()):
        raise ValueError("every row needs at least one prompt token")
    if bool((rm[:, 1:] & ~rm[:, :-1]).any()):
        raise ValueError("response_mask must be right-padded (ones, then zeros)")
    if bool((pm[:, :-1] & ~pm[:, 1:]).any()):
        raise ValueError("prompt_mask must be left-padded (zeros, then ones)")
    uniq, inverse = torch.unique(torch.cat([prompt_ids * pm, pm.long()], 1), dim=0, return_inverse=True)
    P, U, N, T = prompt_ids.shape[1], len(uniq), response_ids.shape[0], response_ids.shape[1]
    u_order = torch.argsort(uniq[:, P:].sum(-1), stable=True)  # distinct prompts, shortest first
    uniq = uniq[u_order]
    rank = torch.empty_like(u_order)
    rank[u_order] = torch.arange(U, device=device)
    prompt_of_row = rank[inverse]
    u_len = uniq[:, P:].sum(-1)  # [U] real tokens per distinct prompt (ascending)
    Pm = int(u_len.max())
    in_len = (rm.sum(-1) - 1).clamp_min(0)  # response tokens fed as inputs (the last one predicts nothing)
    Rm = max(int(in_len.max()) if N else 0, 1)  # <= max(T - 1, 1) <= T
    row_plen = u_len[prompt_of_row]  # [N]
    r_order = torch.argsort(row_plen + in_len, stable=True)  # rows by key length, shortest first

    p_cols, r_cols = torch.arange(Pm, device=device), torch.arange(Rm, device=device)
    p_valid = p_cols[None, :] < u_len[:, None]  # [U, Pm], real tokens moved to the left
    src_cols = (P - u_len[:, None] + p_cols[None, :]).clamp_max(P - 1)
    p_tokens = uniq[:, :P].gather(1, src_cols)[p_valid]
    r_valid = r_cols[None, :] < in_len[:, None]  # [N, Rm]
    rs_valid = r_valid[r_order]  # response inputs are packed row by row in r_order
    r_tokens = response_ids[r_order][:, :Rm][rs_valid]
    Sp, Sr = len(p_tokens), len(r_tokens)

    prompt_gather = torch.zeros((U, Pm), dtype=torch.long, device=device)
    prompt_gather[p_valid] = torch.arange(Sp, device=device)
    resp_sorted = torch.zeros((N, Rm), dtype=torch.long, device=device)
    resp_sorted[rs_valid] = torch.arange(Sr, device=device)
    resp_gather = torch.empty_like(resp_sorted)
    resp_gather[r_order] = resp_sorted

    prompt_chunks = [_PromptChunk(gather=prompt_gather[a:b, :int(u_len[b - 1])],
                                  back=tuple(p_valid[a:b, :int(u_len[b - 1])].nonzero().unbind(1)))
                     for a, b in _bounds(U, chunks)]
    resp_chunks = []
    for a, b in _bounds(N, chunks):
        rows = r_order[a:b]
        lp, li = row_plen[rows][:, None], in_len[rows][:, None]
        Rc, Lc = max(int(li.max()), 1), int((lp + li).max())
        c = torch.arange(Lc, device=device)[None, :]
        is_p, is_r = c < lp, (c >= lp) & (c < lp + li)
        keys = torch.where(is_p, prompt_gather[prompt_of_row[rows]].gather(1, c.clamp_max(Pm - 1).expand(len(rows), Lc)),
                           torch.where(is_r, Sp + resp_gather[rows].gather(1, (c - lp).clamp(0, Rm - 1)), 0))
        j = torch.arange(Rc, device=device)[None, :, None]  # query column
        mask = is_p[:, None, :] | (is_r[:, None, :] & (c[:, None, :] - lp[:, :, None] <= j))
        q_valid = torch.arange(Rc, device=device)[None, :] < li
        resp_chunks.append(_ResponseChunk(queries=resp_gather[rows, :Rc], keys=keys, mask=mask[:, None],
                                          back=tuple(q_valid.nonzero().unbind(1))))

    # rows of [last prompt tokens (U) | response inputs (Sr)]: token j of row n is predicted by the
    # prompt's last token (j = 0), else by response input j - 1
    pred = torch.zeros((N, T), dtype=torch.long, device=device)
    pred[:, 0] = prompt_of_row
    if T > 1:
        pred[:, 1:] = F.pad(U + resp_gather, (0, max(T - 1 - Rm, 0)))[:, :T - 1]
    return Layout(tokens=torch.cat([p_tokens, r_tokens]),
                  positions=torch.cat([p_cols.expand(U, Pm)[p_valid], (row_plen[:, None] + r_cols)[r_order][rs_valid]]),
                  num_prompt_tokens=Sp, prompt_gather=prompt_gather, prompt_valid=p_valid,
                  last_prompt=prompt_gather[torch.arange(U, device=device), u_len - 1], resp_gather=resp_gather,
                  prompt_of_row=prompt_of_row, prompt_back=tuple(p_valid.nonzero().unbind(1)),
                  prompt_chunks=prompt_chunks, resp_chunks=resp_chunks, predict_from=pred[rm], valid=rm)


# ------------------------------------------------------------------------------------ network

class _RMSNorm32(torch.autograd.Function):
    """float32 RMSNorm with a hand-written backward: a third fewer passes over [S, D] than autograd
    through the composite (dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w; dw = sum(dy * xhat))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, weight, rstd)
        return xhat * weight

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xhat, weight, rstd = ctx.saved_tensors
        dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        g = dy * weight
        return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)), dw, None


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF Llama/Qwen2 RMSNorm: normalise in float32, cast back, then scale."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return _RMSNorm32.apply(x, norm.weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * h.to(x.dtype)


def _rotary(model: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim] of the packed positions, computed in float32 as HF does, then cast."""
    rot = model.model.rotary_emb
    freqs = positions.float()[:, None] * rot.inv_freq.float().to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], -1)
    scale = getattr(rot, "attention_scaling", 1.0)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _linear(x: torch.Tensor, *layers: torch.nn.Linear) -> torch.Tensor:
    """Several projections of x as one matmul (weights concatenated; gradients split back)."""
    w = layers[0].weight if len(layers) == 1 else torch.cat([lin.weight for lin in layers])
    biases = [lin.bias for lin in layers]
    if all(b is None for b in biases):
        return x @ w.t()
    b = torch.cat([bb if bb is not None else w.new_zeros(lin.weight.shape[0]) for bb, lin in zip(biases, layers)])
    return torch.addmm(b, x, w.t())


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, Hkv, L, d] -> [B, Hkv * n, L, d] (each key/value head shared by n query heads)."""
    if n == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n, length, d).reshape(b, h * n, length, d)


@dataclass
class _Heads:
    heads: int
    kv_heads: int
    head_dim: int


class _Rope(torch.autograd.Function):
    """HF's rotary embedding x * cos + rotate_half(x) * sin of [S, heads, d], written per half
    (out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2: the same products and sums, so the same float32
    values) without materialising rotate_half(x), with the backward dx1 = g1 c1 + g2 s2,
    dx2 = g2 c2 - g1 s1 (cos, sin carry no gradient: they are functions of the positions)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        c, s = cos[:, None], sin[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty_like(x)
        torch.mul(x1, c[..., :half], out=out[..., :half]).sub_(x2 * s[..., :half])
        torch.mul(x2, c[..., half:], out=out[..., half:]).add_(x1 * s[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = g.shape[-1] // 2
        c, s = cos[:, None], sin[:, None]
        g1, g2 = g[..., :half], g[..., half:]
        dx = torch.empty_like(g)
        torch.mul(g1, c[..., :half], out=dx[..., :half]).add_(g2 * s[..., half:])
        torch.mul(g2, c[..., half:], out=dx[..., half:]).sub_(g1 * s[..., :half])
        return dx, None, None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [S, heads, d] (HF's q * cos + rotate_half(q) * sin)."""
    if x.shape[-1] % 2 or cos.requires_grad or sin.requires_grad:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    return _Rope.apply(x, cos, sin)


def _attention(attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lay: Layout,
               dims: _Heads, last: bool) -> torch.Tensor:
    """Self-attention of the packed tokens: causal within prompts, responses over prompt + own prefix.

    In the last layer only the outputs that predict a token are needed: every token's keys and values,
    but queries only for each prompt's last token and the response inputs; the result then has rows
    [last prompt tokens (U) | response inputs (Sr)] instead of [S]."""
    H, Hkv, d, Sp = dims.heads, dims.kv_heads, dims.head_dim, lay.num_prompt_tokens
    k, v = _linear(h, attn.k_proj, attn.v_proj).split(Hkv * d, -1)
    k, v = _rope(k.view(-1, Hkv, d), cos, sin), v.view(-1, Hkv, d)
    rows = torch.cat([lay.last_prompt, torch.arange(Sp, len(h), device=h.device)]) if last else None
    q = _linear(h if rows is None else h[rows], attn.q_proj).view(-1, H, d)
    q = _rope(q, cos if rows is None else cos[rows], sin if rows is None else sin[rows])
    rep = H // Hkv
    outs = []
    if last:  # each prompt's last token attends to all of its prompt
        n_prompt_q = len(lay.last_prompt)
        kp, vp = (t[lay.prompt_gather].transpose(1, 2) for t in (k, v))  # [U, Hkv, Pm, d]
        qp = q[:n_prompt_q, None].transpose(1, 2)  # [U, H, 1, d]
        out_p = F.scaled_dot_product_attention(qp, _repeat_kv(kp, rep), _repeat_kv(vp, rep),
                                               attn_mask=lay.prompt_valid[:, None, None, :])
        outs.append(out_p.transpose(1, 2).reshape(-1, H, d))
    else:  # left-aligned prompts: plain causal attention never shows a real query a padding key
        n_prompt_q = Sp
        for ch in lay.prompt_chunks:
            qp, kp, vp = (t[ch.gather].transpose(1, 2) for t in (q, k, v))  # [Uc, H*, Pc, d]
            out_p = F.scaled_dot_product_attention(qp, _repeat_kv(kp, rep), _repeat_kv(vp, rep), is_causal=True)
            outs.append(out_p.transpose(1, 2)[ch.back])  # real (prompt, column) cells only
    q_resp = q[n_prompt_q:]
    for ch in lay.resp_chunks:
        qr = q_resp[ch.queries].transpose(1, 2)  # [Nc, H, Rc, d]
        kr, vr = (t[ch.keys].transpose(1, 2) for t in (k, v))  # [Nc, Hkv, Lc, d]: [prompt | response inputs]
        out_r = F.scaled_dot_product_attention(qr, _repeat_kv(kr, rep), _repeat_kv(vr, rep), attn_mask=ch.mask)
        outs.append(out_r.transpose(1, 2)[ch.back])
    return _linear(torch.cat(outs).reshape(-1, H * d), attn.o_proj)


def packed_hidden(model: torch.nn.Module, lay: Layout) -> torch.Tensor:
    """Final-norm hidden states [M, D] at the positions that predict the valid response tokens."""
    cfg, body = model.config, model.model
    heads = cfg.num_attention_heads
    dims = _Heads(heads, getattr(cfg, "num_key_value_heads", None) or heads,
                  getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    x = body.embed_tokens(lay.tokens)
    cos, sin = _rotary(model, lay.positions, x.dtype)
    last = len(body.layers) - 1
    for i, layer in enumerate(body.layers):
        a = _attention(layer.self_attn, _rms_norm(x, layer.input_layernorm), cos, sin, lay, dims, last=i == last)
        if i == last:  # keep only the rows that predict: [last prompt tokens | response inputs]
            x = torch.cat([x[lay.last_prompt], x[lay.num_prompt_tokens:]])
        x = x + a
        mlp = layer.mlp
        gate, up = _linear(_rms_norm(x, layer.post_attention_layernorm), mlp.gate_proj, mlp.up_proj).chunk(2, -1)
        x = x + _linear(F.silu(gate) * up, mlp.down_proj)
    return _rms_norm(x[lay.predict_from], body.norm)


def packed_response_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                             response_ids: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0,
                             topk_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi [N, T] of the sampled tokens (0 where response_mask is 0), differentiable, and
    optionally the no-grad log-probs [N, T, K] of ``topk_ids`` (the Top-K DPPO losses)."""
    lay = build_layout(prompt_ids, prompt_mask, response_ids, response_mask)
    hidden = packed_hidden(model, lay)
    logits = model.get_output_embeddings()(hidden)  # [M, V]
    out = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    out = out.masked_scatter(lay.valid, sampled_logprobs(logits, response_ids[lay.valid], temperature=temperature))
    topk = None
    if topk_ids is not None:
        with torch.no_grad():
            k = topk_ids.shape[-1]
            topk = torch.zeros(topk_ids.shape, dtype=torch.float32, device=topk_ids.device)
            vals = gather_logprobs(logits.detach(), topk_ids[lay.valid], temperature=temperature)
            topk[lay.valid] = vals.reshape(-1, k)
    return out, topk
