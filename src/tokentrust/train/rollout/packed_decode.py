"""KV-cached decoding for the models ``tokentrust.train.packed`` supports (Llama, Qwen2), for ``HFRollout``.

Hugging Face's ``DynamicCache`` grows by concatenation: every decoded token copies the whole cache
of every layer, and that copy took a third of the rollout time of the tiny preset. Here each layer
keeps

* the keys and values of each *distinct* prompt once, [U, Hkv, Pm, d], left-aligned, prefilled
  without padding (a GRPO group's G rows share them: they are neither copied per row nor read
  once per row);
* one preallocated buffer per row for the generated tokens, [N, Hkv, T, d]; column t holds the
  t-th generated token (one slice write per step).

A row's query attends to its prompt's real columns and to its generated columns up to t: the scores
against the prompt keys are computed per prompt for all of its rows at once (one matrix product per
prompt and key head), those against the generated keys per row, and one softmax runs over both.
Rotary positions are ``len(prompt) + t``, as in the padded loop. The keys are the same set, only
stored in another order, so the logits equal the HF loop's up to float rounding (tests/test_packed.py).
Finished rows are dropped by indexing the per-row buffers (the prompt buffers stay). When no two
rows share a prompt (greedy evaluation), ``RowDecoder`` keeps each row's prompt in its own buffer,
[N, Hkv, Pm + T, d], and reads it with one matrix product per row (sharing would only add indexing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokentrust.train.packed import Layout, _Heads, _linear, _repeat_kv, _rms_norm, _rope, _rotary, build_layout


class _Decoder:
    """What both decoders share: the model's head dimensions, the prompts' prefill and the per-token
    layer loop. Subclasses say where keys and values live (``_prefill``, ``_write``, ``_read``)."""

    can_compact = True

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int):
        cfg = model.config
        heads = cfg.num_attention_heads
        self.model, self.body = model, model.model
        self.dims = _Heads(heads, getattr(cfg, "num_key_value_heads", None) or heads,
                           getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.logits = self._prefill(prompt_ids, prompt_mask, max_new_tokens)

    def _run_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[
            Layout, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Run each distinct prompt once, without padding. Returns the layout, each layer's prompt
        keys and values [U, Hkv, Pm, d] (left-aligned) and the logits [N, V] of each row's last token."""
        n = prompt_ids.shape[0]
        dummy = torch.ones((n, 1), dtype=torch.long, device=prompt_ids.device)
        lay = build_layout(prompt_ids, prompt_mask, dummy, dummy)  # responses of one token: prompts only
        d = self.dims
        rep = d.heads // d.kv_heads
        self.prompt_len = prompt_mask.bool().sum(-1)  # [N]
        x = self.body.embed_tokens(lay.tokens)
        cos, sin = _rotary(self.model, lay.positions, x.dtype)
        keys, values = [], []
        for layer in self.body.layers:
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            k, v = _linear(h, attn.k_proj, attn.v_proj).split(d.kv_heads * d.head_dim, -1)
            k, v = _rope(k.view(-1, d.kv_heads, d.head_dim), cos, sin), v.view(-1, d.kv_heads, d.head_dim)
            q = _rope(_linear(h, attn.q_proj).view(-1, d.heads, d.head_dim), cos, sin)
            kp, vp, qp = (t[lay.prompt_gather].transpose(1, 2) for t in (k, v, q))  # [U, H*, Pm, d]
            out = F.scaled_dot_product_attention(qp, _repeat_kv(kp, rep), _repeat_kv(vp, rep), is_causal=True)
            out = out.transpose(1, 2)[lay.prompt_back].reshape(-1, d.heads * d.head_dim)
            x = x + _linear(out, attn.o_proj)
            x = x + self._mlp(layer, x)
            keys.append(kp)
            values.append(vp)
        last = _rms_norm(x[lay.last_prompt], self.body.norm)
        return lay, keys, values, self.model.get_output_embeddings()(last)[lay.prompt_of_row]

    @staticmethod
    def _mlp(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        mlp = layer.mlp
        gate, up = _linear(_rms_norm(x, layer.post_attention_layernorm), mlp.gate_proj, mlp.up_proj).chunk(2, -1)
        return _linear(F.silu(gate) * up, mlp.down_proj)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed the t-th generated token of each row ([n]); logits [n, V] of the next one."""
        d = self.dims
        x = self.body.embed_tokens(tokens)
        cos, sin = _rotary(self.model, self.prompt_len + t, x.dtype)
        self._begin_step(t)
        for i, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q, k, v = _linear(h, attn.q_proj, attn.k_proj, attn.v_proj).split(
                [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], -1)
            q = _rope(q.view(-1, d.heads, d.head_dim), cos, sin)
            self._write(i, t, _rope(k.view(-1, d.kv_heads, d.head_dim), cos, sin), v.view(-1, d.kv_heads, d.head_dim))
            x = x + _linear(self._read(q, i, t), attn.o_proj)
            x = x + self._mlp(layer, x)
        return self.model.get_output_embeddings()(_rms_norm(x, self.body.norm))

    def _begin_step(self, t: int) -> None:
        """Per-step state shared by the layers (none by default)."""


class SharedPromptDecoder(_Decoder):
    """Prompt keys / values per distinct prompt, generated ones per row (see the module docstring)."""

    @torch.no_grad()
    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Keep each distinct prompt's keys / values once; per-row buffers for the generated ones."""
        lay, keys, values, logits = self._run_prompts(prompt_ids, prompt_mask)
        n, d = prompt_ids.shape[0], self.dims
        self.prompt_of_row = lay.prompt_of_row  # [N]
        self.prompt_masked = ~lay.prompt_valid[:, None, None, :]  # [U, 1, 1, Pm]: padding columns
        self._group_rows()
        self.prompt_keys = [k.contiguous() for k in keys]
        self.prompt_values = [v.contiguous() for v in values]
        self.keys = [k.new_empty((n, d.kv_heads, max_new_tokens, d.head_dim)) for k in keys]
        self.values = [v.new_empty((n, d.kv_heads, max_new_tokens, d.head_dim)) for v in values]
        return logits

    def _group_rows(self) -> None:
        """``slots`` [U, G]: the rows of each distinct prompt (padded with row 0), and each row's slot."""
        u = self.prompt_of_row
        U = self.prompt_masked.shape[0]
        counts = torch.bincount(u, minlength=U)
        order = torch.argsort(u, stable=True)
        first = torch.cumsum(counts, 0) - counts  # first position of each prompt in `order`
        slot = torch.empty_like(u)
        slot[order] = torch.arange(len(u), device=u.device) - first[u[order]]
        self.slot = slot  # [n] position of each row among its prompt's rows
        self.slots = torch.zeros((U, max(int(counts.max()), 1)), dtype=torch.long, device=u.device)
        self.slots[u, slot] = torch.arange(len(u), device=u.device)
        self.slot_used = torch.zeros(self.slots.shape, dtype=torch.bool, device=u.device)
        self.slot_used[u, slot] = True

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (finished rows dropped)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.prompt_len = self.prompt_len[index]
        self.prompt_of_row = self.prompt_of_row[index]
        self._group_rows()

    def _write(self, i: int, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[i][:, :, t] = k
        self.values[i][:, :, t] = v

    def _read(self, q: torch.Tensor, i: int, t: int) -> torch.Tensor:
        """Softmax attention of one query per row and head, q [n, H, d], over the row's prompt keys
        (shared by its prompt's rows) and its generated keys 0..t. Returns [n, H * d]. Plain matmuls:
        for a single query they beat the fused kernel on a CPU."""
        n, h, dd = q.shape
        kv = self.dims.kv_heads
        rep = h // kv
        U, G = self.slots.shape
        scale = dd ** -0.5
        qg = q.view(n, kv, rep, dd)  # query heads grouped by the key head they read
        # prompt part, per distinct prompt: [U, Hkv, G * rep, d] @ [U, Hkv, d, Pm]
        qs = qg[self.slots].permute(0, 2, 1, 3, 4).reshape(U, kv, G * rep, dd)
        sp = (qs @ self.prompt_keys[i].transpose(-1, -2)) * scale  # [U, Hkv, G * rep, Pm]
        sp = sp.float().masked_fill(self.prompt_masked, float("-inf"))
        sp = sp.view(U, kv, G, rep, -1)[self.prompt_of_row, :, self.slot]  # [n, Hkv, rep, Pm]
        keys, values = self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1]
        sg = ((qg @ keys.transpose(-1, -2)) * scale).float()  # [n, Hkv, rep, t + 1]
        pm = sp.shape[-1]
        weights = torch.softmax(torch.cat([sp, sg], -1), -1).to(values.dtype)
        wp = weights[..., :pm].new_zeros((U, G, kv, rep, pm))
        wp[self.prompt_of_row, self.slot] = weights[..., :pm]
        wp = wp.permute(0, 2, 1, 3, 4).reshape(U, kv, G * rep, pm)
        op = (wp @ self.prompt_values[i]).view(U, kv, G, rep, dd).permute(0, 2, 1, 3, 4)[self.prompt_of_row, self.slot]
        return (op + weights[..., pm:] @ values).reshape(n, h * dd)


class RowDecoder(_Decoder):
    """Prompts stored per row: [N, Hkv, Pm + T, d] buffers, column ``Pm + t`` the t-th generated token.
    Used when no two rows share a prompt (evaluation), where sharing would only add indexing."""

    @torch.no_grad()
    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Copy each row's prompt keys / values into the prompt columns of its own buffer."""
        lay, keys, values, logits = self._run_prompts(prompt_ids, prompt_mask)
        n, d = prompt_ids.shape[0], self.dims
        self.prompt_cols = lay.prompt_gather.shape[1]  # Pm
        width = self.prompt_cols + max_new_tokens
        self.keys, self.values = [], []
        for store, per_layer in ((self.keys, keys), (self.values, values)):
            for t in per_layer:
                buf = t.new_empty((n, d.kv_heads, width, d.head_dim))
                buf[:, :, :self.prompt_cols] = t[lay.prompt_of_row]
                store.append(buf)
        return logits

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (finished rows dropped)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.prompt_len = self.prompt_len[index]

    def _begin_step(self, t: int) -> None:
        """The columns each row sees at step t: its prompt's real ones and generated 0..t."""
        col = self.prompt_cols + t
        cols = torch.arange(col + 1, device=self.prompt_len.device)
        visible = (cols[None, :] < self.prompt_len[:, None]) | (cols[None, :] >= self.prompt_cols)
        self.visible = visible[:, None, None, :]  # [n, 1, 1, col + 1]: broadcast over kv heads and queries

    def _write(self, i: int, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[i][:, :, self.prompt_cols + t] = k
        self.values[i][:, :, self.prompt_cols + t] = v

    def _read(self, q: torch.Tensor, i: int, t: int) -> torch.Tensor:
        col = self.prompt_cols + t
        keys, values = self.keys[i][:, :, :col + 1], self.values[i][:, :, :col + 1]
        return _one_query_attention(q, keys, values, self.visible, self.dims.heads // self.dims.kv_heads)


def _one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                         rep: int) -> torch.Tensor:
    """Softmax attention of one query per row and head: q [n, H, d] over keys / values [n, Hkv, L, d]
    (H = Hkv * rep query heads share a key head, without copying the keys), visible [n, 1, 1, L].
    Returns [n, H * d]. Plain matmuls: for a single query they beat the fused kernel on a CPU."""
    n, h, d = q.shape
    qg = q.view(n, h // rep, rep, d)  # query heads grouped by the key head they read
    scores = (qg @ keys.transpose(-1, -2)) * d ** -0.5  # [n, Hkv, rep, L]
    weights = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), -1).to(values.dtype)
    return (weights @ values).reshape(n, h * d)


def PackedDecoder(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  max_new_tokens: int) -> SharedPromptDecoder | RowDecoder:
    """Prefill, then one token per row per ``step``; ``keep`` drops rows (same interface as the HF
    path). ``SharedPromptDecoder`` when some rows share a prompt (GRPO groups), else ``RowDecoder``."""
    rows = torch.cat([prompt_ids * prompt_mask, prompt_mask], 1)
    shared = len(torch.unique(rows, dim=0)) < len(rows)
    return (SharedPromptDecoder if shared else RowDecoder)(model, prompt_ids, prompt_mask, max_new_tokens)
