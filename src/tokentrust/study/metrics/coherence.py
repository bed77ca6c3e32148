"""Coherence: the NLL of completions under a frozen reference model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _pad(seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(list(s), dtype=torch.long)
        sl = slice(width - len(t), width) if left else slice(0, len(t))
        ids[i, sl], mask[i, sl] = t, 1
    return ids, mask


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    response_ids: torch.Tensor | Sequence[Sequence[int]],
    response_mask: torch.Tensor | None = None,
    *,
    prompt_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> float:
    """Mean per-token NLL (nats) of responses under `model` given their prompts.

    Token-weighted over all valid response tokens. Tensors: prompts [B, P] (left-padded, with
    `prompt_mask`; all ones if omitted), responses [B, T] (right-padded, with `response_mask`).
    Lists of id sequences are padded here. Left padding is handled with explicit position ids.
    """
    if not isinstance(prompt_ids, torch.Tensor):
        prompt_ids, prompt_mask = _pad(prompt_ids, left=True)
    if not isinstance(response_ids, torch.Tensor):
        response_ids, rm = _pad(response_ids, left=False)
        response_mask = rm if response_mask is None else response_mask
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if response_mask is None:
        response_mask = torch.ones_like(response_ids)
    if prompt_ids.shape[1] == 0:
        raise ValueError("sequence_nll needs at least one prompt token to condition on")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    from tokentrust.train.packed import packed_response_logprobs, unsupported_reason

    try:
        if unsupported_reason(model) is None and bool((response_mask[:, 1:] <= response_mask[:, :-1]).all()):
            # the packed forward (no padding, each distinct prompt once): the same NLL up to rounding
            with torch.no_grad():
                for s in range(0, prompt_ids.shape[0], 64):
                    rm = response_mask[s : s + 64].long().to(device)
                    logp, _ = packed_response_logprobs(model, prompt_ids[s : s + 64].to(device),
                                                       prompt_mask[s : s + 64].long().to(device),
                                                       response_ids[s : s + 64].to(device), rm)
                    total -= float(logp.sum())
                    count += float(rm.sum())
            return total / count if count else float("nan")
        for s in range(0, prompt_ids.shape[0], batch_size):
            p, pm = prompt_ids[s : s + batch_size], prompt_mask[s : s + batch_size].long()
            r, rm = response_ids[s : s + batch_size], response_mask[s : s + batch_size].float()
            P, T = p.shape[1], r.shape[1]
            ids = torch.cat([p, r], 1).to(device)
            att = torch.cat([pm, torch.ones_like(r)], 1).to(device)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": att}
            if not bool(pm.all()):  # left padding: positions must start at the first real token
                kwargs["position_ids"] = (att.cumsum(1) - 1).clamp(min=0)
            logits = model(**kwargs).logits[:, P - 1 : P + T - 1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), r.to(device).reshape(-1), reduction="none"
            ).view(r.shape[0], T)
            rm = rm.to(device)
            total += float((nll * rm).sum())
            count += float(rm.sum())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")
