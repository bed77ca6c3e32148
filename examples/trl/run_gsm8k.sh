#!/usr/bin/env bash
# GRPO on GSM8K with TRL + a tokentrust loss, via `accelerate launch`. GPUs recommended;
# `NPROC=1 bash examples/trl/run_gsm8k.sh --use_cpu true --max_steps 2 --max_train 16` smoke-tests on CPU.
#   TT_MODEL=Qwen/Qwen2.5-0.5B-Instruct NPROC=8 bash examples/trl/run_gsm8k.sh [--flag value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TT_MODEL="${TT_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
TT_FREQ_TABLE="${TT_FREQ_TABLE:-$ROOT/data/freq_$(basename "$TT_MODEL").safetensors}"
GSM8K_SRC="${GSM8K_SRC:-$ROOT/../shared/data/gsm8k}"
[[ -f "$TT_FREQ_TABLE" ]] || tokentrust vocab build --tokenizer "$TT_MODEL" --input "$GSM8K_SRC/train.jsonl" \
  --field question,answer --out "$TT_FREQ_TABLE"
accelerate launch --config_file "$ROOT/examples/trl/accelerate.yaml" --num_processes "${NPROC:-8}" \
  "$ROOT/examples/trl/train_gsm8k.py" \
  --model "$TT_MODEL" --data_dir "$GSM8K_SRC" --output_dir "${OUT:-$ROOT/runs/trl_gsm8k}" \
  --loss_type dapo --num_generations 8 --per_device_train_batch_size 8 --max_completion_length 512 \
  --learning_rate 1e-6 --beta 0.0 --report_to none --logging_steps 1 \
  --tokentrust_loss dppo-tv --tokentrust_delta 0.15 \
  --tokentrust_thresholds "{\"kind\": \"frequency\", \"beta\": 0.5, \"normalize\": true, \"table\": \"$TT_FREQ_TABLE\"}" \
  "$@"
