"""Cost of the trust-region losses and of the chunked logit helpers, on CPU.

Table 1: forward+backward time of every registered loss relative to `ppo` on [B, T] tokens
(logp a leaf requiring grad, behaviour log-probs near it, [B] advantages, a random response
mask). AV-DPPO rows are `dppo-tv` with per-token thresholds from `tokentrust.thresholds`; the
threshold computation is inside the timed region. Top-K rows use K recorded log-probs.

Table 2: peak extra resident memory (and time) of `tokentrust.logits` helpers vs the naive
full-tensor computation on bf16 logits [rows, V]. Peak RSS is read from /proc/self/status
(VmHWM, reset through /proc/self/clear_refs before each case); glibc's malloc is pinned to a
fixed mmap threshold so freed tensors leave RSS (the script re-executes itself to set it).

    python benchmarks/loss_overhead.py [--rows 512] [--vocab 152064] [--chunk 64] [--repeats 21]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="sequences for the loss timing")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence for the loss timing")
    p.add_argument("--repeats", type=int, default=21, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--rows", type=int, default=512, help="B*T logit rows for the memory table")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--chunk", type=int, default=64, help="rows per chunk for the chunked helpers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# table 1: loss forward + backward time


def loss_cases(args, torch):
    """(label, callable) pairs; each callable runs one forward+backward and returns nothing."""
    from tokentrust.losses import available_losses, get_loss
    from tokentrust.thresholds import BatchFrequencyState, ThresholdSpec, compute_thresholds
    from tokentrust.vocab import FrequencyTable

    g = torch.Generator().manual_seed(args.seed)
    b, t, k, v = args.batch, args.seq_len, args.topk, args.vocab
    logp = (-torch.rand(b, t, generator=g) * 4).requires_grad_()
    behavior_logp = (logp.detach() + 0.05 * torch.randn(b, t, generator=g)).clamp(max=0)
    advantages = torch.randn(b, generator=g)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    # Top-K: mu's K log-probs from a random distribution over K + 1 outcomes ("other" keeps mass)
    mu_topk = torch.log_softmax(torch.randn(b, t, k + 1, generator=g) * 2, -1)[..., :k]
    pi_topk = (mu_topk + 0.05 * torch.randn(b, t, k, generator=g)).clamp(max=0)

    # a Zipf-shaped corpus table over the whole vocabulary, and token ids drawn from it
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    counts = (1e9 / ranks**1.1).long()
    counts[v // 2 :] = 0  # half of the vocabulary unseen, as in a small corpus
    table = FrequencyTable(counts, "synthetic-zipf", v, "none", "synthetic")
    rarity, rho_ref = table.rarity(), table.reference_rarity()
    ids = torch.multinomial(table.probabilities(), b * t, replacement=True, generator=g).view(b, t)
    entropy = torch.rand(b, t, generator=g) * 3

    def run(name, **params):
        def fn():
            logp.grad = None
            get_loss(name)(logp, behavior_logp, advantages, mask, **params).loss.backward()

        return fn

    def av(spec, **extra):
        state = BatchFrequencyState()

        def fn():
            logp.grad = None
            delta = compute_thresholds(spec, 0.15, ids, mask, rarity=rarity, rho_ref=rho_ref, entropy=entropy,
                                       vocab_size=v, state=state, **extra)
            get_loss("dppo-tv")(logp, behavior_logp, advantages, mask, delta=delta).loss.backward()

        return fn

    cases = []
    for name in sorted(available_losses(), key=lambda n: (n != "ppo", n)):
        if name.startswith("dppo-topk"):
            cases.append((f"{name} (K={k})", run(name, behavior_topk_logp=mu_topk, topk_logp=pi_topk)))
        else:
            cases.append((name, run(name)))
    cases += [
        ("AV-DPPO frequency, thresholds recomputed every call", av(ThresholdSpec(kind="frequency", beta=0.5))),
        ("AV-DPPO frequency, normalized", av(ThresholdSpec(kind="frequency", beta=0.5, normalize=True))),
        ("AV-DPPO batch-frequency, EMA 0.9", av(ThresholdSpec(kind="batch-frequency", beta=0.5, ema=0.9))),
        ("AV-DPPO combined (freq x entropy)", av(ThresholdSpec(kind="combined", beta=0.5))),
    ]
    spec = ThresholdSpec(kind="frequency", beta=0.5, normalize=True)
    fixed_delta = compute_thresholds(spec, 0.15, ids, mask, rarity=rarity, rho_ref=rho_ref)
    # What the trainer pays per optimizer step: thresholds depend on mu and the token ids only, so
    # they are computed once per rollout batch and the loss receives the precomputed [B, T] delta.
    cases.append((AV_PER_UPDATE, run("dppo-tv", delta=fixed_delta)))
    cases.append((THRESHOLDS_ALONE, lambda: compute_thresholds(
        spec, 0.15, ids, mask, rarity=rarity, rho_ref=rho_ref)))
    return cases


AV_PER_UPDATE = "AV-DPPO frequency, normalized: loss with precomputed [B, T] delta"
THRESHOLDS_ALONE = "  (frequency thresholds alone, once per rollout batch)"


def time_cases(cases, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per case. Cases are timed round-robin, so load from other processes on a
    shared machine hits all of them alike instead of skewing whichever ran during it."""
    for _ in range(warmup):
        for _, fn in cases:
            fn()
    times: dict[str, list[float]] = {label: [] for label, _ in cases}
    for _ in range(repeats):
        for label, fn in cases:
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(ts) for label, ts in times.items()}


