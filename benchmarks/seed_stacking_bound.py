"""An upper bound on what stacking seeds in one process could save in the learner (CPU time).

    python benchmarks/seed_stacking_bound.py

Stacking k seeds (``torch.func``) would run k minibatches through k weight copies at once. The
cheapest such pass is k minibatches through one forward + backward with the same weights (one
larger matmul per layer, one set of per-op overheads), so the CPU time per seed-minibatch of that
pass bounds what stacking can gain from below. Shapes of the study preset: tiny Llama (hidden 128,
2 layers, vocab 512), 32 rows over 14 distinct prompts of 40-60 tokens, responses of 10-48 tokens.
1 thread, min of 3 passes over 6 batches. A script, not an assertion.
"""
import time

import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from tokentrust.train.packed import build_layout, packed_hidden
cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
cfg._attn_implementation = "sdpa"; torch.manual_seed(0); model = LlamaForCausalLM(cfg)
def batch(seed, U=14, N=32, P=64, T=48):
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(40, 60, (U,), generator=g); prompts = torch.randint(3, 512, (U, P), generator=g)
    pmask = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    which = torch.cat([torch.arange(U), torch.randint(0, U, (N - U,), generator=g)])
    rlen = torch.randint(10, T + 1, (N,), generator=g); rmask = (torch.arange(T)[None] < rlen[:, None]).long()
    return prompts[which] * pmask[which], pmask[which], torch.randint(3, 512, (N, T), generator=g) * rmask, rmask
def cost(k: int) -> float:
    """CPU s of one forward + backward over k seeds' minibatches (their prompts are distinct)."""
    lays = []
    for s in range(6):
        parts = [batch(100 * s + j) for j in range(k)]
        lays.append(build_layout(*(torch.cat([p[i] for p in parts]) for i in range(4))))
    best = 1e9
    for _ in range(3):
        t0 = time.process_time()
        for lay in lays:
            h = packed_hidden(model, lay); model.get_output_embeddings()(h).logsumexp(-1).mean().backward()
        best = min(best, (time.process_time() - t0) / len(lays))
    return best
from tokentrust.train.machine import machine_summary

print(machine_summary())
c1, c2, c4 = cost(1), cost(2), cost(4)
print(f"CPU ms per seed-minibatch: 1 seed {c1*1000:.1f}, 2 seeds together {c2/2*1000:.1f}, 4 together {c4/4*1000:.1f}")
