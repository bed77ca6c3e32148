"""The ``tokentrust`` command: train, eval, compare, report, vocab.

User errors (bad config values, malformed data, mismatched tables, damaged checkpoints) are
printed as one line without a traceback and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from tokentrust import __version__

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)


def build_parser() -> argparse.ArgumentParser:
    from tokentrust.commands import compare, evaluate, report, train, vocab

    parser = argparse.ArgumentParser(prog="tokentrust", description="RL of language models with per-token trust regions "
                                     "(PPO, DPPO, AV-DPPO, CPPO, DRPO).")
    parser.add_argument("--version", action="version", version=f"tokentrust {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, compare, report, vocab):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = os.environ.get("TOKENTRUST_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tokentrust: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tokentrust: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