def loss_table(args, torch) -> None:
    cases = loss_cases(args, torch)
    times = time_cases(cases, args.warmup, args.repeats)
    base = times["ppo"]
    print(f"\n### Loss forward+backward on [{args.batch}, {args.seq_len}] tokens "
          f"(median of {args.repeats} round-robin repeats, {args.threads} CPU thread(s))\n")
    print("| loss | ms | relative to ppo |\n|---|---:|---:|")
    for label, _ in cases:
        print(f"| {label} | {1e3 * times[label]:.2f} | {times[label] / base:.2f}x |")
    for updates in (1, 4):
        t = times[AV_PER_UPDATE] + times[THRESHOLDS_ALONE] / updates
        print(f"| AV-DPPO per optimizer step, thresholds amortised over {updates} update(s) per batch (derived) "
              f"| {1e3 * t:.2f} | {t / base:.2f}x |")


# ---------------------------------------------------------------------------------------------
# table 2: peak memory of chunked vs naive logit helpers


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_mb(fn) -> tuple[float, float]:
    """(peak RSS above the RSS before fn, seconds) for one call of fn; fn's result is dropped."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - base
    del out
    return peak, dt


def memory_table(args, torch) -> None:
    from tokentrust.logits import entropy_from_logits, sampled_logprobs, topk_logprobs

    n, v, c, k, temp = args.rows, args.vocab, args.chunk, args.topk, 0.9
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, v, generator=g, dtype=torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g)
    leaf = x.clone().requires_grad_()
    # warm up kernels and the allocator on a few rows
    small = x[:4].clone().requires_grad_()
    sampled_logprobs(small, ids[:4], temp, 2).sum().backward()
    entropy_from_logits(x[:4], temp, 2)
    topk_logprobs(x[:4], k, temp, 2)

    def naive_entropy():
        lp = torch.log_softmax(x.float() / temp, -1)
        return -(lp.exp() * lp).sum(-1)

    def naive_backward():
        torch.log_softmax(leaf.float() / temp, -1).gather(1, ids[:, None]).sum().backward()

    def loop_backward():  # the obvious chunk loop under autograd: keeps every chunk's fp32 copy
        parts = [torch.log_softmax(leaf[s : s + c].float() / temp, -1).gather(1, ids[s : s + c, None])
                 for s in range(0, n, c)]
        torch.cat(parts).sum().backward()

    def chunked_backward():
        sampled_logprobs(leaf, ids, temp, c).sum().backward()

    ops = [
        ("entropy", naive_entropy, lambda: entropy_from_logits(x, temp, c)),
        (f"top-{k} log-probs", lambda: torch.topk(torch.log_softmax(x.float() / temp, -1), k, -1),
         lambda: topk_logprobs(x, k, temp, c)),
        ("sampled_logprobs (forward)",
         lambda: torch.log_softmax(x.float() / temp, -1).gather(1, ids[:, None]),
         lambda: sampled_logprobs(x, ids, temp, c)),
        ("sampled_logprobs (forward+backward)", naive_backward, chunked_backward),
        ("  autograd chunk loop (forward+backward)", loop_backward, None),
    ]
    grad_mb = n * v * 2 / 2**20  # the bf16 d loss / d logits every backward must allocate
    buf_mb = c * v * 4 / 2**20
    print(f"\n### Peak extra RSS on bf16 logits [{n}, {v}] (input {n * v * 2 / 2**20:.0f} MB), chunk {c} rows "
          f"(one [chunk, V] fp32 buffer = {buf_mb:.1f} MB)\n")
    print("| op | naive MB | naive s | chunked MB | chunked s | (chunked - grad) / buffer |\n"
          "|---|---:|---:|---:|---:|---:|")
    for label, naive, chunked in ops:
        leaf.grad = None  # so the gradient each backward allocates is counted
        nm, nt = peak_extra_mb(naive)
        if chunked is None:
            print(f"| {label} | {nm:.0f} | {nt:.2f} | | | |")
            continue
        leaf.grad = None
        cm, ct = peak_extra_mb(chunked)
        unavoidable = grad_mb if "backward" in label else 0.0
        print(f"| {label} | {nm:.0f} | {nt:.2f} | {cm:.0f} | {ct:.2f} | {(cm - unavoidable) / buf_mb:.2f} |")
    print(f"\n(forward+backward rows include the bf16 gradient of the logits, {grad_mb:.0f} MB, "
          "which any method must allocate; grad = 0 for forward-only rows)")


def main() -> int:
    if sys.platform.startswith("linux") and MMAP_ENV not in os.environ:
        # Re-execute with a fixed mmap threshold so every large tensor is its own mapping.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "131072"})
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loss_table(args, torch)
    if sys.platform.startswith("linux"):
        memory_table(args, torch)
    else:
        print("\n(memory table skipped: needs Linux /proc)")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
