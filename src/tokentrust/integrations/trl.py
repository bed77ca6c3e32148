"""tokentrust losses inside TRL (1.16): a ``GRPOTrainer`` subclass with our loss in ``_compute_loss``.

    args = TokenTrustGRPOConfig(output_dir=..., loss_type="dapo", tokentrust_loss="dppo-tv",
                                tokentrust_thresholds={"kind": "frequency", "table": "freq.safetensors"})
    trainer = TokenTrustGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

TRL has no loss registry; overriding ``_compute_loss`` is its own pattern for new losses
(``trl/experimental/gmpo``). Everything else (generation, rewards, advantages, vLLM, accelerate /
DeepSpeed / FSDP) stays TRL's. The loss is ``tokentrust.losses.get_loss(name)``.

Anchor mu (``tokentrust_anchor``): "default" = ``sampling_per_token_logps`` (the log-probs vLLM
returned while sampling; tokens it could not score fall back to the next choice), else
``old_per_token_logps`` (TRL's recomputed policy; present when a generation batch is reused),
else the detached current log-probs (ratio 1: one update per generation). "old" skips the vLLM
log-probs. Because the "default" ratio is taken against the sampler itself, TRL's extra vLLM
importance sampling correction is not applied there (it would count the sampler mismatch twice).
With "old" the ratio is pi / pi_old, and TRL's ``importance_sampling_ratio`` (pi_old / mu_vLLM,
truncated or masked as TRL configures it) multiplies the advantages, exactly as TRL multiplies its
own per-token loss and as the verl adapter applies ``rollout_is_weights``.

Loss defaults are the library's (``tokentrust_params`` overrides them): DPPO's truncated IS weight
is capped at 3, as verl runs ``dppo_tv`` / ``dppo_kl`` (``{"is_cap": null}``: uncapped).
``decoupled-ppo`` is refused at construction: it needs the log-probs of the weights before each
update (``prox_logp``), which TRL does not compute.

Per-token thresholds (``tokentrust_thresholds``) are computed once per generation batch, in
``_generate_and_score_completions``, over the rows of every process (gathered; the result equals a
one-process run on the same batch), and travel with the batch as ``tokentrust_scale``: every
accumulation step and every ``num_iterations`` pass of that batch uses the same thresholds. The
batch-frequency EMA advances once per training generation batch and never during evaluation.
Entropy schedules take the entropy of the policy that generated the batch (one extra no-grad
forward per generation batch).

Normalisation follows TRL's contract for ``loss_type``: "dapo" divides by the active-token count
of the whole generation batch (per process, per accumulation window), "bnpo" by the local token
count, "grpo" is a per-sequence token mean, "dr_grpo" divides by B * max_completion_length; the
last three are divided by the gradient-accumulation steps.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from tokentrust.integrations import ThresholdSchedule, TokenTrustSettings
from tokentrust.losses import get_loss, needs_prox_logp

SUPPORTED_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class TokenTrustGRPOConfig(GRPOConfig):
    """GRPOConfig plus the tokentrust loss settings (dict fields also accept a JSON string)."""

    tokentrust_loss: str = "dppo-tv"
    tokentrust_delta: float | None = None
    tokentrust_params: dict | str | None = None
    tokentrust_thresholds: dict | str | None = None
    tokentrust_anchor: str = "default"

    def tokentrust_settings(self) -> TokenTrustSettings:
        def parse(x):
            return json.loads(x) if isinstance(x, str) else dict(x or {})

        return TokenTrustSettings.from_mapping({
            "loss": self.tokentrust_loss, "delta": self.tokentrust_delta, "params": parse(self.tokentrust_params),
            "thresholds": parse(self.tokentrust_thresholds), "anchor": self.tokentrust_anchor})


class TokenTrustGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is a tokentrust loss (optionally with AV-DPPO thresholds).

    Settings come from ``tokentrust=`` (a TokenTrustSettings or dict) or a TokenTrustGRPOConfig.
    """

    def __init__(self, *args: Any, tokentrust: TokenTrustSettings | dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if tokentrust is not None:
            self.tokentrust = TokenTrustSettings.from_mapping(tokentrust)
        elif isinstance(self.args, TokenTrustGRPOConfig):
            self.tokentrust = self.args.tokentrust_settings()
        else:
            self.tokentrust = TokenTrustSettings(loss="dppo-tv")
        tt = self.tokentrust
        if tt.loss is None:
            raise ValueError("tokentrust.loss is required (a tokentrust.losses name)")
        if tt.loss.startswith("dppo-topk"):
            raise ValueError(f"{tt.loss} needs mu's top-K log-probs, which TRL does not record")
        self.tokentrust_loss_fn = get_loss(tt.loss)  # raises with the list of names
        if needs_prox_logp(tt.loss):
            raise ValueError(f"{tt.loss} needs prox_logp (log-probs of the weights before each update), which "
                             "TRL's GRPOTrainer does not compute; use ppo, dppo-tv or another loss")
        self._tt_accepted = inspect.signature(self.tokentrust_loss_fn).parameters
        problems = []
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
        if self.importance_sampling_level != "token":
            problems.append("importance_sampling_level='sequence'")
        if self.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold")
        if self._entropy_bonus_enabled:
            problems.append("an entropy bonus")
        if problems:
            raise ValueError("TokenTrustGRPOTrainer does not support " + ", ".join(problems))
        from tokentrust.vocab import FrequencyTable, special_token_ids

        model_vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tt.thresholds.table:
            FrequencyTable.load(tt.thresholds.table, tokenizer=tok)  # VocabMismatchError if built for another
        # special tokens (EOS, pad, chat markers) get the base delta under every schedule
        self.tokentrust_schedule = ThresholdSchedule(tt.thresholds, vocab_size=model_vocab,
                                                     special_ids=special_token_ids(tok))

    # -- pieces of _compute_loss -----------------------------------------------------------------

    def _tokentrust_anchor(self, inputs: dict, per_token_logps: torch.Tensor) -> torch.Tensor:
        """mu: sampler log-probs, else TRL's old log-probs, else the detached current ones."""
        fallback = inputs.get("old_per_token_logps")
        fallback = per_token_logps.detach() if fallback is None else fallback
        sampling = inputs.get("sampling_per_token_logps")
        if self.tokentrust.anchor == "old" or sampling is None:
            return fallback
        return torch.where(torch.isnan(sampling), fallback, sampling)

    def _tokentrust_advantages(self, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """TRL's advantages, times its vLLM ``importance_sampling_ratio`` when mu is pi_old (anchor "old").

        The ratio ([B, T] or per sequence [B, 1]) is >= 0, so scaling A by it scales each token's loss
        by it (what TRL does) and leaves every clip and mask decision unchanged.
        """
        adv = inputs["advantages"]
        weight = inputs.get("importance_sampling_ratio")
        if weight is None or self.tokentrust.anchor != "old":
            return adv
        adv = adv[:, None] if adv.dim() == 1 else adv
        return (adv * weight.detach().to(adv.dtype)).expand(mask.shape)

    def _tokentrust_agg(self, inputs: dict, batch_size: int, mode: str) -> tuple[dict[str, Any], float]:
        """(aggregate keywords, divisor applied after the loss) for TRL's loss_type contract."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return {"agg": "token-mean", "global_tokens": n}, 1.0
        if self.loss_type == "bnpo":
            return {"agg": "token-mean"}, accum
        if self.loss_type == "grpo":
            return {"agg": "seq-mean-token-mean", "global_seqs": float(batch_size)}, accum
        return {"agg": "seq-mean-token-sum-norm", "global_seqs": float(batch_size),
                "horizon": self.max_completion_length}, accum  # dr_grpo

    def _tokentrust_kwargs(self, inputs: dict, mask: torch.Tensor, mode: str) -> tuple[dict[str, Any], float]:
        tt = self.tokentrust
        agg, divisor = self._tokentrust_agg(inputs, mask.shape[0], mode)
        kwargs: dict[str, Any] = {**agg}
        accepted = self._tt_accepted
        if "eps_low" in accepted:
            kwargs.update(eps_low=self.epsilon_low, eps_high=self.epsilon_high)
        if "delta" in accepted:
            if tt.delta is not None or not self.tokentrust_schedule.constant:
                base = tt.delta if tt.delta is not None else accepted["delta"].default
                delta: float | torch.Tensor = base
                if not self.tokentrust_schedule.constant:
                    scale = inputs.get("tokentrust_scale")
                    if scale is None:
                        raise ValueError("inputs lack tokentrust_scale: thresholds are computed once per generation "
                                         "batch by _generate_and_score_completions (or tokentrust_add_thresholds)")
                    delta = base * scale.to(mask.device)
                kwargs["delta"] = delta
        elif not self.tokentrust_schedule.constant:
            raise ValueError(f"tokentrust loss {tt.loss!r} has no per-token delta for a threshold schedule")
        kwargs.update(tt.params)
        return kwargs, divisor

    # -- thresholds, once per generation batch ----------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.tokentrust_schedule.constant:
            self.tokentrust_add_thresholds(batch, train=self.model.training)
        return batch

    def tokentrust_add_thresholds(self, batch: dict, *, train: bool) -> dict:
        """Put ``tokentrust_scale`` (s_t, [B, C]) into a whole generation batch (all processes call it).

        ``train=False`` (evaluation) leaves the batch-frequency EMA state untouched.
        """
        mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
        entropy = self._tokentrust_entropy(batch, train) if self.tokentrust_schedule.spec.needs_entropy else None
        batch["tokentrust_scale"] = self.tokentrust_schedule.batch_scale(batch["completion_ids"], mask, entropy,
                                                                         train=train)
        return batch

    @torch.no_grad()
    def _tokentrust_entropy(self, batch: dict, train: bool) -> torch.Tensor:
        """Entropy of the generating policy at each completion token (no-grad forward)."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        size = self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size
        return self._get_per_token_logps_and_entropies(
            self.model, ids, attention, batch["completion_ids"].size(1), batch_size=size, compute_entropy=True,
            **{k: batch.get(k) for k in MULTIMODAL_KEYS})[1]

    # -- the loss --------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in MULTIMODAL_KEYS})
        mode = "train" if self.model.training else "eval"
        behavior = self._tokentrust_anchor(inputs, per_token_logps)
        kwargs, divisor = self._tokentrust_kwargs(inputs, mask, mode)
        adv = self._tokentrust_advantages(inputs, mask)
        out = self.tokentrust_loss_fn(per_token_logps, behavior, adv, mask.bool(), **kwargs)
        loss = out.loss
        if self.beta != 0.0:  # k3 KL to the reference model, aggregated like the policy loss (as TRL does)
            from tokentrust.losses import aggregate

            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * torch.exp(per_token_logps - behavior).detach()
            agg = {k: v for k, v in kwargs.items() if k in ("agg", "global_tokens", "global_seqs", "horizon")}
            kl_loss = aggregate(kl, mask.bool(), **agg)
            loss = loss + self.beta * kl_loss
            self._metrics[mode]["kl"].append(self._tt_global_mean(kl, mask))
        loss = loss / divisor
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / divisor
        self._metrics[mode]["entropy"].append(self._tt_global_mean(entropies, mask))
        self._tt_log(out.metrics, mode, per_token_logps.device)
        return loss

    # -- logging ---------------------------------------------------------------------------------

    def _tt_global_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        m = mask.to(x.dtype)
        totals = self.accelerator.reduce(torch.stack([(x.detach() * m).sum(), m.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _tt_log(self, metrics: dict[str, float], mode: str, device: torch.device) -> None:
        """Our loss metrics next to TRL's, as trust_region/<name>, averaged over processes."""
        names = sorted(metrics)
        vals = torch.tensor([float(metrics[k]) for k in names], device=device)
        vals = self.accelerator.gather(vals[None]).float().nanmean(0)
        for k, v in zip(names, vals.tolist()):
            self._metrics[mode][f"trust_region/{k}"].append(v)


__all__ = ["SUPPORTED_LOSS_TYPES", "TokenTrustGRPOConfig", "TokenTrustGRPOTrainer"]
