"""Validated run configuration: pydantic models, YAML/JSON/TOML files and ``--set key=value``; the
named presets are in `tokentrust.train.presets`.

Every value is checked before any work starts; a bad one raises ``ConfigError`` with a one-line
message naming the field and what it accepts (``algo.delta: input should be greater than 0, got -1``).
Types are strict: ``"yes"`` is not a boolean, ``1.5`` not an integer (integers are accepted as floats).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokentrust.losses import default_delta, default_is_cap  # noqa: F401  (re-exported: tokentrust.config)
from tokentrust.thresholds import KINDS as THRESHOLD_KINDS

PER_TOKEN_DELTA_LOSSES = ("dppo-tv", "dppo-kl", "dppo-topk-tv", "dppo-topk-kl", "drpo", "dppo-tv-hybrid")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TRACKERS = ("tensorboard", "wandb")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


class _Section(BaseModel):
    """A config table: strict types, unknown keys refused, attributes assignable."""

    model_config = ConfigDict(strict=True, extra="forbid")


class ModelConfig(_Section):
    name: str = "tiny"  # "tiny" (built + SFT warm-started on the task), "smollm2", a hub id or a local path
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"  # auto: bf16 on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora_r: int = Field(0, ge=0)  # > 0 trains LoRA adapters (peft) instead of all weights
    lora_alpha: int = 16
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    gradient_checkpointing: bool = False
    # tiny preset only
    tiny_hidden: int = Field(128, ge=1)
    tiny_layers: int = Field(4, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_vocab: int = Field(1024, ge=1)
    sft_steps: int = Field(300, ge=0)
    sft_lr: float = 3e-3
    cache_dir: str | None = None  # default: $TOKENTRUST_CACHE or ~/.cache/tokentrust


class TaskConfig(_Section):
    name: str = "arith"  # gsm8k | math500 | arith | rg/<reasoning-gym dataset> (the `rg` extra)
    data_dir: str | None = None
    on_bad_line: Literal["raise", "skip"] = "raise"
    options: dict[str, Any] = {}  # task-specific (arith: steps, max_operand, ...; rg: the dataset's own options)
    train_limit: int = Field(0, ge=0)  # RL prompts cycle over the first N training examples (0 = all of them)
    eval_split: str = "test"
    eval_limit: int = Field(64, ge=0)  # problems in the end-of-run evaluation (0 = skip)
    eval_samples: int = Field(4, ge=0)  # k for mean@k / pass@k (0: greedy only)
    system_prompt: str | None = None


class RolloutConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2)  # >= 2 for group-relative advantages
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = 1.0  # must stay 1 for training (see validate)
    topk: int = Field(20, ge=1)  # K recorded from mu for Top-K DPPO (only when the loss needs it)
    vllm_gpu_memory_utilization: float = 0.4
    staleness: int = Field(0, ge=0)  # k: the update at step t uses a batch sampled by the weights of step t - k
    overlap: bool = False  # sample the next batch in a background thread during the update (needs staleness >= 1)
    dtype: Literal["same", "float32", "bfloat16", "float16"] = "same"  # the rollout copy's dtype (hf only)
    # hf backend: tokentrust.train.rollout.packed_decode for Llama/Qwen2 (preallocated KV cache, prompts prefilled once);
    # false = the model's own cache. The same tokens up to float rounding.
    packed_decode: bool = True


class ThresholdConfig(_Section):
    kind: Literal[THRESHOLD_KINDS] = "constant"  # type: ignore[valid-type]
    beta: float = 0.5
    entropy_beta: float | None = None
    s_min: float = Field(0.25, gt=0)
    s_max: float = 4.0
    normalize: bool = False
    ema: float = Field(0.0, ge=0, lt=1)
    table: str | None = None  # frequency table path; built automatically for the model's tokenizer if None
    table_corpus: list[str] = []  # corpus files for the table (default: task train split)
    bucket_edges: list[float] = [0.5, 0.8, 0.95, 0.99]

    def spec(self):
        """The pure-function view of this schedule (``tokentrust.thresholds.ThresholdSpec``)."""
        from tokentrust.thresholds import ThresholdSpec

        return ThresholdSpec(kind=self.kind, beta=self.beta, entropy_beta=self.entropy_beta, s_min=self.s_min,
                             s_max=self.s_max, normalize=self.normalize, ema=self.ema)


class AlgoConfig(_Section):
    loss: str = "dppo-tv"
    # DPPO / CPPO / DRPO threshold (the base delta of AV-DPPO); None = the loss's reference default
    # (dppo-tv 0.15, dppo-kl 0.05, drpo 12.5, ...), filled in by `resolve`
    delta: float | None = Field(None, gt=0)
    eps_low: float = Field(0.2, ge=0)  # PPO clip
    eps_high: float | None = Field(None, ge=0)  # PPO clip-higher (None = eps_low)
    params: dict[str, Any] = {}  # any other keyword of the loss (w_min, delta_b, ...)
    agg: Literal[AGGREGATIONS] = "token-mean"  # type: ignore[valid-type]
    # truncated IS cap C; null = no cap. Unset = the loss's own default, filled in by `resolve` (dppo-*: 3.0, as verl
    # runs dppo_tv / dppo_kl; the others: none). Configs stored before that default record is_cap explicitly.
    is_cap: float | None = Field(None, gt=0)
    adv_std_norm: bool = False  # divide group advantages by the group std
    kl_coef: float = Field(0.0, ge=0)  # KL to the frozen initial policy (k3 estimator); 0 = off
    anchor: Literal["rollout", "recompute"] = "rollout"  # mu from generation | an extra forward (ablations)
    thresholds: ThresholdConfig = ThresholdConfig()


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(2, ge=1)
    minibatches: int = Field(1, ge=1)  # optimizer steps per epoch
    micro_batch_size: int = Field(0, ge=0)  # sequences per forward/backward (0 = whole minibatch)
    warmup_steps: int = Field(0, ge=0)
    max_nonfinite_steps: int = Field(5, ge=1)  # stop after this many consecutive non-finite loss/grad skips
    # The learner's forward without padding and with each distinct prompt computed once (tokentrust.train.packed;
    # Llama / Qwen2 without LoRA or gradient checkpointing; others fall back). Same values up to float rounding.
    packed_forward: bool = True


class LogConfig(_Section):
    samples_every: int = 10
    num_samples: int = 4
    checkpoint_every: int = Field(10, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    trackers: list[Literal[TRACKERS]] = ["tensorboard"]  # type: ignore[valid-type]  # metrics.jsonl is always written
    project: str = "tokentrust"  # W&B project (entity: $WANDB_ENTITY)
    run_name: str | None = None  # W&B run name (default: out_dir)
    group: str | None = None  # W&B group (compare: the grid's name)
    progress: bool = True
    mismatch: bool = False  # one extra no-grad forward per step: mu vs pi_old (mismatch/* metrics)

    @model_validator(mode="before")
    @classmethod
    def _legacy_tensorboard(cls, data: Any) -> Any:
        """``log.tensorboard: false`` (configs before ``log.trackers``) drops tensorboard from the trackers."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            if not isinstance(on, bool):
                raise ConfigError(f"log.tensorboard: expected true/false, got {on!r}")
            trackers = [t for t in data.get("trackers", ["tensorboard"]) if t != "tensorboard"]
            data["trackers"] = trackers + (["tensorboard"] if on else [])
        return data


