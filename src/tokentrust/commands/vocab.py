"""`tokentrust vocab build|show`: build a token-frequency table from a corpus, or inspect one."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tokentrust.train.tracking import Progress
from tokentrust.vocab import DEFAULT_EDGES, FrequencyTable, build_frequency_table, load_tokenizer


def _edges(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"edges must be comma-separated floats, got {text!r}") from None


def register(subparsers: Any) -> None:
    """Add the `vocab` command group to an argparse subparsers object."""
    p = subparsers.add_parser("vocab", help="token-frequency tables (build, show)")
    sub = p.add_subparsers(dest="vocab_command", required=True)

    b = sub.add_parser("build", help="count a corpus's tokens into a frequency table")
    b.add_argument("--tokenizer", required=True, help="hub id, folder, or .gguf file")
    b.add_argument("--gguf-file", default=None, help="GGUF file name inside the --tokenizer folder")
    b.add_argument("--input", nargs="+", required=True, help=".jsonl / .txt files or folders")
    b.add_argument("--field", default="text", help="JSONL field(s), comma-separated to concatenate")
    b.add_argument("--out", default="table.safetensors", help="output .safetensors path")
    b.add_argument("--max-docs", type=int, default=None)
    b.add_argument("--batch-size", type=int, default=1000)
    b.add_argument("--tokenizer-name", default=None, help="name to record (default: --tokenizer)")
    b.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="malformed JSONL lines")
    b.add_argument("--text-unit", choices=["line", "file"], default="line", help="documents in text files")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=run_build)

    s = sub.add_parser("show", help="print a frequency table's summary and buckets")
    s.add_argument("table", help="a .safetensors table written by `vocab build`")
    s.add_argument("--tokenizer", default=None, help="decode token ids and check the table matches")
    s.add_argument("--gguf-file", default=None)
    s.add_argument("--top", type=int, default=20, help="how many most / least frequent tokens")
    s.add_argument("--edges", type=_edges, default=DEFAULT_EDGES, help="bucket mass edges, e.g. 0.5,0.8,0.95,0.99")
    s.add_argument("--alpha", type=float, default=1.0, help="add-alpha smoothing for rarity")
    s.set_defaults(func=run_show)


def run_build(args: argparse.Namespace) -> int:
    """Build and save a table; prints a one-paragraph summary."""
    tok = load_tokenizer(args.tokenizer, gguf_file=args.gguf_file)
    t0 = time.perf_counter()
    bar = Progress(None, "vocab build", "tokens", quiet=args.quiet)
    seen = [0]

    def counted(docs: int, tokens: int) -> None:
        bar.update(tokens - seen[0], f"{docs:,} docs")
        seen[0] = tokens

    table = build_frequency_table(
        tok,
        args.input,
        field=args.field,
        batch_size=args.batch_size,
        max_docs=args.max_docs,
        tokenizer_name=args.tokenizer_name or args.tokenizer,
        on_error=args.on_error,
        text_unit=args.text_unit,
        progress=counted,
    )
    bar.close()
    path = table.save(args.out)
    dt = time.perf_counter() - t0
    seen = int((table.counts > 0).sum())
    print(
        f"wrote {path}: {table.num_tokens:,} tokens from {table.meta['num_docs']:,} docs "
        f"({table.meta['skipped_lines']} malformed lines skipped), {seen:,}/{table.vocab_size:,} "
        f"token types seen, {dt:.1f}s; fingerprint {table.fingerprint[:16]}"
    )
    return 0


def _token_repr(tok: Any, i: int) -> str:
    if tok is None:
        return ""
    return json.dumps(tok.decode([i]), ensure_ascii=False)


def run_show(args: argparse.Namespace) -> int:
    """Print counts, metadata, most/least frequent tokens and the bucket table."""
    tok = load_tokenizer(args.tokenizer, gguf_file=args.gguf_file) if args.tokenizer else None
    table = FrequencyTable.load(args.table, tokenizer=tok)
    n = table.num_tokens
    rows = [
        ("table", args.table),
        ("tokenizer", f"{table.tokenizer_name} (vocab {table.vocab_size:,}, hash {table.tokenizer_hash[:12]})"),
        ("source", table.source),
        ("fingerprint", table.fingerprint),
        ("tokens", f"{n:,}   types seen {int((table.counts > 0).sum()):,}"),
        *[(f"meta.{k}", v) for k, v in sorted(table.meta.items())],
    ]
    if n:
        rho_ref = table.reference_rarity(alpha=args.alpha)
        rows.append(("rho_ref", f"{rho_ref:.3f} (mass-weighted mean of -log f, alpha={args.alpha:g})"))
    for label, value in rows:
        print(f"{label:<18} {value}")

    counts = table.counts
    rho = table.rarity(args.alpha)
    order = counts.argsort(descending=True, stable=True)
    seen_order = order[counts[order] > 0]
    k = min(args.top, seen_order.numel())
    for title, ids in (("most frequent", seen_order[:k]), ("least frequent seen", seen_order.flip(0)[:k])):
        print(f"\n{title}:")
        print("| id | count | share | rarity | token |\n|---:|---:|---:|---:|---|")
        for i in ids.tolist():
            c = int(counts[i])
            print(f"| {i} | {c:,} | {c / n:.2e} | {float(rho[i]):.2f} | {_token_repr(tok, i)} |")

    print("\nbuckets (by cumulative token mass, most frequent first):")
    edges = [0.0, *args.edges, 1.0]
    print("| bucket | mass range | types | share of mass |\n|---:|---|---:|---:|")
    for row in table.bucket_table(args.edges):
        i = row["bucket"]
        rng = f"{edges[i]:g}-{edges[i + 1]:g}" if i < len(edges) - 1 else "count = 0"
        print(f"| {i} | {rng} | {row['types']:,} | {row['mass']:.4f} |")
    return 0
