"""``tokentrust compare``: a grid of methods x seeds and its report."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def register(subparsers: Any) -> None:
    from tokentrust.study.grids import GRID_PRESETS, STUDIES

    p = subparsers.add_parser("compare", help="run a grid of methods x seeds and write report.md",
                              description="Runs every (method, seed) with identical data order, rollout budget and "
                                          "evaluation; finished runs are skipped and interrupted ones resumed.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted([*GRID_PRESETS, *STUDIES]), default=None,
                     help="named grid (default: demo), or a study: " + "; ".join(
                         f"{k} = {' then '.join(v)} into OUT/<grid>/" for k, v in STUDIES.items()))
    src.add_argument("--config", default=None, help="grid file (YAML/JSON/TOML): preset|config, methods, seeds, overrides")
    p.add_argument("--out", default=None, help="grid directory (default: runs/compare-<name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs in parallel, the cores' threads split between them (default: one per core on a CPU, "
                        "as memory allows; one on a GPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every run, e.g. --set max_steps=10")
    p.add_argument("--part", default=None, help="run only this part of the grid (its 'parts' key); the report "
                   "still covers every finished run")
    p.add_argument("--quiet", action="store_true", help="no progress output (the summary lines stay)")
    p.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokentrust.study.compare import load_grid, run_grid
    from tokentrust.study.grids import STUDIES
    from tokentrust.study.methods import METHODS
    from tokentrust.train.config import parse_set

    if args.list_methods:
        for name, entry in METHODS.items():
            print(f"{name:20s} {entry['family']:9s} {entry['description']}")
        return 0
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    command = "tokentrust " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.preset in STUDIES:
        if args.part is not None:
            raise ValueError(f"--part applies to one grid; use --preset {STUDIES[args.preset][0]} --part {args.part}")
        out = Path(args.out or f"runs/compare-{args.preset}")
        for name in STUDIES[args.preset]:
            run_grid(load_grid(name), out / name, workers=args.workers, overrides=parse_set(args.overrides),
                     command=command, quiet=args.quiet)
        return 0
    spec = load_grid(args.preset, args.config)
    out = args.out or f"runs/compare-{spec['name']}"
    run_grid(spec, out, workers=args.workers, overrides=parse_set(args.overrides), command=command,
             quiet=args.quiet, part=args.part)
    return 0
