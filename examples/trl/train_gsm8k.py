"""GRPO on GSM8K with TRL 1.16 and a tokentrust loss (TokenTrustGRPOTrainer).

    accelerate launch --config_file examples/trl/accelerate.yaml examples/trl/train_gsm8k.py \
        --model Qwen/Qwen2.5-0.5B-Instruct --output_dir runs/trl_gsm8k \
        --tokentrust_loss dppo-tv --tokentrust_delta 0.15 \
        --tokentrust_thresholds '{"kind": "frequency", "beta": 0.5, "normalize": true, "table": "freq.safetensors"}'

Prompts and rewards come from tokentrust's gsm8k task (``tokentrust.rewards``): the same prompt
template and the same bounded verifier as ``tokentrust train``. Every GRPOConfig flag works
(``--use_vllm true --vllm_mode colocate`` to sample with vLLM, which also makes the anchor mu the
sampler's own log-probs); see docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser

from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer
from tokentrust.rewards import task_rows, trl_reward
from tokentrust.tasks import get_task


@dataclass
class ScriptArguments:
    model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "hub id or local folder"})
    task: str = field(default="gsm8k", metadata={"help": "any tokentrust task: gsm8k, arith, rg/countdown, ..."})
    data_dir: str | None = field(default=None, metadata={"help": "task data folder (default: ../shared/data/<task>)"})
    max_train: int | None = field(default=None, metadata={"help": "use only the first N problems"})
    answer_fallback: bool = field(default=True, metadata={"help": "also accept an unformatted final number"})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TokenTrustGRPOConfig)).parse_args_into_dataclasses()
    options = {"answer_fallback": script.answer_fallback}
    if script.data_dir:
        options["data_dir"] = script.data_dir
    task = get_task(script.task, **options)
    trainer = TokenTrustGRPOTrainer(model=script.model, reward_funcs=trl_reward(task), args=args,
                                    train_dataset=Dataset.from_list(task_rows(task, "train", script.max_train)))
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
