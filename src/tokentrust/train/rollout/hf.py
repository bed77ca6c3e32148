"""Our own KV-cached sampling loop for Hugging Face causal LMs, recording the behaviour policy mu.

Why not ``model.generate``: it either keeps nothing or keeps ``[N, T, V]`` scores, and the scores
it returns are not guaranteed to be the distribution the token was drawn from. This loop keeps only
``[N]`` (and ``[N, K]``) per step: the sampled token, its log-prob under the processed
distribution (temperature, then top-k, then top-p, as HF and vLLM apply them), optionally mu's
top-K and its entropy. The prompt is run once (prefill), every later step feeds one token per row
through the cache with explicit ``position_ids = cumsum(mask) - 1`` so left padding is exact.
Rows stop at EOS; finished rows are dropped from the batch (the cache is re-indexed) once enough
of them accumulate, and the loop ends when every row is done. Identical prompts (GRPO's G copies
of each prompt) are prefilled once and the cache is expanded.

Sampling is inverse-CDF with the caller's ``torch.Generator`` (see :func:`sample_from_logprobs`).
"""

from __future__ import annotations

import inspect

import torch

from tokentrust.train.packed import unsupported_reason
from tokentrust.train.rollout.base import RolloutBatch
from tokentrust.train.rollout.packed_decode import PackedDecoder


def processed_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> torch.Tensor:
    """log-softmax of the sampling distribution: logits / T, then top-k, then top-p; -inf off support.

    Top-p keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (a token is
    dropped when the mass of the tokens strictly more probable than it is already >= top_p), the
    same rule as HF's ``TopPLogitsWarper`` and vLLM's sampler.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        x = _top_p_filter(x, top_p)
    return torch.log_softmax(x, dim=-1)


def _top_p_filter(x: torch.Tensor, top_p: float, first_k: int = 256) -> torch.Tensor:
    """Set logits outside the nucleus to -inf. A full vocabulary sort is slow on CPU (~0.2 s for
    64 x 50k), so sort only the top ``k`` candidates, growing k until they hold >= top_p of the
    mass in every row (then the nucleus lies inside them); k = V is the plain full sort."""
    V = x.shape[-1]
    log_z = torch.logsumexp(x, dim=-1, keepdim=True).double()
    k = first_k
    while True:
        if 4 * k >= V:
            vals, idx = torch.sort(x, dim=-1, descending=True)
        else:
            vals, idx = torch.topk(x, k, dim=-1)  # sorted, descending
        probs = (vals.double() - log_z).exp()  # float64 cumsum: a boundary free of summation error
        mass_before = probs.cumsum(-1) - probs
        if vals.shape[-1] == V or bool((mass_before[..., -1] + probs[..., -1] >= top_p).all()):
            break
        k *= 16
    drop = mass_before >= top_p
    drop[..., 0] = False  # always keep the most probable token
    return torch.full_like(x, float("-inf")).scatter(-1, idx, vals.masked_fill(drop, float("-inf")))


def force_into_topk(topk_ids: torch.Tensor, topk_logp: torch.Tensor, token: torch.Tensor,
                    token_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the sampled token into a top-K set: if absent, it replaces the K-th entry (DPPO Top-K)."""
    present = (topk_ids == token.unsqueeze(-1)).any(-1)
    ids, lps = topk_ids.clone(), topk_logp.clone()
    ids[..., -1] = torch.where(present, ids[..., -1], token)
    lps[..., -1] = torch.where(present, lps[..., -1], token_logp)
    return ids, lps


