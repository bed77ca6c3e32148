"""Chunked logit helpers against full-tensor float64 references, and their memory behaviour."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokentrust.logits import (
    default_chunk_size,
    entropy_from_logits,
    gather_logprobs,
    sampled_logprobs,
    topk_logprobs,
)

torch.set_num_threads(1)
B, T, V = 3, 7, 97  # 21 rows: chunk sizes 4 and 5 do not divide it


def _logits(dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _ref_logp(x, temperature):
    return torch.log_softmax(x.double() / temperature, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
def test_sampled_logprobs_and_grad(temperature, chunk):
    x = _logits().requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, T, dtype=torch.float64)
    out = sampled_logprobs(x, ids, temperature, chunk_size=chunk)
    assert out.shape == (B, T) and out.dtype == torch.float32
    (g,) = torch.autograd.grad((out.double() * w).sum(), x)

    xr = x.detach().double().requires_grad_()
    ref = _ref_logp(xr, temperature).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (gr,) = torch.autograd.grad((ref * w).sum(), xr)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), gr, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gather_logprobs_and_grad_with_repeated_ids(temperature):
    x = _logits(seed=2).requires_grad_()
    K = 6
    ids = torch.randint(0, V, (B, T, K), generator=torch.Generator().manual_seed(3))
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated id must get both gradient contributions
    w = torch.randn(B, T, K, dtype=torch.float64)
    out = gather_logprobs(x, ids, temperature, chunk_size=4)
    (g,) = torch.autograd.grad((out.double() * w).sum(), x)

    xr = x.detach().double().requires_grad_()
    ref = _ref_logp(xr, temperature).gather(-1, ids)
    (gr,) = torch.autograd.grad((ref * w).sum(), xr)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), gr, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_entropy_matches_reference_and_grad(temperature):
    x = _logits(seed=4, scale=4.0)
    x[0, 0, :] = -1e4  # a near-uniform row...
    x[0, 0, 5] = 50.0  # ...made one-hot: entropy ~0, exp underflows to exact zeros
    x = x.requires_grad_()
    out = entropy_from_logits(x, temperature, chunk_size=5)
    assert not out.requires_grad and out.shape == (B, T)
    lp = _ref_logp(x.detach(), temperature)
    ref = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert float(out[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(out.max()) <= torch.log(torch.tensor(float(V))) + 1e-5

    w = torch.randn(B, T, dtype=torch.float64)
    out_g = entropy_from_logits(x, temperature, chunk_size=5, grad=True)
    (g,) = torch.autograd.grad((out_g.double() * w).sum(), x)
    xr = x.detach().double().requires_grad_()
    lpr = _ref_logp(xr, temperature)
    (gr,) = torch.autograd.grad((-(lpr.exp() * lpr).sum(-1) * w).sum(), xr)
    torch.testing.assert_close(g.double(), gr, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_topk_logprobs(temperature):
    x = _logits(seed=5)
    ids, logp = topk_logprobs(x, 8, temperature, chunk_size=4)
    assert ids.shape == logp.shape == (B, T, 8) and ids.dtype == torch.long
    ref_vals, ref_ids = torch.topk(_ref_logp(x, temperature), 8, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logp.double(), ref_vals, atol=2e-5, rtol=1e-5)
    assert bool((logp[..., :-1] >= logp[..., 1:]).all())


def test_bf16_and_non_contiguous_input():
    x = _logits(torch.bfloat16, seed=6)
    sliced = x[:, :-1]  # [B, T-1, V], not viewable as [N, V]
    assert not sliced.is_contiguous()
    ids = torch.randint(0, V, (B, T - 1), generator=torch.Generator().manual_seed(7))
    ref_lp = _ref_logp(sliced, 0.9)  # bf16 values upcast exactly, then float64 math
    out = sampled_logprobs(sliced, ids, 0.9, chunk_size=4)
    torch.testing.assert_close(out.double(), ref_lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), atol=2e-5, rtol=1e-5)
    ent = entropy_from_logits(sliced, 0.9, chunk_size=4)
    torch.testing.assert_close(ent.double(), -(ref_lp.exp() * ref_lp).sum(-1), atol=2e-5, rtol=1e-5)
    tk_ids, _ = topk_logprobs(sliced, 3, 0.9, chunk_size=4)
    assert torch.equal(tk_ids, torch.topk(ref_lp, 3, dim=-1).indices)

    xl = x.clone().requires_grad_()
    out = sampled_logprobs(xl[:, :-1], ids, 0.9, chunk_size=4)
    out.sum().backward()
    assert xl.grad.dtype == torch.bfloat16 and bool((xl.grad[:, -1] == 0).all())
    xr = x.double().requires_grad_()
    _ref_logp(xr[:, :-1], 0.9).gather(-1, ids.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(xl.grad.double(), xr.grad, atol=1e-2, rtol=1e-2)  # bf16 grad rounding


def test_default_chunk_and_input_checks():
    assert default_chunk_size(152064) == (1 << 28) // (4 * 152064)
    x = _logits()
    ids = torch.zeros(B, T, dtype=torch.long)
    torch.testing.assert_close(sampled_logprobs(x, ids), sampled_logprobs(x, ids, chunk_size=2))
    with pytest.raises(ValueError, match="token ids"):
        sampled_logprobs(x, ids + V)
    with pytest.raises(ValueError, match="shape"):
        sampled_logprobs(x, ids[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(x, 0.0)
    with pytest.raises(ValueError, match="k must"):
        topk_logprobs(x, V + 1)


def _saved_tensors(fn):
    """Run fn() and return (its output, the tensors autograd saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_backward_saves_no_float32_copies():
    N, VV, chunk = 64, 4096, 8
    x = torch.randn(N, VV, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, VV, (N,))
    full_fp32 = N * VV * 4

    def extra(saved):  # bytes saved beyond the input logits themselves (which are alive anyway)
        ptr = x.untyped_storage().data_ptr()
        return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() != ptr)

    _, saved = _saved_tensors(lambda: sampled_logprobs(x, ids, 0.7, chunk_size=chunk))
    assert extra(saved) < 4 * N * 8  # ids + one float per row, no [chunk, V] buffers (full: 16384 N)
    _, saved = _saved_tensors(lambda: gather_logprobs(x, ids.unsqueeze(-1).repeat(1, 20), 0.7, chunk_size=chunk))
    assert extra(saved) < 4 * N * 8 * 21

    # control: the naive autograd chunk loop keeps every chunk's float32 softmax for backward
    def naive():
        parts = [torch.log_softmax(x[s : s + chunk].float() / 0.7, -1).gather(1, ids[s : s + chunk, None])
                 for s in range(0, N, chunk)]
        return torch.cat(parts)

    _, saved = _saved_tensors(naive)
    assert extra(saved) >= full_fp32


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, torch
    torch.set_num_threads(1)
    from tokentrust.logits import sampled_logprobs, entropy_from_logits, topk_logprobs, gather_logprobs

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    def peak_delta_mb(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = status_mb("VmRSS")
        fn()
        return status_mb("VmHWM") - base

    N, V, C = 256, 32768, 16
    x = torch.randn(N, V, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (N,))
    xr = x.clone().requires_grad_()
    # warm up kernels and the allocator on tiny inputs
    sampled_logprobs(x[:4].clone().requires_grad_(), ids[:4], 0.7, 2).sum().backward()
    entropy_from_logits(x[:4], 0.7, 2); topk_logprobs(x[:4], 5, 0.7, 2)
    res = {
        "sampled": peak_delta_mb(lambda: sampled_logprobs(x, ids, 0.7, C)),
        "entropy": peak_delta_mb(lambda: entropy_from_logits(x, 0.7, C)),
        "topk": peak_delta_mb(lambda: topk_logprobs(x, 20, 0.7, C)),
        "gather": peak_delta_mb(lambda: gather_logprobs(x, ids[:, None].repeat(1, 20), 0.7, C)),
        "backward": peak_delta_mb(lambda: sampled_logprobs(xr, ids, 0.7, C).sum().backward()),
        "naive": peak_delta_mb(lambda: torch.log_softmax(x.float() / 0.7, -1)),
    }
    print(json.dumps(res))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc peak-RSS reset and glibc malloc")
def test_peak_rss_of_chunked_helpers():
    # glibc's dynamic mmap threshold keeps freed buffers resident; a fixed threshold makes every
    # large tensor its own mmap, so the RSS high-water mark tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    N, VV, C = 256, 32768, 16
    buf_mb = C * VV * 4 / 2**20  # 2 MiB
    full_fp32_mb = N * VV * 4 / 2**20  # 32 MiB
    grad_mb = N * VV * 2 / 2**20  # bf16 gradient, 16 MiB
    for name in ("sampled", "entropy", "topk", "gather"):
        assert res[name] <= 1.5 * buf_mb + 1, res
    assert res["backward"] <= grad_mb + 1.5 * buf_mb + 2, res
    assert res["naive"] >= 1.5 * full_fp32_mb, res  # the measurement does see big allocations
