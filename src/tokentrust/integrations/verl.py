"""tokentrust losses inside verl (0.9.1): ``tt_*`` entries in verl's policy-loss registry.

    actor_rollout_ref.actor.policy_loss.loss_mode=tt_av_dppo

Registration happens on ``import verl`` in every process (driver and Ray workers) through the
entry point group ``verl.plugins`` (or ``VERL_USE_EXTERNAL_MODULES=tokentrust.integrations.verl``),
or by calling :func:`register` yourself.

Losses (each calls ``tokentrust.losses.get_loss(...)``, never a copy of it):

    tt_dppo_tv, tt_dppo_kl  DPPO Binary-TV / -KL, one threshold per advantage sign
    tt_av_dppo              DPPO (``params.divergence`` tv|kl) with a per-token threshold schedule
    tt_cppo, tt_drpo        CPPO / DRPO
    tt_ppo                  PPO / DAPO ratio clipping with a truncated IS weight

How verl's config maps onto the loss (same as verl's built-ins): ``clip_ratio_high`` /
``clip_ratio_low`` are the thresholds for A > 0 / A < 0 (PPO: eps_high / eps_low);
``loss_agg_mode`` and ``global_batch_info`` give the aggregation. ``clip_ratio_c`` keeps verl's
meaning per loss: for ``tt_ppo`` it is the dual-clip constant (as in verl's vanilla PPO: for
A < 0 the loss is at most -clip_ratio_c * A), for the DPPO / CPPO / DRPO losses the cap C of the
truncated weight min(r, C) (as in verl's ``dppo_tv`` / ``dppo_kl``; verl's ActorConfig default 3.0,
and a config without the key falls back to the loss's own default, 3.0 for DPPO, as tokentrust's
trainer does). ``tokentrust.params.is_cap`` overrides it (null: uncapped). ``tt_ppo``'s own
truncation cap is ``tokentrust.params.is_cap`` (default none). ``tt_drpo``'s delta is
``tokentrust.delta``, else DRPO's reference 12.5 (never clip_ratio: at 0.2 DRPO's damping would
reverse the gradient once |pi - mu| > 0.2).

Rollout correction (verl's ``algorithm.rollout_correction``): ``rollout_is_weights`` = truncated
pi_old / mu, computed by verl in decoupled mode (``bypass_mode=False``; its cap is verl's
``rollout_is_threshold``). They multiply the advantages only when the ratio is taken against the
recomputed old policy (``anchor`` default / old: ratio pi / pi_old, times pi_old / mu). With
``anchor=rollout`` the ratio is pi / mu and already holds that correction, so the weights are
ignored (applying them would correct twice). In bypass mode (old_log_prob = rollout log-probs)
verl computes no weights. Extra settings (``tokentrust.delta``,
``params``, ``thresholds``, ``anchor``) come from ``policy_loss.tokentrust`` when
``policy_loss._target_`` is :class:`TokenTrustPolicyLossConfig`, else from the JSON/YAML file (or
inline JSON) named by the env var ``TOKENTRUST_VERL_CONFIG``.

Micro-batch data: verl calls a registered loss with log-probs only. Its actor loss
``verl.workers.utils.losses.ppo_loss`` does hold the micro-batch (``data["rollout_log_probs"]``,
``data["tokentrust_scale"]``) and drops it. :func:`register` wraps that function so it publishes
``(model_output, data)`` in a context variable for the duration of the call (its behaviour is
otherwise unchanged); the ``tt_*`` losses read them from there when a schedule or
``anchor=rollout`` needs them, and raise a clear error when they are missing.

Per-token thresholds (``tokentrust.thresholds``) are computed once per rollout batch:
:func:`register` also wraps verl's ``TrainingWorker.train_mini_batch``, which receives each rank's
share of the whole rollout batch before it is split into mini-batches, epochs and micro-batches.
The wrapper gathers the response ids of all data-parallel ranks, computes the schedule on the
whole batch (normalisation mean, batch-frequency counts), advances the batch-frequency EMA once,
and stores s_t as ``tokentrust_scale`` in the batch, which verl splits with the other tensors.
Entropy schedules are not available in verl: no hook before the update holds mu's entropy.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from tokentrust.losses import default_delta, default_is_cap
from tokentrust.integrations import ThresholdSchedule, TokenTrustSettings
from tokentrust.losses import get_loss

LOSS_NAMES = ("tt_dppo_tv", "tt_dppo_kl", "tt_av_dppo", "tt_cppo", "tt_drpo", "tt_ppo")
ENV_CONFIG = "TOKENTRUST_VERL_CONFIG"


class VerlLossContext(NamedTuple):
    """What verl's ``ppo_loss`` had in hand when it called the policy loss."""

    model_output: Any  # dict: log_probs, entropy (optional), ...
    data: Any  # the micro-batch TensorDict


