"""The no-trust-region control: the importance-weighted policy gradient ("pg-is").

Objective r_t A_t with r_t = pi_t / mu_t and no clip or mask, so every valid token keeps its
gradient sg(min(r_t, C)) A_t grad log pi_t (C = ``is_cap``; None = no truncation). This is
off-policy REINFORCE with (truncated) token-level importance sampling, verl's ``pg_is`` /
rollout-correction bypass mode with the policy-gradient loss (verl docs/algo/rollout_corr_math.md
s1.1, s3.2.2). A study runs it next to the trust-region losses to show whether any region
matters in a regime: where it is as stable as DPPO, the region did not act.
"""

from __future__ import annotations

import torch

from tokentrust.losses.core import LossOutput, aggregate, check_agg, prepare, standard_metrics, surrogate, truncated_weight
from tokentrust.losses.registry import register_loss


@register_loss("pg-is")
def pg_is_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               agg: str = "token-mean", is_cap: float | None = None, horizon: int | None = None,
               global_tokens: float | None = None, global_seqs: float | None = None) -> LossOutput:
    """-min(r, C) A per token, gradient -min(r, C) A d(log pi); nothing is masked (keep = mask).

    The reported value is the truncated objective (exactly -r A when ``is_cap`` is None), as
    DPPO's ratio surrogate reports it.
    """
    check_agg(agg)
    x = prepare(logp, behavior_logp, advantages, mask)
    weight = -(x.mask * truncated_weight(x.ratio, is_cap) * x.advantages)
    loss = aggregate(surrogate(x.logp, weight, weight), x.mask, agg, horizon=horizon,
                     global_tokens=global_tokens, global_seqs=global_seqs)
    return LossOutput(loss, x.mask.clone(), standard_metrics(x, x.mask, is_cap))
