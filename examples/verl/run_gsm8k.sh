#!/usr/bin/env bash
# GRPO on GSM8K with verl 0.9.1 and a tokentrust loss (AV-DPPO with a corpus-frequency schedule).
#
# Needs GPUs and verl's GPU extras (vLLM, flash-attn): `pip install "verl[vllm]==0.9.1"` on a CUDA
# machine, plus tokentrust itself (`pip install -e .`) on EVERY node: verl imports the plugin in
# every Ray worker. The CPU venv of scripts/setup_integrations.sh is for tests only.
#
#   TT_MODEL=Qwen/Qwen2.5-0.5B-Instruct TT_GPUS=8 bash examples/verl/run_gsm8k.sh [key=value ...]
#
# Multi-GPU (one node): TT_GPUS=<n>. Multi-node: start Ray first (`ray start --head` on node 0,
# `ray start --address=<head-ip>:6379` on the others, same venv and paths everywhere), then run
# this script on the head node with TT_NODES=<nodes> TT_GPUS=<gpus per node>. The frequency table
# and the parquet files must be readable at the same path on all nodes (shared FS). Extra
# arguments are hydra overrides, e.g. actor_rollout_ref.actor.policy_loss.loss_mode=tt_dppo_tv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export TT_MODEL="${TT_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
export TT_DATA_DIR="${TT_DATA_DIR:-$ROOT/data/verl_gsm8k}"
export TT_FREQ_TABLE="${TT_FREQ_TABLE:-$ROOT/data/freq_$(basename "$TT_MODEL").safetensors}"
GSM8K_SRC="${GSM8K_SRC:-$ROOT/../shared/data/gsm8k}"

# 1. data in verl's parquet layout (once)
[[ -f "$TT_DATA_DIR/train.parquet" ]] || python "$ROOT/examples/verl/prepare_gsm8k.py" --src "$GSM8K_SRC" --out "$TT_DATA_DIR"

# 2. the corpus frequency table for the model's tokenizer (once): GSM8K train questions + solutions
[[ -f "$TT_FREQ_TABLE" ]] || tokentrust vocab build --tokenizer "$TT_MODEL" --input "$GSM8K_SRC/train.jsonl" \
  --field question,answer --out "$TT_FREQ_TABLE"

# 3. train. The tt_* losses are registered in every process by tokentrust's `verl.plugins` entry
#    point; the config also forwards VERL_USE_EXTERNAL_MODULES to the Ray workers (same effect).
export VERL_USE_EXTERNAL_MODULES="${VERL_USE_EXTERNAL_MODULES:-tokentrust.integrations.verl}"
python -m verl.trainer.main_ppo \
  --config-path="$ROOT/examples/verl/config" --config-name=tokentrust_gsm8k \
  "$@"
