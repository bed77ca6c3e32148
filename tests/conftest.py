"""Shared fixtures: a session-wide cache (tiny models, frequency tables) and a fast tiny config."""

from __future__ import annotations

import os

# Spinning OpenMP threads stall badly when subprocess-based tests or other jobs share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Keep built artefacts out of ~/.cache during tests (but share them within the session)."""
    if "TOKENTRUST_CACHE" not in os.environ:
        os.environ["TOKENTRUST_CACHE"] = str(tmp_path_factory.mktemp("tt-cache"))
    yield


def tiny_overrides(out_dir, **extra):
    """A seconds-long tiny-arith run: a 1-layer model, 2 prompts x 2 samples, short responses."""
    over = {
        "out_dir": str(out_dir),
        "max_steps": 2,
        "model": {"tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2, "tiny_vocab": 320, "sft_steps": 30},
        "task": {"eval_limit": 4, "eval_samples": 2, "options": {"num_train": 64, "num_test": 16}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 12},
        "optim": {"lr": 1e-3, "ppo_epochs": 2, "minibatches": 2},
        "log": {"checkpoint_every": 1, "samples_every": 1, "progress": False, "tensorboard": False},
    }
    from tokentrust.train.config import deep_merge

    return deep_merge(over, extra)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, oversubscribed machine
    OpenMP's spin-waiting makes two threads up to ~100x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_script(name: str):
    """A module of scripts/ (not a package) loaded by path, e.g. load_script("gain_table")."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