class RunConfig(_Section):
    seed: int = 0
    max_steps: int = Field(40, ge=0)
    out_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    optim: OptimConfig = OptimConfig()
    log: LogConfig = LogConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- building and checking

def _one_line(err: ValidationError, cls: type[BaseModel]) -> str:
    """The first pydantic error as ``field.path: what is allowed, got value``."""
    e = err.errors()[0]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
    if e["type"] == "extra_forbidden":
        section = cls
        for p in e["loc"][:-1]:
            section = section.model_fields[p].annotation
        return f"unknown config key {path!r}; known keys here: {', '.join(sorted(section.model_fields))}"
    if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), ConfigError):
        return str(e["ctx"]["error"])
    ctx, got = e.get("ctx", {}), e.get("input")
    bound = next((k for k in _BOUNDS if k in ctx), None)
    if bound:
        return f"{path} must be {_BOUNDS[bound]} {ctx[bound]:g}, got {got!r}"
    if e["type"] == "literal_error":
        return f"{path} must be one of {ctx['expected']}, got {got!r}"
    msg = e["msg"][0].lower() + e["msg"][1:]
    return f"{path or 'config'}: {msg}, got {got!r}"


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def from_dict(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Build ``cls`` from a (partial) dict; unknown keys and wrong types raise ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, cls)) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "params"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``["algo.delta=0.2", "task.name=gsm8k"]`` -> nested dict; values parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A config (or grid) file: ``.yaml``/``.yml``, ``.toml``, else JSON; the top level must be a table."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_YamlLoader)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse config: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys, got {type(data).__name__}")
    return data


