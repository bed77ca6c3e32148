"""RolloutBatch: what a rollout hands the trainer, including the behaviour policy mu.

Layout (N sequences, P prompt positions, T response positions, K recorded top-K entries):

* ``prompt_ids [N, P]`` left-padded, ``prompt_mask [N, P]`` 1 on real prompt tokens;
* ``response_ids [N, T]`` right-padded with the pad id, ``response_mask [N, T]`` 1 on generated
  tokens up to and including the EOS that ended the row;
* ``behavior_logp [N, T]`` float32 log mu(y_t | s_t) under the distribution the token was
  actually drawn from (after temperature and top-k / top-p filtering), 0 off the mask;
* optional ``behavior_topk_ids / behavior_topk_logp [N, T, K]``: mu's K most probable tokens with
  the sampled token forced in (it replaces the K-th when absent, as DPPO's Top-K divergence needs);
* optional ``behavior_entropy [N, T]``: entropy of mu at each step.

Masks are int64 0/1 (the Hugging Face attention-mask convention).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    """One batch of sampled responses with the behaviour log-probs recorded at sampling time."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    behavior_logp: torch.Tensor
    response_texts: list[str]
    num_generated_tokens: int
    behavior_topk_ids: torch.Tensor | None = None
    behavior_topk_logp: torch.Tensor | None = None
    behavior_entropy: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Return a copy with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def select(self, index: torch.Tensor | list[int]) -> RolloutBatch:
        """Rows ``index`` of the batch (for minibatching); padding columns are kept as they are."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v.index_select(0, idx.to(v.device))
        out["response_texts"] = [self.response_texts[i] for i in idx.tolist()]
        out["num_generated_tokens"] = int(out["response_mask"].sum())
        return replace(self, **out)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of [prompt + response], [N, P + T].

        Position ids are ``cumsum(mask) - 1`` (clamped at 0 on left padding), exactly what the
        sampler used, so a training forward on these inputs reproduces the sampling logits.
        Logits at columns ``P - 1 .. P + T - 2`` predict the response tokens.
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return input_ids, attention_mask, position_ids
