"""tokentrust's trainer vs TRL's GRPOTrainer (our TokenTrustGRPOTrainer subclass), same work, on CPU.

Both train the same randomly initialised Llama (default: hidden 256, 15 layers, 28.6M parameters
with the GPT-2-size vocabulary of 50257 tokens; a byte-level tokenizer of that size is built
locally, nothing is downloaded) with the same loss (DPPO Binary-TV, delta 0.15, no IS cap) on
8 prompts x 8 samples x 64 new tokens per batch and two optimizer updates per batch:

    ours  tokentrust.train.loop.Trainer: ppo_epochs=2, minibatches=1, anchor on the rollout log-probs
    trl   TokenTrustGRPOTrainer: num_iterations=2, per_device_train_batch_size=64, loss_type=dapo
          (TRL also recomputes old_per_token_logps once per batch: one extra no-grad forward)

Each engine runs in its own subprocess (same thread count); one warm-up batch is excluded and
the median over the measured batches is printed, in wall time and in the engine's CPU time
(``time.process_time``; with one thread it hardly moves with other load on the machine). Needs the integrations venv (TRL):

    .venv-integrations/bin/python benchmarks/vs_trl.py [--batches 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokentrust.train.machine import machine_summary

PROMPTS, SAMPLES, NEW_TOKENS, LR, DELTA = 8, 8, 64, 1e-6, 0.15


def build_model(out: Path, hidden: int, layers: int, heads: int, vocab: int) -> int:
    """A random Llama + a byte-level BPE tokenizer with exactly `vocab` entries; returns #params."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|pad|>", "<|eos|>"]
    words = sorted(alphabet)
    pairs = (a + b for a in sorted(alphabet) for b in sorted(alphabet))
    while len(words) < vocab - len(specials):  # byte pairs fill the vocabulary up to the target size
        words.append(next(pairs))
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(specials + words)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[1],
                                   padding_side="left")
    assert len(fast) == vocab, len(fast)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def prompt_texts(n: int) -> list[str]:
    """The arith task's formatted prompts, as our trainer builds them (no chat template)."""
    from tokentrust.tasks import get_task

    task = get_task("arith", seed=0)
    return [task.prompt(ex) + "\n" for ex in task.examples("train")[:n]]


def run_ours(model_dir: str, batches: int) -> dict:
    from tokentrust.train.config import resolve
    from tokentrust.train.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = resolve(preset="tiny-arith", overrides={
            "out_dir": out, "seed": 0,
            "model": {"name": model_dir, "dtype": "float32", "device": "cpu"},
            "task": {"name": "arith", "eval_limit": 0},
            "rollout": {"prompts_per_step": PROMPTS, "group_size": SAMPLES, "max_new_tokens": NEW_TOKENS,
                        "temperature": 1.0, "top_p": 1.0},
            "algo": {"loss": "dppo-tv", "delta": DELTA, "is_cap": None, "agg": "token-mean"},
            "optim": {"lr": LR, "ppo_epochs": 2, "minibatches": 1, "micro_batch_size": 0},
            "log": {"progress": False, "tensorboard": False, "checkpoint_every": 0, "samples_every": 0}})
        trainer = Trainer(cfg, quiet=True)
        rows = []
        for _ in range(batches + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            rec = trainer.train_step()
            rows.append((time.perf_counter() - t0, time.process_time() - c0,
                         rec["response/length_mean"] * PROMPTS * SAMPLES))
        trainer.close()
    return {"batch_s": [r[0] for r in rows[1:]], "batch_cpu_s": [r[1] for r in rows[1:]],
            "tokens": [r[2] for r in rows[1:]]}


def run_trl(model_dir: str, batches: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.durations.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    data = Dataset.from_dict({"prompt": prompt_texts(PROMPTS * (batches + 1))})
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TokenTrustGRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, seed=0, report_to="none", save_strategy="no", logging_steps=1,
            per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
            max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, num_iterations=2,
            max_steps=2 * (batches + 1), learning_rate=LR, beta=0.0, loss_type="dapo", shuffle_dataset=False,
            tokentrust_loss="dppo-tv", tokentrust_delta=DELTA, disable_tqdm=True)
        trainer = TokenTrustGRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [
            float(len(c)) for c in completions], args=args, train_dataset=data, callbacks=[clock])
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    def per_batch(xs: list[float]) -> list[float]:  # two optimizer steps (num_iterations=2) per batch
        return [xs[i] + xs[i + 1] for i in range(0, len(xs), 2)][1:]

    return {"batch_s": per_batch(clock.durations), "batch_cpu_s": per_batch(clock.cpu),
            "tokens": [x * PROMPTS * SAMPLES for x in lengths[1:]]}


def child(engine: str, model_dir: str, batches: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    res = (run_ours if engine == "ours" else run_trl)(model_dir, batches)
    print("RESULT " + json.dumps(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2, help="measured batches after one warm-up batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--engines", default="ours,trl")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batches, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp), args.hidden, args.layers, args.heads, args.vocab)
        print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
              f"{n_params / 1e6:.1f}M parameters; {PROMPTS} prompts x {SAMPLES} samples x {NEW_TOKENS} new tokens, "
              f"2 updates per batch, {args.threads} threads", flush=True)
        results = {}
        for engine in args.engines.split(","):
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
            out = subprocess.run([sys.executable, __file__, "--child", engine, tmp, "--batches", str(args.batches),
                                  "--threads", str(args.threads)], capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            results[engine] = json.loads(line[-1][len("RESULT "):])
    import torch

    torch.set_num_threads(args.threads)  # as each engine's process does, so the line names their threads
    print(f"\n{machine_summary()}")
    print("\n| engine | s / batch (median) | CPU s / batch | new tokens / batch | new tokens/s | new tokens / CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    rate, cpu_rate = {}, {}
    for engine, r in results.items():
        t, c, n = (statistics.median(r[k]) for k in ("batch_s", "batch_cpu_s", "tokens"))
        rate[engine], cpu_rate[engine] = n / t, n / c
        print(f"| {engine} | {t:.2f} | {c:.2f} | {n:.0f} | {rate[engine]:.1f} | {cpu_rate[engine]:.1f} |")
    if {"ours", "trl"} <= set(rate):
        print(f"\nthroughput ratio ours / trl: {rate['ours'] / rate['trl']:.2f}x (wall), "
              f"{cpu_rate['ours'] / cpu_rate['trl']:.2f}x (CPU time: hardly moved by other load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
