"""``tokentrust eval``: greedy pass@1, mean@k and pass@k of any model on a task's test split."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on gsm8k, math500, arith or rg/<dataset>")
    p.add_argument("--model", required=True, help="hub id, local folder (e.g. RUN_DIR/final_model), 'smollm2' or 'tiny'")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    p.add_argument("--task", required=True, help="gsm8k, math500, arith or rg/<reasoning-gym dataset> (rg extra)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: ../shared/data/<task> or the hub)")
    p.add_argument("--task-option", dest="task_options", action="append", default=[], metavar="KEY=VALUE",
                   help="task constructor option, e.g. --task-option steps=1 --task-option max_operand=10 (arith)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--samples", type=int, default=4, help="k samples per problem for mean@k / pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--out", default="runs/eval", help="writes results.json and problems.jsonl here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokentrust.train.config import parse_set, resolve
    from tokentrust.study.evaluate import evaluate
    from tokentrust.train.models import load_model_and_tokenizer
    from tokentrust.train.policy import build_policy
    from tokentrust.tasks import get_task
    from tokentrust.train.loop import select_device

    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0 (0: greedy only), got {args.samples}")
    options = parse_set(args.task_options)
    if args.data_dir:
        options["data_dir"] = args.data_dir
    task = get_task(args.task, **options)
    task.examples(args.split)  # read and check the data before the (slow) model load
    device = select_device(args.device)
    if args.model == "tiny":  # the tiny-arith warm start (built for the arith task)
        cfg = resolve(preset="tiny-arith")
        task_for_model = get_task("arith", **cfg.task.options)
        model, tokenizer = build_policy(cfg, task_for_model, device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=str(device),
                                                    gguf_file=args.gguf_file)
    results = evaluate(model, tokenizer, task, out_dir=args.out, split=args.split, limit=args.limit,
                       samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       seed=args.seed, batch_size=args.batch_size, backend=args.backend,
                       progress=not args.quiet)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=2))
    print(f"wrote {args.out}/results.json and {args.out}/problems.jsonl")
    return 0