def resolve(preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> RunConfig:
    """Preset (default ``tiny-arith``) <- file <- overrides, then validate."""
    data: dict[str, Any] = dict(base or {})
    if preset is None and file is None and not base:
        preset = "tiny-arith"
    if preset is not None:
        from tokentrust.train.presets import PRESETS

        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        data = deep_merge(data, PRESETS[preset])
    if file is not None:
        data = deep_merge(data, load_file(file))
    if overrides:
        data = deep_merge(data, overrides)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    if cfg.algo.delta is None:
        cfg.algo.delta = default_delta(cfg.algo.loss)
    if "is_cap" not in cfg.algo.model_fields_set:
        cfg.algo.is_cap = default_is_cap(cfg.algo.loss)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# Where a loss keyword that the trainer supplies itself is set instead (the rest are per-batch tensors).
_SET_BY = {"agg": "algo.agg", "delta": "algo.delta (per token: algo.thresholds)", "eps_low": "algo.eps_low",
           "eps_high": "algo.eps_high", "is_cap": "algo.is_cap", "horizon": "rollout.max_new_tokens"}


def trainer_supplied_params() -> tuple[str, ...]:
    """Loss keywords the learner's loss call fills in itself, which ``algo.params`` must not set: the
    positional tensors, the callers' shared ``tokentrust.losses.CALLER_PARAMS``, the IS cap and the
    per-batch tensors (decoupled PPO's ``prox_logp``, DPPO-top-k's log-probs)."""
    from tokentrust.losses import CALLER_PARAMS

    return ("logp", "behavior_logp", "advantages", "mask", *CALLER_PARAMS, "is_cap", "prox_logp",
            "behavior_topk_logp", "topk_logp")


def _check_loss_params(a: AlgoConfig) -> None:
    """Each ``algo.params`` key is a keyword of the loss that the trainer does not supply itself."""
    from tokentrust.losses import get_loss

    supplied = trainer_supplied_params()
    accepted = set(inspect.signature(get_loss(a.loss)).parameters) - set(supplied)
    for key in a.params:
        _check(key not in supplied, f"algo.params.{key} is supplied by the trainer; "
                                    + (f"set {_SET_BY[key]} instead" if key in _SET_BY else "remove it"))
        _check(key in accepted, f"algo.params.{key} is not a parameter of loss {a.loss!r}; it takes: "
                                f"{', '.join(sorted(accepted))}")


def validate(cfg: RunConfig) -> None:
    """Checks across fields (single-field types and ranges are in the models); each names the field."""
    from tokentrust.losses import available_losses

    a, r, o, th, m = cfg.algo, cfg.rollout, cfg.optim, cfg.algo.thresholds, cfg.model
    _check(a.loss in available_losses(), f"algo.loss: unknown loss {a.loss!r}; available: {', '.join(available_losses())}")
    _check_loss_params(a)
    _check(th.s_min <= th.s_max, f"algo.thresholds.s_min ({th.s_min}) must be <= s_max ({th.s_max})")
    _check(th.kind == "constant" or a.loss in PER_TOKEN_DELTA_LOSSES,
           f"algo.thresholds.kind={th.kind!r} needs a loss with a per-token delta "
           f"({', '.join(PER_TOKEN_DELTA_LOSSES)}), not {a.loss!r}")
    _check(all(0 < e < 1 for e in th.bucket_edges) and th.bucket_edges == sorted(th.bucket_edges),
           f"algo.thresholds.bucket_edges must be increasing shares in (0, 1), got {th.bucket_edges}")
    _check(r.top_p == 1.0, f"rollout.top_p must be 1 for training, got {r.top_p}: with a nucleus, mu is renormalised "
                           "over it while pi is the full softmax, so ratio = nucleus mass < 1 even on-policy")
    _check(not r.overlap or r.staleness >= 1,
           "rollout.overlap needs rollout.staleness >= 1 (at 0 the update waits for the batch being sampled)")
    _check(not r.overlap or r.backend == "hf", "rollout.overlap is implemented for rollout.backend='hf' only")
    _check(r.dtype == "same" or r.backend == "hf", f"rollout.dtype={r.dtype!r} needs rollout.backend='hf' "
                                                   "(vLLM chooses its own dtype)")
    n = r.prompts_per_step * r.group_size
    _check(o.minibatches <= n, f"optim.minibatches must be in [1, {n}] (sequences per step), got {o.minibatches}")
    _check(m.tiny_hidden % m.tiny_heads == 0, f"model.tiny_hidden ({m.tiny_hidden}) must be divisible by tiny_heads ({m.tiny_heads})")
    _check("wandb" not in cfg.log.trackers or importlib.util.find_spec("wandb") is not None,
           "log.trackers has 'wandb' but wandb is not installed: pip install 'tokentrust[tracking]'")


def loss_params(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments for ``get_loss(cfg.algo.loss)`` from the config (delta added per batch)."""
    from tokentrust.losses import get_loss

    a = cfg.algo
    accepted = set(inspect.signature(get_loss(a.loss)).parameters)
    params: dict[str, Any] = {"agg": a.agg, "is_cap": a.is_cap}
    if "eps_low" in accepted:
        params["eps_low"] = a.eps_low
        params["eps_high"] = a.eps_high
    if "delta" in accepted:
        params["delta"] = a.delta if a.delta is not None else default_delta(a.loss)
    params.update(a.params)
    return params
