"""``tokentrust report GRID_DIR``: rebuild report.md, summary.csv and the plots of a grid."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="rebuild the report of a compare grid directory")
    p.add_argument("grid_dir", help="directory written by `tokentrust compare`")
    p.add_argument("--baseline", default="dppo-tv", help="method the paired differences are taken against")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokentrust.study.report.build import build_report

    print(f"report: {build_report(args.grid_dir, baseline=args.baseline)}")
    return 0
