"""The rollout weight fingerprint follows the weights that train: with LoRA the adapters, whose
updates leave the frozen base (and so a hash of a few base tensors) unchanged."""

from __future__ import annotations

import pytest
import torch

from tokentrust.train.rollout.weights import RolloutWeights, weight_fingerprint


def _lora_model() -> torch.nn.Module:
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokentrust.train.models import apply_lora

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return apply_lora(LlamaForCausalLM(cfg), r=2, target_modules=["q_proj", "v_proj"])


def _frozen_but_one() -> torch.nn.Module:
    """Eight layers with only the third trainable: not among 4 evenly spaced parameter tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(8)])
    model.requires_grad_(False)
    model[2].weight.requires_grad_(True)
    return model


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("build", [_lora_model, _frozen_but_one])
def test_a_change_to_any_trainable_tensor_changes_the_fingerprint(build):
    model = build()
    trainable = _trainable(model)
    assert trainable and len(trainable) < len(list(model.parameters()))
    before = weight_fingerprint(model)
    for name, p in trainable:
        with torch.no_grad():
            p.view(-1)[-1] += 1e-3
        assert weight_fingerprint(model) != before, f"an update of {name} left the fingerprint unchanged"
        with torch.no_grad():
            p.view(-1)[-1] -= 1e-3


@pytest.mark.parametrize("build", [_lora_model, _frozen_but_one])
def test_rollout_copy_matches_the_learner_after_a_sync(build):
    learner = build()
    weights = RolloutWeights(learner, own_copy=True)
    assert weights.fingerprint == weight_fingerprint(learner)
    with torch.no_grad():  # an "optimizer step" on the adapters only
        for _, p in _trainable(learner):
            p.add_(0.01)
    assert weight_fingerprint(learner) != weights.fingerprint  # the copy has not seen the update
    weights.sync(learner, 1)
    assert weights.fingerprint == weight_fingerprint(learner)
    for (n, a), (m, b) in zip(learner.named_parameters(), weights.model.named_parameters()):
        assert n == m and torch.equal(a, b)
