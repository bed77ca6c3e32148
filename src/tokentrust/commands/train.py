"""``tokentrust train``: one RL run from a preset / config file / --set overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    from tokentrust.train.presets import PRESETS

    p = subparsers.add_parser("train", help="train a policy with RL (default: the tiny-arith preset)",
                              description="Train one run. Precedence: preset < --config < --set < --out/--max-steps.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named configuration (default tiny-arith)")
    src.add_argument("--config", default=None, help="YAML, JSON or TOML config file (keys as in config.json; see examples/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set algo.loss=dppo-kl --set algo.thresholds.kind=frequency")
    p.add_argument("--out", default=None, help="run directory (default: the config's out_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="total RL steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokentrust.train.config import ConfigError, deep_merge, parse_set, resolve
    from tokentrust.train.loop import run_training

    overrides = parse_set(args.overrides)
    if args.out is not None:
        overrides["out_dir"] = args.out
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR")
        stored = Path(args.out) / "config.json"
        if not stored.exists():
            raise FileNotFoundError(f"--resume: {stored} not found (was the run started in this directory?)")
        base = json.loads(stored.read_text())
        cfg = resolve(base=deep_merge(base, overrides))
    else:
        cfg = resolve(preset=args.preset, file=args.config, overrides=overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = run_training(cfg, resume=args.resume, evaluate_at_end=not args.no_eval, quiet=args.quiet)
    results = out / "eval" / "results.json"
    print(f"run directory: {out}")
    if results.exists():
        r = json.loads(results.read_text())
        print(eval_line(r))
    return 0


def eval_line(r: dict) -> str:
    """One line of end-of-run results; a greedy-only evaluation (eval_samples 0) has no mean@k / pass@k."""
    line = f"eval {r['task']}/{r['split']}: greedy pass@1 {r['greedy_pass@1']:.3f}"
    if r.get("k"):
        line += f", mean@{r['k']} {r['mean@k']:.3f}, pass@{r['k']} {r['pass@k']:.3f}"
    return line
