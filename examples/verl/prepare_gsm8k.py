"""Write a tokentrust task (default GSM8K) in verl's parquet layout, scored by tokentrust.rewards.

    python examples/verl/prepare_gsm8k.py --src ../shared/data/gsm8k --out data/verl_gsm8k
    python examples/verl/prepare_gsm8k.py --task rg/countdown --option min_numbers=3 --out data/verl_countdown

Rows carry data_source "tokentrust/<task>", the gold answer as reward_model.ground_truth and, in
extra_info, the question, the example's meta and the task options; the config points verl's
custom reward at ``pkg://tokentrust.rewards`` (``compute_score``), so training is scored by the
same prompt template and bounded verifier as ``tokentrust train``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from tokentrust.train.config import parse_set
from tokentrust.rewards import verl_rows
from tokentrust.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="gsm8k", help="tokentrust task name (gsm8k, math500, arith, rg/<dataset>)")
    ap.add_argument("--src", default=None, help="task data folder (gsm8k / math500: train.jsonl, test.jsonl)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option, repeatable")
    ap.add_argument("--splits", default="train,test")
    ap.add_argument("--out", default="data/verl_gsm8k")
    args = ap.parse_args()
    options = parse_set(args.option)
    if args.src:
        options["data_dir"] = args.src
    task = get_task(args.task, **options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in args.splits.split(","):
        df = pd.DataFrame(verl_rows(task, split, options))
        df.to_parquet(out / f"{split}.parquet")
        print(f"{split}: {len(df)} rows -> {out / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
