"""GRPO on GSM8K with TRL 1.16 and a tokentrust loss (TokenTrustGRPOTrainer).

    accelerate launch --config_file examples/trl/accelerate.yaml examples/trl/train_gsm8k.py \
        --model Qwen/Qwen2.5-0.5B-Instruct --output_dir runs/trl_gsm8k \
        --tokentrust_loss dppo-tv --tokentrust_delta 0.15 \
        --tokentrust_thresholds '{"kind": "frequency", "beta": 0.5, "normalize": true, "table": "freq.safetensors"}'

Every GRPOConfig flag works (``--use_vllm true --vllm_mode colocate`` to sample with vLLM, which
also makes the anchor mu the sampler's own log-probs); see docs/scaling.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser

from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class ScriptArguments:
    model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "hub id or local folder"})
    train_file: str = field(default="../shared/data/gsm8k/train.jsonl")
    max_train: int | None = field(default=None, metadata={"help": "use only the first N problems"})


def load_gsm8k(path: str, limit: int | None) -> Dataset:
    rows = []
    with open(path) as f:
        for line in f:
            ex = json.loads(line)
            gold = ex["answer"].split("####")[-1].strip().replace(",", "")
            rows.append({"prompt": [{"role": "user", "content": f"{ex['question']} {INSTRUCTION}"}], "gold": gold})
            if limit is not None and len(rows) >= limit:
                break
    return Dataset.from_list(rows)


def extract_answer(text: str) -> str | None:
    """The number after the last '####', else in the last \\boxed{}, else the last number."""
    for pattern in (r"####\s*(.+)", r"\\boxed\{([^{}]*)\}"):
        hits = re.findall(pattern, text)
        if hits:
            nums = NUMBER.findall(hits[-1])
            if nums:
                return nums[0].replace(",", "")
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def correctness_reward(completions, gold, **kwargs) -> list[float]:
    """1.0 when the extracted answer equals the gold number (numerically), else 0.0."""
    out = []
    for completion, g in zip(completions, gold):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        pred = extract_answer(text)
        try:
            out.append(float(pred is not None and abs(float(pred) - float(g)) < 1e-6))
        except ValueError:
            out.append(0.0)
    return out


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TokenTrustGRPOConfig)).parse_args_into_dataclasses()
    trainer = TokenTrustGRPOTrainer(model=script.model, reward_funcs=correctness_reward, args=args,
                                    train_dataset=load_gsm8k(script.train_file, script.max_train))
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
