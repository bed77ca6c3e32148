"""The import paths users write (README, docs/, examples/, verl and TRL configs) resolve after the
layout change (tokentrust.train / tokentrust.study), and the old `tokentrust.config` path still
names the same objects."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "tokentrust.losses": ["get_loss", "available_losses", "register_loss", "NEEDS_PROX_LOGP", "needs_prox_logp",
                          "default_delta", "default_is_cap"],
    "tokentrust.thresholds": ["ThresholdSpec", "compute_thresholds"],
    "tokentrust.vocab": ["FrequencyTable", "TokenInfo", "build_frequency_table", "load_tokenizer", "special_token_ids",
                         "tokenizer_hash", "DEFAULT_EDGES", "VocabMismatchError", "rare_from", "num_buckets"],
    "tokentrust.tasks": ["get_task", "available_tasks", "Example", "Task", "Score"],
    "tokentrust.rewards": ["compute_score", "task_rows", "trl_reward", "verl_rows"],
    "tokentrust.integrations.verl": [],  # the verl plugin module (its config class needs verl itself)
    "tokentrust.cli": ["main"],
    "tokentrust.config": ["parse_set", "resolve", "deep_merge", "ConfigError", "RunConfig", "PRESETS",
                          "trainer_supplied_params", "default_delta", "default_is_cap"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_trl_integration_path():
    pytest.importorskip("trl")
    from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer  # noqa: F401


def test_old_config_path_is_the_new_module():
    import tokentrust.config as old
    from tokentrust.train import config as new
    from tokentrust.train import presets

    assert old.parse_set is new.parse_set and old.resolve is new.resolve and old.PRESETS is presets.PRESETS
