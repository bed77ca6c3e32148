"""Convert GSM8K jsonl (question / answer with '#### N') to verl's parquet layout.

    python examples/verl/prepare_gsm8k.py --src ../shared/data/gsm8k --out data/verl_gsm8k

Rows follow verl's own examples/data_preprocess/gsm8k.py, so verl's built-in GSM8K scorer
(data_source "openai/gsm8k": last '#### N' in the response, exact string match) applies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def convert(src: Path, split: str) -> pd.DataFrame:
    rows = []
    with open(src / f"{split}.jsonl") as f:
        for i, line in enumerate(f):
            ex = json.loads(line)
            rows.append({
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"{ex['question']} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": gold(ex["answer"])},
                "extra_info": {"split": split, "index": i, "question": ex["question"], "answer": ex["answer"]},
            })
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="../shared/data/gsm8k", help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--out", default="data/verl_gsm8k")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        df = convert(Path(args.src), split)
        df.to_parquet(out / f"{split}.parquet")
        print(f"{split}: {len(df)} rows -> {out / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
