#!/usr/bin/env bash
# Create (or update) .venv-integrations: verl 0.9.1 + TRL 1.16.0 next to tokentrust.
# Idempotent: a stamp file records the hash of the pins, this script and pyproject.toml (entry
# points); re-running with all three unchanged is a no-op.
# Order matters: torch==2.13.0 (CPU wheel) FIRST, so no later resolve can pull a CUDA build.
# Usage: bash scripts/setup_integrations.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-integrations}"
PY="${PYTHON:-python3}"
REQ="$ROOT/requirements/integrations.txt"
STAMP="$VENV/.tokentrust-integrations.stamp"
start=$(date +%s)

want="$(cat "$REQ" "$0" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import verl, trl, tokentrust" 2>/dev/null; then
  echo "setup_integrations: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# 1. torch first, exact pin (never unpinned: that pulls a multi-GB CUDA build).
"${PIP[@]}" "torch==2.13.0"
# 2. verl + TRL + their full pinned dependency set; torch is held at the pin above.
"${PIP[@]}" -r "$REQ" "torch==2.13.0"
# 3. the repo itself, without its deps (math-verify[antlr4_13_2] conflicts with hydra's antlr 4.9);
#    its other runtime deps (numpy, transformers, tokenizers, safetensors, accelerate, tqdm) come from step 2.
"${PIP[@]}" --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import torch, verl, trl, transformers, tokentrust
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"torch {torch.__version__}  verl {verl.__version__}  trl {trl.__version__}  transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
echo "setup_integrations: done in $(( $(date +%s) - start )) s"
