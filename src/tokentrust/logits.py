"""Chunked log-probs, entropy and top-K from [..., V] logits without a full float32 copy.

With V = 152,064 a [B, T, V] float32 log_softmax of a bf16 batch is several GB. Every helper
here walks the flattened B*T rows in chunks and keeps at most ONE [chunk, V] float32 working
buffer alive (the division by the temperature, the max shift and the exp are done in place).

Why custom autograd.Functions: a plain loop `logsumexp(chunk.float() / T)` under autograd
saves each chunk's float32 copy for backward, so the saved tensors add up to a full [N, V]
float32 tensor anyway. `sampled_logprobs` and `gather_logprobs` (and `entropy_from_logits` with
grad=True) instead save only the input logits (already alive), the ids and one float per row
(the log-normaliser), and recompute softmax chunk by chunk in backward, writing the gradient
into a single tensor of the logits' dtype and shape (the unavoidable d loss / d logits).
Double backward is not supported.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_BYTES = 1 << 28  # 256 MiB float32 working buffer when chunk_size is None


def default_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk such that one [chunk, V] float32 buffer takes about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


def _resolve_chunk(chunk_size: int | None, vocab_size: int) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return t


def _segments(logits: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """2-D [rows, V] views covering the flattened leading dims, with their flat row offsets.

    Never copies: a sliced input such as logits[:, :-1] (not viewable as [N, V]) is split into
    one [T, V] segment per leading index instead of being made contiguous."""
    v = logits.shape[-1]
    if logits.ndim == 1:
        raise ValueError("logits must have shape [..., V] with at least one leading dim")
    if logits.ndim == 2:
        return [(0, logits)]
    try:
        return [(0, logits.view(-1, v))]
    except RuntimeError:
        rows = logits.shape[-2]
        lead = itertools.product(*(range(s) for s in logits.shape[:-2]))
        return [(i * rows, logits[idx]) for i, idx in enumerate(lead)]


def _iter_chunks(logits: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, rows[start:end] as a [r, V] view) over the flattened leading dims."""
    for offset, seg in _segments(logits):
        for s in range(0, seg.shape[0], chunk):
            part = seg[s : s + chunk]
            yield offset + s, offset + s + part.shape[0], part


def _scaled_fp32(part: torch.Tensor, temperature: float) -> torch.Tensor:
    """The one working buffer: a fresh float32 copy of the chunk divided by the temperature."""
    buf = part.to(torch.float32, copy=True)
    if temperature != 1.0:
        buf.div_(temperature)
    return buf


