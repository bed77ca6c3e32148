"""Rollout: sample responses and record the behaviour policy mu (HF loop, or vLLM when installed)."""

from __future__ import annotations

from tokentrust.train.rollout.base import RolloutBatch
from tokentrust.train.rollout.hf import HFRollout, force_into_topk, processed_logprobs

__all__ = ["RolloutBatch", "HFRollout", "VLLMRollout", "make_rollout", "processed_logprobs", "force_into_topk"]


def __getattr__(name: str):
    if name == "VLLMRollout":  # lazy: importing the module is cheap, but keep vLLM out of the import path
        from tokentrust.train.rollout.vllm import VLLMRollout
        return VLLMRollout
    raise AttributeError(name)


def make_rollout(kind: str, model, tokenizer, **kwargs):
    """``"hf"``: HFRollout(model, tokenizer, ...); ``"vllm"``: VLLMRollout(model, tokenizer, ...) where
    ``model`` is a ``vllm.LLM``, a model path, or an HF policy (then ``workdir=`` is required)."""
    if kind == "hf":
        return HFRollout(model, tokenizer, **kwargs)
    if kind == "vllm":
        from tokentrust.train.rollout.vllm import VLLMRollout
        if hasattr(model, "state_dict"):  # an HF policy: save it and start an engine on the copy
            if "workdir" not in kwargs:
                raise ValueError("make_rollout('vllm', <HF model>, ...) needs workdir= to save the policy for vLLM")
            return VLLMRollout.from_hf_model(model, tokenizer, kwargs.pop("workdir"), **kwargs)
        return VLLMRollout(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout kind {kind!r}; use 'hf' or 'vllm'")