_CONTEXT: contextvars.ContextVar[VerlLossContext | None] = contextvars.ContextVar("tokentrust_verl_ctx", default=None)


def current_context() -> VerlLossContext | None:
    return _CONTEXT.get()


# ----------------------------------------------------------------------------------------------
# config


def _policy_loss_config_cls():
    from verl.workers.config import PolicyLossConfig

    @dataclass
    class TokenTrustPolicyLossConfig(PolicyLossConfig):
        """verl's PolicyLossConfig plus a free-form ``tokentrust`` section (see TokenTrustSettings)."""

        tokentrust: dict = field(default_factory=dict)

    TokenTrustPolicyLossConfig.__module__ = __name__
    TokenTrustPolicyLossConfig.__qualname__ = "TokenTrustPolicyLossConfig"  # picklable by reference
    return TokenTrustPolicyLossConfig


def __getattr__(name: str):  # lazy: importing this module must not need verl until register()
    if name == "TokenTrustPolicyLossConfig":
        cls = _policy_loss_config_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


_SETTINGS_CACHE: dict[int, tuple[Any, TokenTrustSettings]] = {}
_SCHEDULES: dict[tuple, ThresholdSchedule] = {}


def settings_from_config(config: Any) -> TokenTrustSettings:
    """``policy_loss.tokentrust`` if present and non-empty, else ``$TOKENTRUST_VERL_CONFIG``, else defaults."""
    policy_loss = getattr(config, "policy_loss", None) if config is not None else None
    key = id(policy_loss)
    hit = _SETTINGS_CACHE.get(key)
    if hit is not None and hit[0] is policy_loss:
        return hit[1]
    raw = policy_loss.get("tokentrust", None) if policy_loss is not None else None
    if not raw:
        env = os.environ.get(ENV_CONFIG, "").strip()
        if env.startswith("{"):
            raw = json.loads(env)
        elif env:
            from omegaconf import OmegaConf  # verl's own dependency; reads JSON and YAML

            raw = OmegaConf.to_container(OmegaConf.load(env), resolve=True)
    settings = TokenTrustSettings.from_mapping(raw)
    _SETTINGS_CACHE[key] = (policy_loss, settings)
    return settings


def _schedule(settings: TokenTrustSettings, config: Any) -> ThresholdSchedule:
    """One schedule (and batch-frequency state) per settings, model vocab and special ids, per process."""
    model_config = getattr(config, "model_config", None)
    vocab = getattr(getattr(model_config, "hf_config", None), "vocab_size", None)
    tokenizer = getattr(model_config, "tokenizer", None)
    special = ()
    if tokenizer is not None and not settings.thresholds.spec().kind == "constant":
        from tokentrust.vocab import special_token_ids

        special = tuple(special_token_ids(tokenizer))
    key = (settings.thresholds, vocab, special)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = ThresholdSchedule(settings.thresholds, vocab_size=vocab, special_ids=special)
    return _SCHEDULES[key]


# ----------------------------------------------------------------------------------------------
# reading the micro-batch published by the ppo_loss wrapper


