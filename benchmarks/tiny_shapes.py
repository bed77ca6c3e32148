"""The study preset's learner shapes, shared by the learner micro-benchmarks (compile_learner.py,
seed_stacking_bound.py): the 2-layer tiny Llama (hidden 128, vocab 512) and minibatches of 32 rows
over 14 distinct prompts of 40-60 tokens with responses of 10-48 tokens."""

from __future__ import annotations

import time

import torch


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The study's tiny Llama, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def study_batch(seed: int, prompts: int = 14, rows: int = 32, prompt_width: int = 64, new_tokens: int = 48):
    """(prompt_ids, prompt_mask, response_ids, response_mask): left-padded prompts, each distinct
    prompt used by at least one row, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(40, 60, (prompts,), generator=g)
    ids = torch.randint(3, 512, (prompts, prompt_width), generator=g)
    pmask = (torch.arange(prompt_width)[None] >= (prompt_width - plen)[:, None]).long()
    which = torch.cat([torch.arange(prompts), torch.randint(0, prompts, (rows - prompts,), generator=g)])
    rlen = torch.randint(10, new_tokens + 1, (rows,), generator=g)
    rmask = (torch.arange(new_tokens)[None] < rlen[:, None]).long()
    return ids[which] * pmask[which], pmask[which], torch.randint(3, 512, (rows, new_tokens), generator=g) * rmask, rmask


def fwd_bwd_cpu_s(hidden_fn, model: torch.nn.Module, layouts: list, reps: int = 3) -> float:
    """CPU seconds per layout of forward (``hidden_fn(model, layout)``) + a logsumexp loss + backward;
    the minimum over ``reps`` passes."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        for lay in layouts:
            model.get_output_embeddings()(hidden_fn(model, lay)).logsumexp(-1).mean().backward()
        best = min(best, (time.process_time() - t0) / len(layouts))
    return best
