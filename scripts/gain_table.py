"""Per method of a grid: does it learn (gain over the warm start) and do the regions bind?

Reads a grid's summary.csv (written by `tokentrust report GRID_DIR`) and prints one markdown table:
seeds, greedy pass@1 and its gain over the `warm_start` row with a 95% t-interval over seeds,
rare-answer accuracy, training reward (first 10 -> last 10 steps), kept fraction of the trust
region (overall, most frequent bucket, rarest seen bucket), the share of sampled tokens the corpus
never holds, and entropy at the end. Then the masked fraction and mean |pi - mu| per frequency
bucket for every method, so "the regions act here" is read per bucket.

    python scripts/gain_table.py runs/pilot                 # after `tokentrust report runs/pilot`
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from tokentrust.study.inference import mean_interval


def _rows(grid: Path) -> list[dict[str, str]]:
    with open(grid / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _f(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return float("nan")


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def mean_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval over seeds (NaN bounds for fewer than two values): inference.mean_interval."""
    return mean_interval(xs, alpha=1 - level)


def gain_table(rows: list[dict[str, str]]) -> str:
    runs = [r for r in rows if r["kind"] == "run"]
    warm = next((r for r in rows if r["kind"] == "warm_start"), None)
    w = _f(warm, "eval/greedy_pass@1") if warm else float("nan")
    lines = [f"Warm start: greedy pass@1 {w:.3f}, rare-answer {_f(warm, 'eval/acc_rare_answer'):.3f}." if warm else
             "No warm_start row.", "",
             "| method | seeds | greedy pass@1 | gain over warm start [95% CI] | rare-answer | reward first 10 -> last 10 "
             "| kept | kept, most frequent | kept, rarest seen | unseen-token share | entropy last |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        col = lambda k: [_f(r, k) for r in rs]  # noqa: E731
        g, lo, hi = mean_ci([x - w for x in col("eval/greedy_pass@1")])
        lines.append(
            f"| {method} | {len(rs)} | {_mean(col('eval/greedy_pass@1')):.3f} | {g:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            f"{_mean(col('eval/acc_rare_answer')):.3f} | {_mean(col('train/reward_first10')):.2f} -> "
            f"{_mean(col('train/reward_last10')):.2f} | {_mean(col('trust_region/kept_frac')):.4f} | "
            f"{_mean(col('trust_region/kept_frac/bucket_0')):.4f} | {_mean(col('trust_region/kept_frac/bucket_4')):.4f} | "
            f"{_mean(col('coherence/unseen_token_share')):.4f} | {_mean(col('stability/entropy_last')):.3f} |")
    return "\n".join(lines)


def bucket_table(rows: list[dict[str, str]], epoch: int = 0) -> str:
    """Masked fraction and mean |pi - mu| per corpus-frequency bucket in PPO epoch `epoch`."""
    runs = [r for r in rows if r["kind"] == "run"]
    buckets = range(7)
    head = " | ".join(f"b{b} m / d" for b in buckets)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(buckets)]
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        cells = []
        for b in buckets:
            m = _mean([_f(r, f"trust_region/epoch_{epoch}/masked_frac/bucket_{b}") for r in rs])
            d = _mean([_f(r, f"trust_region/epoch_{epoch}/abs_diff_mean/bucket_{b}") for r in rs])
            cells.append(f"{m:.4f} / {d:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", type=Path, help="a grid directory with summary.csv")
    ap.add_argument("--epochs", type=int, default=2, help="PPO epochs to tabulate per bucket")
    args = ap.parse_args()
    rows = _rows(args.grid)
    print(gain_table(rows))
    for e in range(args.epochs):
        print(f"\nPPO epoch {e}: masked fraction m and mean |pi - mu| d per bucket (b0 most frequent ... b4 rarest "
              "seen, b5 unseen, b6 special)\n")
        print(bucket_table(rows, e))


if __name__ == "__main__":
    main()