def _to_width(x: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    """A [B, T'] (possibly nested) tensor as a dense [B, width] one, right-padded or cropped."""
    if x.is_nested:
        x = torch.nested.to_padded_tensor(x, fill)
    if x.shape[1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)
    return x[:, :width]


def _threshold_scale(ctx: VerlLossContext | None, like: torch.Tensor) -> torch.Tensor | None:
    if ctx is None or "tokentrust_scale" not in ctx.data.keys():
        return None
    return _to_width(ctx.data["tokentrust_scale"], like.shape[1], 1.0).to(like.device, like.dtype)


def _rollout_logp(ctx: VerlLossContext | None, like: torch.Tensor) -> torch.Tensor | None:
    if ctx is None or "rollout_log_probs" not in ctx.data.keys():
        return None
    return _to_width(ctx.data["rollout_log_probs"], like.shape[1], 0.0).to(like.device, like.dtype)


# ----------------------------------------------------------------------------------------------
# the adapters


def _agg_params(loss_agg_mode: str, config: Any) -> dict[str, Any]:
    """verl's agg_loss(loss_agg_mode, **global_batch_info) as tokentrust ``aggregate`` keywords.

    verl divides by (global count / dp_size); tokentrust divides by global_tokens / global_seqs.
    verl's "token-sum" (sum * dp_size) is token-mean with a divisor of 1 / dp_size.
    """
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp = info.get("dp_size") or 1
    tokens, seqs, scale = info.get("batch_num_tokens"), info.get("global_batch_size"), info.get("loss_scale_factor")
    if loss_agg_mode == "token-sum":
        return {"agg": "token-mean", "global_tokens": 1.0 / dp}
    if loss_agg_mode == "token-mean":
        if tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        return {"agg": "token-mean", "global_tokens": None if tokens is None else tokens / dp}
    if seqs is None and dp > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    out = {"agg": loss_agg_mode, "global_seqs": None if seqs is None else seqs / dp}
    if loss_agg_mode == "seq-mean-token-sum-norm" and scale is not None:
        out["horizon"] = scale
    return out


def _clip_pair(config: Any) -> tuple[float, float]:
    """(low, high) as verl's built-ins read them: clip_ratio_low/high, falling back to clip_ratio."""
    base = config.get("clip_ratio", 0.2)
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    return float(base if low is None else low), float(base if high is None else high)


def _is_cap(config: Any, loss: str) -> float | None:
    """verl's clip_ratio_c as the truncated-weight cap; the loss's own default when the config lacks it."""
    cap = config.get("clip_ratio_c", None)
    return default_is_cap(loss) if cap is None else float(cap)


def _check_schedule(verl_name: str, schedule: ThresholdSchedule) -> None:
    if schedule.constant:
        return
    if verl_name not in ("tt_av_dppo", "tt_drpo"):
        raise ValueError(f"{verl_name} uses fixed thresholds; for a schedule use loss_mode=tt_av_dppo or tt_drpo")
    if schedule.spec.needs_entropy:
        raise ValueError(f"tokentrust.thresholds.kind={schedule.spec.kind!r} is not available in verl: thresholds are "
                         "computed once per rollout batch before the update, where verl holds no entropy of mu "
                         "(calculate_entropy gives only the current policy's, per micro-batch); use frequency or "
                         "batch-frequency")


def attach_thresholds(data: Any, config: Any, group: Any = None) -> bool:
    """Store s_t of the whole rollout batch in ``data['tokentrust_scale']`` (all dp ranks call it).

    ``data``: one rank's share of the rollout batch (TensorDict with ``responses`` and
    ``response_mask``); ``group``: the data-parallel process group. Advances the batch-frequency
    EMA once. Returns False (and leaves ``data`` alone) when the loss is not a tt_* loss with a
    threshold schedule.
    """
    policy_loss = getattr(config, "policy_loss", None)
    if policy_loss is None or policy_loss.get("loss_mode", None) not in LOSS_NAMES:
        return False
    settings = settings_from_config(config)
    schedule = _schedule(settings, config)
    if schedule.constant:
        return False
    _check_schedule(policy_loss.get("loss_mode"), schedule)
    if "responses" not in data.keys():
        raise ValueError("the threshold schedule needs data['responses'] in the actor's update batch")
    mask = data["response_mask"]
    ids = _to_width(data["responses"], mask.shape[1], 0)
    data["tokentrust_scale"] = schedule.batch_scale(ids, mask, group=group, train=True).float()
    return True


def _make_adapter(verl_name: str):
    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        if config is None:
            raise ValueError(f"{verl_name} needs verl's actor config")
        settings = settings_from_config(config)
        ctx = current_context()
        params = dict(settings.params)
        low, high = _clip_pair(config)

        # mu: verl's old_log_prob (= rollout log-probs in bypass mode), or the rollout log-probs
        # recorded by the inference engine when anchor=rollout (decoupled mode).
        behavior = old_log_prob
        if settings.anchor == "rollout":
            behavior = _rollout_logp(ctx, log_prob)
            if behavior is None:
                raise ValueError(f"{verl_name}: tokentrust.anchor=rollout needs rollout_log_probs in the batch "
                                 "(actor_rollout_ref.rollout.calculate_log_probs=True) and the ppo_loss hook "
                                 "(tokentrust.integrations.verl.register() before verl builds its workers)")
        # verl's rollout IS weights (pi_old / mu) belong to a ratio against pi_old, never to one against mu
        use_is = rollout_is_weights is not None and settings.anchor != "rollout"
        adv = advantages * rollout_is_weights.detach() if use_is else advantages

        kwargs: dict[str, Any] = _agg_params(loss_agg_mode, config)
        schedule = _schedule(settings, config)
        _check_schedule(verl_name, schedule)
        if verl_name == "tt_ppo":  # clip_ratio_c: verl's dual-clip constant; the IS cap is params.is_cap
            name = "ppo"
            kwargs.update(eps_low=low, eps_high=high, dual_clip=config.get("clip_ratio_c", None))
        elif verl_name == "tt_cppo":
            name = "cppo"
            kwargs["is_cap"] = _is_cap(config, name)
            if settings.delta is None and low != high:
                raise ValueError("tt_cppo has one threshold: set clip_ratio_low == clip_ratio_high or tokentrust.delta")
            kwargs["delta"] = settings.delta if settings.delta is not None else high
        else:
            if verl_name == "tt_av_dppo":
                divergence = params.pop("divergence", "tv")
                if divergence not in ("tv", "kl"):
                    raise ValueError(f"tt_av_dppo: tokentrust.params.divergence must be tv or kl, got {divergence!r}")
                name = f"dppo-{divergence}"
                if schedule.constant:
                    raise ValueError("tt_av_dppo needs tokentrust.thresholds.kind other than 'constant' "
                                     "(use tt_dppo_tv / tt_dppo_kl for fixed thresholds)")
            else:
                name = {"tt_dppo_tv": "dppo-tv", "tt_dppo_kl": "dppo-kl", "tt_drpo": "drpo"}[verl_name]
            kwargs["is_cap"] = _is_cap(config, name)  # the truncated-weight cap, as verl's dppo_*
            if name.startswith("dppo"):
                kwargs["surrogate"] = "logp"  # verl's convention: reported loss -A w log pi (same gradient)
            # one threshold per advantage sign, like verl's built-in dppo_tv / dppo_kl
            if settings.delta is not None:
                delta: float | torch.Tensor = settings.delta
            elif name == "drpo":  # DRPO's reference delta, not verl's PPO clip_ratio
                delta = default_delta("drpo")
            elif low == high:
                delta = high
            else:
                delta = torch.where(adv > 0, high, low).to(log_prob.dtype)
            if not schedule.constant:
                scale = _threshold_scale(ctx, log_prob)
                if scale is None:
                    raise ValueError("the threshold schedule needs the response token ids of the whole rollout batch, "
                                     "which reach the loss only through the train_mini_batch / ppo_loss hooks: call "
                                     "tokentrust.integrations.verl.register() (entry point or "
                                     "VERL_USE_EXTERNAL_MODULES) before verl builds its workers")
                delta = delta * scale
            kwargs["delta"] = delta
        kwargs.update(params)
        out = get_loss(name)(log_prob, behavior, adv, response_mask.bool(), **kwargs)

        metrics = {f"trust_region/{k}": float(v) for k, v in out.metrics.items()}
        metrics["actor/pg_clipfrac"] = out.metrics["masked_frac"]
        metrics["actor/ppo_kl"] = out.metrics["kl_mu_pi"]
        return out.loss, metrics

    policy_loss.__name__ = f"{verl_name}_policy_loss"
    policy_loss.__doc__ = f"verl policy loss {verl_name!r}: tokentrust.losses via the verl adapter."
    return policy_loss


ADAPTERS = {name: _make_adapter(name) for name in LOSS_NAMES}


# ----------------------------------------------------------------------------------------------
# registration


def _install_ppo_loss_hook() -> None:
    """Wrap verl.workers.utils.losses.ppo_loss so it publishes (model_output, data) to the losses."""
    import verl.workers.utils.losses as losses

    if getattr(losses.ppo_loss, "_tokentrust_hook", False):
        return
    original = losses.ppo_loss

    @functools.wraps(original)
    def ppo_loss(config, model_output, data, dp_group=None):
        token = _CONTEXT.set(VerlLossContext(model_output, data))
        try:
            return original(config, model_output, data, dp_group)
        finally:
            _CONTEXT.reset(token)

    ppo_loss._tokentrust_hook = True
    losses.ppo_loss = ppo_loss
    # Modules that already bound the name with `from ... import ppo_loss` (if imported before us).
    for mod in ("verl.workers.engine_workers", "verl.trainer.distillation.losses"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "ppo_loss", None) is original:
            m.ppo_loss = ppo_loss


def _install_train_mini_batch_hook() -> None:
    """Wrap TrainingWorker.train_mini_batch so thresholds are computed once per rollout batch."""
    try:
        from verl.workers.engine_workers import TrainingWorker
    except ImportError:  # a verl build without the engine workers: the loss raises if a schedule is set
        return
    original = TrainingWorker.train_mini_batch
    if getattr(original, "_tokentrust_hook", False):
        return

    @functools.wraps(original)
    def train_mini_batch(self, data):
        config = getattr(getattr(self, "loss_fn", None), "keywords", {}).get("config")
        if config is not None:
            attach_thresholds(data, config, group=self.engine.get_data_parallel_group())
        return original(self, data)

    train_mini_batch._tokentrust_hook = True
    TrainingWorker.train_mini_batch = train_mini_batch


def register() -> list[str]:
    """Add the tt_* losses to verl's policy-loss registry and install the hooks (idempotent)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    for name, fn in ADAPTERS.items():
        register_policy_loss(name)(fn)
    _install_ppo_loss_hook()
    _install_train_mini_batch_hook()
    return list(LOSS_NAMES)


# Imported by verl's plugin loader (entry point / VERL_USE_EXTERNAL_MODULES) or by user code:
# register right away. If verl is still initialising (we are its plugin), `import verl` returns the
# partly built module, which already has everything core_algos needs.
try:
    import verl  # noqa: F401
except ImportError:  # verl not installed: register() raises when called
    pass
else:
    register()
