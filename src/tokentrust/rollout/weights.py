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


def weight_fingerprint(model: torch.nn.Module, tensors: int = 4, sample: int = 1 << 14) -> str:
    """A cheap hash of the weights: a few parameter tensors (evenly spaced in definition order), each
    as a strided sample of at most ``sample`` values plus its float64 sum, so any update that
    changes those tensors changes the fingerprint. Values are hashed in float32, so an fp32 copy
    of a model has the fingerprint of its source."""
    params = [p for _, p in model.named_parameters()]
    if not params:
        return "no-params"
    picks = sorted({round(i * (len(params) - 1) / max(tensors - 1, 1)) for i in range(min(tensors, len(params)))})
    h = hashlib.sha1()
    with torch.no_grad():
        for i in picks:
            flat = params[i].detach().reshape(-1)
            stride = max(1, flat.numel() // sample)
            h.update(flat[::stride].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.sum(dtype=torch.float64))).encode())  # no float64 copy of the tensor
    return h.hexdigest()[:16]


class RolloutWeights:
    """The weights the sampler uses, with the policy version they hold (learner updates applied)."""

    def __init__(self, learner_model: torch.nn.Module, *, own_copy: bool, dtype: str = "same"):
        self.shared = not own_copy and dtype == "same"
        if self.shared:
            self.model = learner_model
        else:
            self.model = copy.deepcopy(learner_model).eval().requires_grad_(False)
            if dtype != "same":
                self.model.to(DTYPES[dtype])
        self.version = 0
        self.fingerprint = weight_fingerprint(self.model)

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
        self.fingerprint = weight_fingerprint(self.model)
