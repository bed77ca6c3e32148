"""Eager vs ``torch.compile`` for the packed learner forward + backward of the tiny model (CPU time).

    python benchmarks/compile_learner.py mlp    # compile only the MLP block (norm, gate/up, silu * up, down)
    python benchmarks/compile_learner.py full   # compile the whole packed forward (dynamic shapes)

The study preset's shapes: the 2-layer tiny Llama (hidden 128, vocab 512), minibatches of 32 rows over
14 distinct prompts of 40-60 tokens and responses of 10-48 tokens; eight such minibatches, each
shape different, as in training. Prints CPU ms per minibatch (min over 3 passes, 1 thread) for
both, the one-off compile cost and the largest difference of the hidden states. A script, not an
assertion: the numbers belong to the machine it runs on.
"""
import sys
import time

import torch
import torch.nn.functional as F

from tiny_shapes import fwd_bwd_cpu_s, study_batch, tiny_model

from tokentrust.train import packed
from tokentrust.train.packed import _rms_norm, build_layout, packed_hidden

torch.set_num_threads(1)
model = tiny_model()
lays = [build_layout(*study_batch(s)) for s in range(8)]


def timeit(fn) -> float:
    return fwd_bwd_cpu_s(fn, model, lays)


mode = sys.argv[1] if len(sys.argv) > 1 else "mlp"
assert mode in ("mlp", "full"), "usage: compile_learner.py [mlp|full]"
eager = timeit(packed_hidden)
print(f"eager: {eager*1000:.1f} ms CPU per minibatch fwd+bwd", flush=True)
if mode == "full":
    fn = torch.compile(packed_hidden, dynamic=True)
else:  # compile only the MLP block (norm, gate/up, silu*up, down, residual)
    def mlp_block(x, ln_w, wg, wu, wd, eps: float):
        var = x.pow(2).mean(-1, keepdim=True)
        hn = x * torch.rsqrt(var + eps) * ln_w
        gate, up = F.linear(hn, torch.cat([wg, wu])).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, wd)
    cmlp = torch.compile(mlp_block, dynamic=True)
    def fn(model, lay, block=cmlp):
        body = model.model
        heads = model.config.num_attention_heads
        dims = packed._Heads(heads, heads, model.config.hidden_size // heads)
        x = body.embed_tokens(lay.tokens)
        cos, sin = packed._rotary(model, lay.positions, x.dtype)
        last = len(body.layers) - 1
        for i, layer in enumerate(body.layers):
            a = packed._attention(layer.self_attn, _rms_norm(x, layer.input_layernorm), cos, sin, lay, dims, last=i == last)
            if i == last:
                x = torch.cat([x[lay.last_prompt], x[lay.num_prompt_tokens:]])
            x = x + a
            m = layer.mlp
            x = block(x, layer.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                      layer.post_attention_layernorm.variance_epsilon)
        return _rms_norm(x[lay.predict_from], body.norm)
t0 = time.process_time(); w0 = time.time()
try:
    fwd_bwd_cpu_s(fn, model, lays, reps=1)
except Exception as err:  # inductor cannot compile every graph with dynamic shapes
    print(f"compile failed ({mode}): {type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}")
    sys.exit(0)
print(f"compile+first pass: {time.process_time()-t0:.1f} CPU s, {time.time()-w0:.1f} wall s", flush=True)
comp = timeit(fn)
print(f"compiled ({mode}): {comp*1000:.1f} ms CPU per minibatch fwd+bwd; eager/compiled = {eager/comp:.2f}x", flush=True)
# agreement
with torch.no_grad():
    a, b = packed_hidden(model, lays[0]), fn(model, lays[0])
print("max |diff| hidden:", float((a - b).abs().max()))