def sample_from_logprobs(logp: torch.Tensor, generator: torch.Generator | None = None,
                         block: int = 256) -> torch.Tensor:
    """Draw one token per row from ``exp(logp)`` by two-level inverse CDF: pick a block of ``block``
    consecutive ids by its mass, then a token inside it, each with one float64 uniform and a binary
    search. Same distribution as ``torch.multinomial(probs, 1)`` (which accumulates in float64
    over the whole vocabulary and is ~10x slower on CPU for 50k vocabularies); a single float32
    cumsum would be fast but round away tokens with p below ~1e-7 of the running total. Zero
    probability (filtered) tokens and blocks are never returned (``right=True`` searches)."""
    n, V = logp.shape
    p = logp.float().exp()
    nb = -(-V // block)
    if nb * block != V:
        p = torch.nn.functional.pad(p, (0, nb * block - V))
    p = p.view(n, nb, block)
    u = torch.rand((n, 2), generator=generator, device=logp.device, dtype=torch.float64)
    cdf = p.sum(-1).double().cumsum(-1)  # [n, nb]; a float32 sum of 256 terms is accurate to ~1e-6
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise FloatingPointError("non-finite logits while sampling")
    b = _search(cdf, u[:, :1]).clamp_max(nb - 1)
    inner = p[torch.arange(n, device=p.device), b].double().cumsum(-1)  # [n, block]
    return b * block + _search(inner, u[:, 1:])


def _search(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i] (a zero-width entry is never hit)."""
    x = u * cdf[:, -1:]
    x = torch.where(x >= cdf[:, -1:], torch.zeros_like(x), x)  # u * total can round up to total
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def eos_token_ids(model: torch.nn.Module | None, tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation config names none")
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """Pad id: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad lists of ids into ``(ids [N, P], mask [N, P])``."""
    if not token_lists:
        raise ValueError("no prompts given")
    width = max(len(t) for t in token_lists)
    if width == 0:
        raise ValueError("empty prompt: every prompt needs at least one token")
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if not toks:
            raise ValueError(f"prompt {i} tokenizes to nothing")
        ids[i, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[i, width - len(toks):] = 1
    return ids, mask


def _logits_kwarg(model: torch.nn.Module) -> str | None:
    """Name of the forward kwarg that limits logits to the last positions, if the model has one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def _reorderable(cache) -> bool:
    """Caches whose rows we may re-index (drop finished rows, expand deduplicated prompts)."""
    return type(cache).__name__ == "DynamicCache" and hasattr(cache, "reorder_cache")


class _HFDecoder:
    """The model's own KV cache (``DynamicCache``, re-indexed to drop finished rows when it can be)."""

    def __init__(self, rollout: HFRollout, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        n, self.prompt_width = prompt_ids.shape
        self.model = rollout.model
        self.use_mask = not bool(prompt_mask.all())  # no padding: let the model use its plain causal path
        self.attn = torch.cat([prompt_mask, prompt_mask.new_ones((n, max_new_tokens))], dim=1)
        self.extra = {rollout._logits_kwarg: 1} if rollout._logits_kwarg else {}
        self.cache, self.logits = rollout._prefill(prompt_ids, prompt_mask, self.use_mask, self.extra)
        self.can_compact = _reorderable(self.cache)
        self.next_pos = prompt_mask.sum(-1, keepdim=True)  # position id of the next token, [n, 1]

    def keep(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.attn, self.next_pos = self.attn[index], self.next_pos[index]

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        out = self.model(input_ids=tokens.unsqueeze(1),
                         attention_mask=self.attn[:, :self.prompt_width + t + 1] if self.use_mask else None,
                         position_ids=self.next_pos, past_key_values=self.cache, use_cache=True, **self.extra)
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :]


class HFRollout:
    """Batched sampling from a HF causal LM that records mu (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, record_topk: int = 0, record_entropy: bool = False,
                 add_special_tokens: bool = True, stop_token_ids: list[int] | None = None,
                 compact: bool = True, dedup_prompts: bool = True, packed: bool = True):
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or record_topk < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, record_topk >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.record_topk, self.record_entropy = int(record_topk), bool(record_entropy)
        self.add_special_tokens = add_special_tokens
        self.compact, self.dedup_prompts = compact, dedup_prompts
        self.packed = packed  # PackedDecoder for the models tokentrust.train.packed supports
        self.eos_ids = list(stop_token_ids) if stop_token_ids else eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self._logits_kwarg = _logits_kwarg(model)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts (no padding) and left-pad them ourselves: ``(ids, mask)``."""
        enc = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
        return left_pad([list(e) for e in enc], self.pad_id)

    def generate(self, prompts: list[str], *, generator: torch.Generator | None = None, greedy: bool = False,
                 max_new_tokens: int | None = None) -> RolloutBatch:
        """Sample one response per prompt. ``generator`` must live on the model's device."""
        ids, mask = self.tokenize(prompts)
        return self.generate_ids(ids, mask, generator=generator, greedy=greedy, max_new_tokens=max_new_tokens)

    def _sample(self, logits: torch.Tensor, generator: torch.Generator | None, greedy: bool):
        """One step: returns (token [n], logp [n], topk ids [n,K] | None, topk logp | None, entropy | None)."""
        if greedy:
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            tok = logp_all.argmax(-1)
        else:
            logp_all = processed_logprobs(logits, self.temperature, self.top_k, self.top_p)
            tok = sample_from_logprobs(logp_all, generator)
        lp = logp_all.gather(1, tok.unsqueeze(1)).squeeze(1)
        topk_ids = topk_lp = ent = None
        if self.record_topk:
            k = min(self.record_topk, logp_all.shape[-1])
            topk_lp, topk_ids = torch.topk(logp_all, k, dim=-1)
            topk_ids, topk_lp = force_into_topk(topk_ids, topk_lp, tok, lp)
        if self.record_entropy:
            # -sum p log p; the clamp turns 0 * -inf (filtered tokens) into 0 without touching p > 0
            ent = -(logp_all.exp() * logp_all.clamp_min(-1e4)).sum(-1)
        return tok, lp, topk_ids, topk_lp, ent

    def _decoder(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        """The KV-cached forward: ``PackedDecoder`` (preallocated cache, distinct prompts prefilled once
        without padding) for the models ``tokentrust.train.packed`` supports, else the model's own cache."""
        if self.packed and unsupported_reason(self.model) is None:
            return PackedDecoder(self.model, prompt_ids, prompt_mask, max_new_tokens)
        return _HFDecoder(self, prompt_ids, prompt_mask, max_new_tokens)

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, use_mask: bool, extra: dict):
        """Run the prompts once; GRPO repeats each prompt G times, so identical rows are computed once
        and the cache is expanded afterwards (a G-fold cut of the prefill cost)."""
        uniq, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
        P = prompt_ids.shape[1]
        dedup = self.dedup_prompts and uniq.shape[0] < prompt_ids.shape[0]
        ids, mask = (uniq[:, :P], uniq[:, P:]) if dedup else (prompt_ids, prompt_mask)
        out = self.model(input_ids=ids, attention_mask=mask if use_mask else None,
                         position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, **extra)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        if dedup:
            if not _reorderable(cache):  # unknown cache type: redo the prefill on the full batch
                self.dedup_prompts = False
                return self._prefill(prompt_ids, prompt_mask, use_mask, extra)
            cache.reorder_cache(inverse)
            logits = logits[inverse]
        return cache, logits

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                     generator: torch.Generator | None = None, greedy: bool = False,
                     max_new_tokens: int | None = None) -> RolloutBatch:
        """Sample from left-padded prompt ids. Greedy mode takes the argmax of the model's logits and
        records log-probs (and top-K / entropy) of the untempered, unfiltered distribution, since the
        point mass greedy decoding samples from would record 0 everywhere. ``temperature == 0`` means greedy."""
        model = self.model
        greedy = greedy or self.temperature == 0.0
        device = next(model.parameters()).device
        T = int(max_new_tokens or self.max_new_tokens)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device=device, dtype=torch.long)
        N, P = prompt_ids.shape
        K = min(self.record_topk, int(getattr(model.config, "vocab_size", 1 << 62)))

        resp = torch.full((N, T), self.pad_id, dtype=torch.long, device=device)
        resp_mask = torch.zeros((N, T), dtype=torch.long, device=device)
        blogp = torch.zeros((N, T), dtype=torch.float32, device=device)
        topk_ids = torch.full((N, T, K), self.pad_id, dtype=torch.long, device=device) if K else None
        topk_lp = torch.zeros((N, T, K), dtype=torch.float32, device=device) if K else None
        entropy = torch.zeros((N, T), dtype=torch.float32, device=device) if self.record_entropy else None
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)

        was_training = model.training
        model.eval()
        try:
            steps = self._decoder(prompt_ids, prompt_mask, T)
            logits, can_compact = steps.logits, self.compact and steps.can_compact
            rows = torch.arange(N, device=device)  # original row of each row still in the batch
            alive = torch.ones(N, dtype=torch.bool, device=device)
            for t in range(T):
                tok, lp, tk_ids, tk_lp, ent = self._sample(logits, generator, greedy)
                resp[rows, t] = torch.where(alive, tok, self.pad_id)
                resp_mask[rows, t] = alive.long()
                blogp[rows, t] = torch.where(alive, lp, 0.0)
                if K:
                    topk_ids[rows, t] = torch.where(alive.unsqueeze(1), tk_ids, self.pad_id)
                    topk_lp[rows, t] = torch.where(alive.unsqueeze(1), tk_lp, 0.0)
                if entropy is not None:
                    entropy[rows, t] = torch.where(alive, ent, 0.0)
                alive = alive & ~torch.isin(tok, eos)
                n_alive = int(alive.sum())
                if n_alive == 0 or t == T - 1:
                    break
                if can_compact and (len(alive) - n_alive) * 8 >= len(alive):
                    keep = alive.nonzero().squeeze(1)
                    steps.keep(keep)
                    rows, tok, alive = rows[keep], tok[keep], alive[keep]
                logits = steps.step(tok, t)
        finally:
            model.train(was_training)

        lengths = resp_mask.sum(-1).tolist()
        width = max(lengths)  # drop trailing columns no row reached
        resp, resp_mask, blogp = resp[:, :width], resp_mask[:, :width], blogp[:, :width]
        if K:
            topk_ids, topk_lp = topk_ids[:, :width], topk_lp[:, :width]
        if entropy is not None:
            entropy = entropy[:, :width]
        texts = self.tokenizer.batch_decode([r[:n] for r, n in zip(resp.tolist(), lengths)], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)  # the text exactly as generated
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=resp,
                            response_mask=resp_mask, behavior_logp=blogp, response_texts=texts,
                            num_generated_tokens=int(sum(lengths)), behavior_topk_ids=topk_ids,
                            behavior_topk_logp=topk_lp, behavior_entropy=entropy)