def _shift_exp_(buf: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """In place: buf <- exp(buf - max). Returns the row max [r]."""
    if row_max is None:
        row_max = buf.amax(dim=-1)
    # Rows that are entirely -inf would give nan; shift them by 0 instead.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    buf.sub_(row_max.unsqueeze(-1)).exp_()
    return row_max


def _lse_and_gather(logits: torch.Tensor, ids2d: torch.Tensor, temperature: float, chunk: int):
    """Per row: logsumexp of logits/T [N] and logits/T gathered at ids [N, K], both float32."""
    n = ids2d.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    picked = torch.empty(ids2d.shape, dtype=torch.float32, device=logits.device)
    for s, e, part in _iter_chunks(logits, chunk):
        buf = _scaled_fp32(part, temperature)
        picked[s:e] = buf.gather(1, ids2d[s:e])
        m = _shift_exp_(buf)
        lse[s:e] = m + buf.sum(dim=-1).log()
        del buf
    return lse, picked


def _softmax_chunk_(part: torch.Tensor, lse_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """The working buffer turned into softmax(logits/T) for one chunk, using the saved lse."""
    buf = _scaled_fp32(part, temperature)
    buf.sub_(lse_rows.unsqueeze(-1)).exp_()
    return buf


class _GatherLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[ids] for ids [N, K]; backward recomputes softmax per chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids2d: torch.Tensor, temperature: float, chunk: int):
        lse, picked = _lse_and_gather(logits, ids2d, temperature, chunk)
        ctx.save_for_backward(logits, ids2d, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return picked - lse.unsqueeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, ids2d, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        v = logits.shape[-1]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, v)
        g = grad_out.to(torch.float32)
        g_sum = g.sum(dim=-1)
        for s, e, part in _iter_chunks(logits, chunk):
            # d/dz_j sum_k g_k (z_{id_k} - lse) = sum_k g_k [j = id_k] - p_j sum_k g_k ; z = x / T
            buf = _softmax_chunk_(part, lse[s:e], t)
            buf.mul_(-g_sum[s:e].unsqueeze(-1))
            buf.scatter_add_(1, ids2d[s:e], g[s:e])
            if t != 1.0:
                buf.div_(t)
            grad2d[s:e].copy_(buf)
            del buf
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    """H(softmax(logits / T)) per row; backward dH/dz = -p (log p + H), recomputed per chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, chunk: int):
        n = logits.numel() // logits.shape[-1]
        ent = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s, e, part in _iter_chunks(logits, chunk):
            buf = _scaled_fp32(part, temperature)
            m = _shift_exp_(buf)  # buf = e_j = exp(z_j - m)
            z_sum = buf.sum(dim=-1)
            # sum_j e_j log e_j, in place (xlogy(0, 0) = 0 handles underflowed entries)
            e_log_e = buf.xlogy_(buf).sum(dim=-1)
            # H = log S - (sum e log e) / S with S = sum e
            ent[s:e] = z_sum.log() - e_log_e / z_sum
            lse[s:e] = m + z_sum.log()
            del buf
        ctx.save_for_backward(logits, lse, ent)
        ctx.temperature, ctx.chunk = temperature, chunk
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, lse, ent = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        v = logits.shape[-1]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, v)
        g = grad_out.to(torch.float32).reshape(-1)
        for s, e, part in _iter_chunks(logits, chunk):
            h = ent[s:e].unsqueeze(-1)
            buf = _scaled_fp32(part, t)
            # u = log p + H ; p (log p + H) = exp(-H) * exp(u) * u = exp(-H) xlogy(exp(u), exp(u))
            buf.sub_(lse[s:e].unsqueeze(-1)).add_(h).exp_()
            buf.xlogy_(buf)
            buf.mul_((-torch.exp(-h) * g[s:e].unsqueeze(-1)) / t)
            grad2d[s:e].copy_(buf)
            del buf
        return grad, None, None


def _flat_ids(logits: torch.Tensor, ids: torch.Tensor, k_dim: bool) -> torch.Tensor:
    lead = tuple(logits.shape[:-1])
    got = tuple(ids.shape[:-1]) if k_dim else tuple(ids.shape)
    if got != lead:
        raise ValueError(f"ids shape {tuple(ids.shape)} does not match logits shape {tuple(logits.shape)}")
    if ids.dtype != torch.long:
        ids = ids.long()
    ids2d = ids.reshape(-1, ids.shape[-1] if k_dim else 1)
    v = logits.shape[-1]
    if ids2d.numel():
        lo, hi = torch.stack([ids2d.min(), ids2d.max()]).tolist()  # one host sync
        if lo < 0 or hi >= v:
            raise ValueError(f"token ids must be in [0, {v}), got range [{lo}, {hi}]")
    return ids2d


def sampled_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature) at `ids`: logits [..., V], ids [...] -> float32 [...].

    Differentiable w.r.t. logits; memory: one [chunk, V] float32 buffer in forward and backward."""
    t = _check_temperature(temperature)
    chunk = _resolve_chunk(chunk_size, logits.shape[-1])
    ids2d = _flat_ids(logits, ids, k_dim=False)
    out = _GatherLogprobs.apply(logits, ids2d, t, chunk)
    return out.reshape(ids.shape)


def gather_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature) at K ids per position: ids [..., K] -> float32 [..., K].

    Used by Top-K DPPO for pi's log-probs on mu's recorded top-K ids. Differentiable; repeated
    ids in a row get their gradients summed."""
    t = _check_temperature(temperature)
    chunk = _resolve_chunk(chunk_size, logits.shape[-1])
    ids2d = _flat_ids(logits, ids, k_dim=True)
    out = _GatherLogprobs.apply(logits, ids2d, t, chunk)
    return out.reshape(ids.shape)


def entropy_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) per position: [..., V] -> float32 [...].

    Not differentiable unless grad=True (then via a chunked custom backward)."""
    t = _check_temperature(temperature)
    chunk = _resolve_chunk(chunk_size, logits.shape[-1])
    lead = logits.shape[:-1]
    if grad:
        return _Entropy.apply(logits, t, chunk).reshape(lead)
    with torch.no_grad():
        return _Entropy.apply(logits.detach(), t, chunk).reshape(lead)


@torch.no_grad()
def topk_logprobs(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable ids and their log-probs under softmax(logits / temperature).

    Returns (ids long [..., k], logp float32 [..., k]) sorted by decreasing probability. No grad
    (it records the behaviour policy's top-K at sampling time; use `gather_logprobs` for pi)."""
    t = _check_temperature(temperature)
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}], got {k}")
    chunk = _resolve_chunk(chunk_size, v)
    n = logits.numel() // v
    ids = torch.empty((n, k), dtype=torch.long, device=logits.device)
    logp = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    for s, e, part in _iter_chunks(logits.detach(), chunk):
        buf = _scaled_fp32(part, t)
        vals, idx = buf.topk(k, dim=-1, sorted=True)
        m = _shift_exp_(buf, vals[:, 0])
        lse = m + buf.sum(dim=-1).log()
        ids[s:e] = idx
        logp[s:e] = vals - lse.unsqueeze(-1)
        del buf
    lead = tuple(logits.shape[:-1])
    return ids.reshape(*lead, k), logp.reshape(*lead, k)
