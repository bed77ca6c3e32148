"""vLLM rollout with the same RolloutBatch output as the HF loop (vLLM imported lazily).

What makes vLLM's numbers usable as mu:

* ``logprobs_mode="processed_logprobs"`` (engine argument, vLLM >= 0.10.2): the returned log-probs
  are ``log_softmax`` of the logits after temperature and top-k / top-p, i.e. of the distribution
  the token was drawn from. The default ``raw_logprobs`` is the untempered, unfiltered model; it
  equals mu only when temperature == 1 and nothing is filtered, so without the engine argument
  we refuse any other setting. In processed mode vLLM itself turns off the FlashInfer sampler.
* ``SamplingParams(logprobs=K)`` returns, per generated position, a dict ``{token_id: Logprob}``
  with the K most probable tokens plus the sampled one (K + 1 entries when it is outside the top
  K); ``logprobs=0`` returns the sampled token alone. We read mu's top-K from it and force the
  sampled token in, exactly as :func:`tokentrust.train.rollout.hf.force_into_topk` does.
* Entropy: vLLM never returns the full distribution, so ``behavior_entropy`` is the entropy of the
  returned top-K with the remaining mass lumped into one outcome: a lower bound of the true entropy
  (merging outcomes can only lower entropy), exact when the top-K covers mu's support
  (e.g. with top_k <= K). ``entropy_is_exact`` is False here.
* Reproducibility: per-request seeds are drawn from the caller's ``torch.Generator``.
* Weight sync (:meth:`VLLMRollout.sync_weights`): the HF state dict is fed to the vLLM model's own
  ``load_weights`` (it accepts HF checkpoint names). In-process engines (V0, or V1 with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode runs) expose the model at
  ``llm.llm_engine.model_executor.driver_worker[.worker].model_runner.model``; otherwise we send the
  weights through ``llm.collective_rpc`` (a callable there needs
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``). The prefix cache is reset afterwards, since cached KV
  blocks were computed with the old weights.

Not runnable in CPU-only CI; the pure conversion :func:`request_outputs_to_batch` is unit-tested
with fake vLLM outputs.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from tokentrust.train.rollout.base import RolloutBatch
from tokentrust.train.rollout.hf import eos_token_ids, left_pad, pad_token_id


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("VLLMRollout needs vLLM on a GPU machine: pip install 'tokentrust[vllm]'") from e
    return vllm


def _value(lp) -> float:
    """A vLLM ``Logprob`` object (``.logprob``) or a plain float."""
    return float(getattr(lp, "logprob", lp))


def request_outputs_to_batch(outputs, prompt_token_ids: list[list[int]], *, pad_id: int, eos_ids: list[int],
                             tokenizer=None, record_topk: int = 0, record_entropy: bool = False) -> RolloutBatch:
    """Convert vLLM ``RequestOutput``s (one completion each, in prompt order) into a RolloutBatch.

    Reads ``out.outputs[0].token_ids``, ``.logprobs`` (list of ``{token_id: Logprob}``) and ``.text``.
    Tokens after the first stop id are dropped (vLLM already stops there; this is a guard).
    """
    eos = set(eos_ids)
    rows = []
    for out in outputs:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        for j, tok in enumerate(ids):
            if tok in eos:
                ids = ids[:j + 1]
                break
        if comp.logprobs is None or len(comp.logprobs) < len(ids):
            raise ValueError("vLLM output has no per-token logprobs; pass SamplingParams(logprobs=...)")
        rows.append((ids, [comp.logprobs[j] for j in range(len(ids))], comp.text))
    N, T = len(rows), max(1, max(len(r[0]) for r in rows))
    K = record_topk
    resp = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.long)
    blogp = torch.zeros((N, T), dtype=torch.float32)
    topk_ids = torch.full((N, T, K), pad_id, dtype=torch.long) if K else None
    topk_lp = torch.zeros((N, T, K), dtype=torch.float32) if K else None
    entropy = torch.zeros((N, T), dtype=torch.float32) if record_entropy else None
    texts = []
    for i, (ids, step_logprobs, text) in enumerate(rows):
        texts.append(text)
        for t, (tok, d) in enumerate(zip(ids, step_logprobs)):
            if tok not in d:
                raise ValueError(f"row {i} step {t}: sampled token {tok} missing from vLLM logprobs")
            lp = _value(d[tok])
            resp[i, t], mask[i, t], blogp[i, t] = tok, 1, lp
            ranked = sorted(((_value(v), k) for k, v in d.items()), key=lambda x: -x[0])
            if K:
                top = ranked[:K]
                if len(top) < K:
                    raise ValueError(f"vLLM returned {len(top)} logprobs, need record_topk={K}")
                if tok not in [k for _, k in top]:
                    top[-1] = (lp, tok)
                topk_ids[i, t] = torch.tensor([k for _, k in top])
                topk_lp[i, t] = torch.tensor([v for v, _ in top])
            if record_entropy:
                ps = [math.exp(v) for v, _ in ranked if v > float("-inf")]
                rest = max(0.0, 1.0 - sum(ps))
                entropy[i, t] = -sum(p * math.log(p) for p in ps + [rest] if p > 0)
    if tokenizer is not None and any(t is None for t in texts):
        texts = tokenizer.batch_decode([r[0] for r in rows], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
    prompt_ids, prompt_mask = left_pad(prompt_token_ids, pad_id)
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=resp, response_mask=mask,
                        behavior_logp=blogp, response_texts=list(texts), num_generated_tokens=int(mask.sum()),
                        behavior_topk_ids=topk_ids, behavior_topk_logp=topk_lp, behavior_entropy=entropy)


def _plain_named_weights(model):
    """(name, tensor) pairs of the HF weights vLLM should load; LoRA models are merged into a copy."""
    if hasattr(model, "merge_and_unload"):
        import copy
        model = copy.deepcopy(model).merge_and_unload()
    return [(name, p.detach()) for name, p in model.state_dict().items()]


def _load_weights_on_worker(worker, weights):
    """Runs inside a vLLM worker via ``collective_rpc``."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMRollout:
    """Sampling with vLLM that records mu (see the module docstring for the guarantees)."""

    entropy_is_exact = False

    def __init__(self, llm, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, record_topk: int = 0, record_entropy: bool = False, add_special_tokens: bool = True,
                 stop_token_ids: list[int] | None = None, entropy_topk: int = 20, **llm_kwargs):
        """``llm``: a ``vllm.LLM`` (built with ``logprobs_mode="processed_logprobs"``) or a model path /
        hub id, in which case we build it with that mode and ``llm_kwargs``."""
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.record_topk, self.record_entropy = int(record_topk), bool(record_entropy)
        self.add_special_tokens = add_special_tokens
        self.eos_ids = list(stop_token_ids) if stop_token_ids else eos_token_ids(None, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self.num_logprobs = max(self.record_topk, entropy_topk if self.record_entropy else 0)
        untouched = temperature in (0.0, 1.0) and top_p >= 1.0 and top_k <= 0  # raw == processed
        if isinstance(llm, (str, os.PathLike)):
            kwargs = dict(max_logprobs=max(20, self.num_logprobs), **llm_kwargs)
            try:
                llm = vllm.LLM(model=str(llm), logprobs_mode="processed_logprobs", **kwargs)
            except TypeError:
                if not untouched:
                    raise RuntimeError("this vLLM has no logprobs_mode (needs >= 0.10.2): its logprobs are "
                                       "pre-temperature/filtering, so they are not mu; upgrade vLLM") from None
                llm = vllm.LLM(model=str(llm), **kwargs)
        else:
            mode = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "logprobs_mode", None)
            if mode is not None and "processed" not in str(mode) and not untouched:
                raise ValueError(f"the vLLM engine uses logprobs_mode={mode}; build it with "
                                 "logprobs_mode='processed_logprobs' so the recorded log-probs are mu")
            if mode is None and not untouched:
                warnings.warn("could not read the engine's logprobs_mode; make sure it is 'processed_logprobs'")
        self.llm = llm
        self._vllm = vllm

    @classmethod
    def from_hf_model(cls, model, tokenizer, workdir: str | os.PathLike, **kwargs) -> VLLMRollout:
        """Save the HF policy to ``workdir`` and start a vLLM engine on it (weights synced later)."""
        from tokentrust.train.models import save_model

        path = save_model(model, tokenizer, Path(workdir))
        return cls(str(path), tokenizer, **kwargs)

    def _sampling_params(self, seed: int | None, greedy: bool, max_new_tokens: int):
        """Greedy: temperature 0 and no filtering, so the recorded log-probs are the untempered,
        unfiltered model's (vLLM skips the temperature division at 0), as in HFRollout."""
        return self._vllm.SamplingParams(
            n=1, temperature=0.0 if greedy else self.temperature, top_p=1.0 if greedy else self.top_p,
            top_k=self.top_k if self.top_k > 0 and not greedy else -1, max_tokens=max_new_tokens,
            logprobs=self.num_logprobs, seed=seed, stop_token_ids=self.eos_ids, skip_special_tokens=True)

    def generate(self, prompts: list[str], *, generator: torch.Generator | None = None, greedy: bool = False,
                 max_new_tokens: int | None = None) -> RolloutBatch:
        """Sample one response per prompt; seeds for the requests come from ``generator``."""
        enc = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
        prompt_ids = [list(e) for e in enc]
        n = len(prompt_ids)
        seeds = (torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist() if generator is not None
                 else [None] * n)
        params = [self._sampling_params(s, greedy, int(max_new_tokens or self.max_new_tokens)) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        return request_outputs_to_batch(outputs, prompt_ids, pad_id=self.pad_id, eos_ids=self.eos_ids,
                                        tokenizer=self.tokenizer, record_topk=self.record_topk,
                                        record_entropy=self.record_entropy)

    def _local_model(self):
        engine = getattr(self.llm, "llm_engine", None)
        for chain in (("model_executor", "driver_worker", "worker", "model_runner", "model"),
                      ("model_executor", "driver_worker", "model_runner", "model")):
            obj = engine
            for attr in chain:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if obj is not None and hasattr(obj, "load_weights"):
                return obj
        return None

    def sync_weights(self, model) -> None:
        """Copy the training model's weights into the vLLM engine, then drop the stale prefix cache."""
        weights = _plain_named_weights(model)
        local = self._local_model()
        if local is not None:
            local.load_weights(weights=weights)
        else:
            self.llm.collective_rpc(_load_weights_on_worker, args=([(n, w.cpu()) for n, w in weights],))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
