"""One TokenTrustGRPOTrainer step on a fixed batch, for test_integration_trl's multi-process check.

    accelerate launch --multi_gpu --num_processes N   (use_cpu=True: gloo) tests/integrations/trl_distributed_run.py MODEL_DIR OUT_DIR

Generation is replaced by a deterministic ``rollout_func`` (completion i of the global batch is a
function of i only), so a 1-process and an N-process run see the same 8 rows. Each process saves
what its loss call saw (rows, thresholds s_t, normalisers, loss) to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer

GLOBAL_BATCH = 8


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def fixed_rollout(prompts, trainer):
    """Completion of global row g: 2 + g % 5 tokens drawn (seed g) from 20 ids with Zipf weights."""
    tok = trainer.processing_class
    first = trainer.accelerator.process_index * len(prompts)
    completions = []
    for i in range(len(prompts)):
        g = torch.Generator().manual_seed(1000 + first + i)
        weights = 1.0 / torch.arange(1, 21, dtype=torch.float)  # skewed: batch frequencies differ by token
        completions.append((3 + torch.multinomial(weights, 2 + (first + i) % 5, replacement=True, generator=g)).tolist())
    return {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "completion_ids": completions, "logprobs": None}


class Recording(TokenTrustGRPOTrainer):
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        agg, divisor = self._tokentrust_agg(inputs, inputs["completion_mask"].shape[0], "train")
        self.recorded = {
            "world": self.accelerator.num_processes, "completion_ids": inputs["completion_ids"].cpu(),
            "completion_mask": inputs["completion_mask"].cpu(), "scale": inputs["tokentrust_scale"].cpu(),
            "advantages": inputs["advantages"].cpu(), "num_items_in_batch": float(inputs["num_items_in_batch"]),
            "global_tokens": float(agg["global_tokens"]), "divisor": float(divisor), "loss": float(loss.detach()),
            "ema_probs": self.tokentrust_schedule.state.probs.cpu(),
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}
        return loss


def main(model_dir: str, out_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": [f"the cat {i} sat" for i in range(16)]})
    trainer_world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    args = TokenTrustGRPOConfig(
        output_dir=f"{out_dir}/trainer", use_cpu=True, per_device_train_batch_size=GLOBAL_BATCH // trainer_world,
        num_generations=4, max_completion_length=8, max_steps=1, report_to="none", save_strategy="no", bf16=False,
        seed=0, learning_rate=1e-3, tokentrust_loss="dppo-tv",
        tokentrust_thresholds={"kind": "batch-frequency", "normalize": True, "beta": 1.0, "ema": 0.5})
    trainer = Recording(model=model_dir, reward_funcs=length_reward, args=args, train_dataset=data,
                        processing_class=tok, rollout_func=fixed_rollout)
    trainer.train()
    torch.save(trainer.recorded, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
