"""An upper bound on what stacking seeds in one process could save in the learner (CPU time).

    python benchmarks/seed_stacking_bound.py

Stacking k seeds (``torch.func``) would run k minibatches through k weight copies at once. The
cheapest such pass is k minibatches through one forward + backward with the same weights (one
larger matmul per layer, one set of per-op overheads), so the CPU time per seed-minibatch of that
pass bounds what stacking can gain from below. Shapes of the study preset: tiny Llama (hidden 128,
2 layers, vocab 512), 32 rows over 14 distinct prompts of 40-60 tokens, responses of 10-48 tokens.
1 thread, min of 3 passes over 6 batches. A script, not an assertion.
"""
import torch
from tiny_shapes import fwd_bwd_cpu_s, study_batch, tiny_model

from tokentrust.train.machine import machine_summary
from tokentrust.train.packed import build_layout, packed_hidden

torch.set_num_threads(1)
model = tiny_model()


def cost(k: int) -> float:
    """CPU s of one forward + backward over k seeds' minibatches (their prompts are distinct)."""
    layouts = []
    for s in range(6):
        parts = [study_batch(100 * s + j) for j in range(k)]
        layouts.append(build_layout(*(torch.cat([p[i] for p in parts]) for i in range(4))))
    return fwd_bwd_cpu_s(packed_hidden, model, layouts)


print(machine_summary())
c1, c2, c4 = cost(1), cost(2), cost(4)
print(f"CPU ms per seed-minibatch: 1 seed {c1*1000:.1f}, 2 seeds together {c2/2*1000:.1f}, 4 together {c4/4*1000:.1f}")
