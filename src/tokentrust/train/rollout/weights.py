"""The rollout side's copy of the policy weights: version, fingerprint, weight sync.

With bounded staleness the sampler and the learner hold different weights: the learner trains
version t while batches are sampled by version t - k. ``RolloutWeights`` keeps the sampler's
model (its own copy, optionally in another dtype such as bfloat16, which also makes the
training-inference mismatch that rollout engines like vLLM introduce) and receives a weight sync
after each learner step. When neither staleness nor a dtype change asks for a copy, it shares
the learner's model and a sync only records the version (today's synchronous loop, bit for bit).
"""

from __future__ import annotations

import copy
import hashlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint_names(model: torch.nn.Module) -> list[str]:
    """The parameters a fingerprint hashes: the trainable ones when there are any (with LoRA the
    adapters, since the frozen base never changes), else all of them."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.requires_grad] or [n for n, _ in named]


def weight_fingerprint(model: torch.nn.Module, names: list[str] | None = None, sample: int = 1 << 14) -> str:
    """A cheap hash of the parameters ``names`` (default ``fingerprint_names(model)``): each tensor's
    float64 sum plus a strided sample (``sample`` values over all tensors), so an update that changes
    any of them changes the fingerprint. Values are hashed in float32, so an fp32 copy of a model
    has the fingerprint of its source when both hash the same names."""
    params = dict(model.named_parameters())
    names = fingerprint_names(model) if names is None else names
    if not names:
        return "no-params"
    per = max(1, sample // len(names))
    with torch.no_grad():
        flats = [params[n].detach().reshape(-1) for n in names]
        device = flats[0].device
        sums = torch.stack([f.sum(dtype=torch.float64).to(device) for f in flats])  # no float64 copies
        picks = torch.cat([f[::max(1, f.numel() // per)].float().to(device) for f in flats])
        h = hashlib.sha1(picks.cpu().numpy().tobytes())
        h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class RolloutWeights:
    """The weights the sampler uses, with the policy version they hold (learner updates applied)."""

    def __init__(self, learner_model: torch.nn.Module, *, own_copy: bool, dtype: str = "same"):
        self.shared = not own_copy and dtype == "same"
        self.names = fingerprint_names(learner_model)  # the learner's trainable ones (a copy has none)
        if self.shared:
            self.model = learner_model
        else:
            self.model = copy.deepcopy(learner_model).eval().requires_grad_(False)
            if dtype != "same":
                self.model.to(DTYPES[dtype])
        self.version = 0
        self.fingerprint = weight_fingerprint(self.model, self.names)

    def sync(self, learner_model: torch.nn.Module, version: int) -> None:
        """Copy the learner's weights in (cast to this copy's dtype) and record their version."""
        if not self.shared:
            with torch.no_grad():
                own = dict(self.model.named_parameters())
                for name, p in learner_model.named_parameters():
                    own[name].copy_(p.detach())
                own_buffers = dict(self.model.named_buffers())
                for name, b in learner_model.named_buffers():
                    if name in own_buffers:
                        own_buffers[name].copy_(b)
        self.version = version
        self.fingerprint = weight_fingerprint(self.model, self.names)
