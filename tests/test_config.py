"""Config validation: every bad value fails before any work, naming the field."""

import json

import pytest

from tokentrust.train.config import ConfigError, loss_params, parse_set, resolve
from tokentrust.train.presets import PRESETS


def test_default_is_tiny_arith():
    cfg = resolve()
    assert cfg.model.name == "tiny" and cfg.task.name == "arith"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    resolve(preset=name)


@pytest.mark.parametrize("overrides, field", [
    ({"algo": {"delta": 0}}, "algo.delta"),
    ({"algo": {"delta": -1.0}}, "algo.delta"),
    ({"algo": {"eps_low": -0.1}}, "algo.eps_low"),
    ({"algo": {"thresholds": {"s_min": 3.0, "s_max": 2.0}}}, "algo.thresholds.s_min"),
    ({"algo": {"thresholds": {"kind": "zipf"}}}, "algo.thresholds.kind"),
    ({"rollout": {"group_size": 1}}, "rollout.group_size"),
    ({"rollout": {"temperature": 0}}, "rollout.temperature"),
    ({"rollout": {"top_p": 1.5}}, "rollout.top_p"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"ppo_epochs": 1.5}}, "optim.ppo_epochs"),
    ({"optim": {"minibatches": 1000}}, "optim.minibatches"),
    ({"algo": {"agg": "mean"}}, "algo.agg"),
    ({"algo": {"params": {"w_min": 0.5}}}, "algo.params.w_min"),
    ({"model": {"dtype": "fp8"}}, "model.dtype"),
    ({"log": {"progress": "yes"}}, "log.progress"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        resolve(overrides=overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_unknown_key_and_unknown_loss():
    with pytest.raises(ConfigError, match="unknown config key 'algo.deltaa'"):
        resolve(overrides={"algo": {"deltaa": 0.1}})
    with pytest.raises(ConfigError) as e:
        resolve(overrides={"algo": {"loss": "trpo"}})
    assert "dppo-tv" in str(e.value) and "ppo" in str(e.value)


def test_threshold_schedule_needs_a_delta_loss():
    with pytest.raises(ConfigError, match="algo.thresholds.kind"):
        resolve(overrides={"algo": {"loss": "ppo", "thresholds": {"kind": "frequency"}}})


def test_set_parsing_and_precedence(tmp_path):
    over = parse_set(["algo.delta=0.3", "task.name=gsm8k", "algo.is_cap=null", "log.progress=false"])
    assert over == {"algo": {"delta": 0.3, "is_cap": None}, "task": {"name": "gsm8k"}, "log": {"progress": False}}
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"algo": {"loss": "dppo-kl", "delta": 0.05}}))
    cfg = resolve(file=f, overrides={"algo": {"delta": 0.07}})
    assert cfg.algo.loss == "dppo-kl" and cfg.algo.delta == 0.07
    toml = tmp_path / "c.toml"
    toml.write_text('max_steps = 3\n[algo]\nloss = "ppo"\neps_high = 0.28\n')
    cfg = resolve(file=toml)
    assert cfg.max_steps == 3 and loss_params(cfg)["eps_high"] == 0.28


def test_round_trip_of_resolved_config():
    cfg = resolve(preset="smollm2-gsm8k")
    again = resolve(base=json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_top_p_below_one_is_refused_for_training():
    """Regression: with top_p < 1, mu is the nucleus-renormalised probability and pi the full
    softmax, so an unchanged policy reads ratio = nucleus mass (0.90-0.99), biasing every loss."""
    with pytest.raises(ConfigError, match=r"rollout\.top_p must be 1 for training"):
        resolve(overrides={"rollout": {"top_p": 0.9}})
    assert resolve(overrides={"rollout": {"top_p": 1.0}}).rollout.top_p == 1.0


def test_drpo_default_delta_follows_the_unirl_reference():
    """Regression: DRPO ran with DPPO's delta 0.15, 80x below its reference. The code follows UniRL
    unirl/algorithms/ar_drpo.py (drpo_epsilon = 12.5, paper section 4), not methods.md's DPPO default."""
    import inspect

    from tokentrust.study.methods import METHODS
    from tokentrust.losses import get_loss

    assert inspect.signature(get_loss("drpo")).parameters["delta"].default == 12.5
    assert resolve(overrides={"algo": {"loss": "drpo"}}).algo.delta == 12.5
    assert resolve(preset="tiny-arith", overrides={"algo": {"loss": "drpo"}}).algo.delta == 12.5
    assert METHODS["drpo"]["algo"]["delta"] == 12.5
    # the other losses keep their own defaults; an explicit value always wins
    assert resolve(overrides={"algo": {"loss": "dppo-kl"}}).algo.delta == 0.05
    assert resolve().algo.delta == 0.15
    assert resolve(overrides={"algo": {"loss": "drpo", "delta": 0.3}}).algo.delta == 0.3
    assert resolve(overrides={"algo": {"loss": "ppo"}}).algo.delta is None


def test_yaml_file_with_set_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("max_steps: 3\nalgo:\n  loss: dppo-kl\n  thresholds: {kind: frequency, beta: 0.25}\n"
                 "task:\n  options: {steps: 2}\n")
    cfg = resolve(file=f, overrides=parse_set(["algo.thresholds.beta=0.5", "seed=7"]))
    assert (cfg.max_steps, cfg.seed, cfg.algo.loss) == (3, 7, "dppo-kl")
    assert cfg.algo.thresholds.kind == "frequency" and cfg.algo.thresholds.beta == 0.5
    assert cfg.task.options == {"steps": 2}  # options replace the preset's, as with JSON/TOML
    assert cfg.model.tiny_layers == 4  # a file alone starts from the built-in defaults, not a preset


@pytest.mark.parametrize("text, needle", [
    ("algo: [1, 2]\n", "algo: input should be a valid dictionary"),
    ("- a\n- b\n", "top level must be a table"),
    ("algo: {delta: 0.1\n", "cannot parse config"),
    ("rollout:\n  group_size: 1\n", "rollout.group_size must be >= 2, got 1"),
    ("rollout:\n  backend: sglang\n", "rollout.backend must be one of 'hf' or 'vllm', got 'sglang'"),
    ("log:\n  trackers: [mlflow]\n", "log.trackers[0] must be one of 'tensorboard' or 'wandb'"),
])
def test_bad_yaml_is_one_line_naming_field_and_allowed_values(tmp_path, text, needle):
    f = tmp_path / "bad.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve(file=f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_strict_types_refuse_what_lax_parsing_would_coerce():
    for over, field in [({"log": {"progress": 1}}, "log.progress"), ({"optim": {"lr": "1e-5"}}, "optim.lr"),
                        ({"max_steps": 2.0}, "max_steps"), ({"model": {"lora_targets": "q_proj"}}, "model.lora_targets")]:
        with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}: "):
            resolve(overrides=over)
    assert resolve(overrides={"optim": {"lr": 1}}).optim.lr == 1.0  # an integer is a number


def test_legacy_tensorboard_flag_maps_to_trackers():
    """config.json files written before log.trackers (log.tensorboard: bool) still resume."""
    assert resolve(overrides={"log": {"tensorboard": False}}).log.trackers == []
    assert resolve(overrides={"log": {"tensorboard": True, "trackers": ["wandb"]}}).log.trackers == ["wandb", "tensorboard"]
    assert resolve().log.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match="log.tensorboard"):
        resolve(overrides={"log": {"tensorboard": "no"}})


def test_defaults_are_not_shared_between_configs():
    a, b = resolve(), resolve()
    a.algo.thresholds.bucket_edges.append(0.999)
    a.log.trackers.append("wandb")
    assert b.algo.thresholds.bucket_edges == [0.5, 0.8, 0.95, 0.99] and b.log.trackers == ["tensorboard"]


def test_resolved_yaml_round_trips(tmp_path):
    cfg = resolve(preset="qwen-math-gsm8k", overrides={"task": {"options": {"x": [1, 2]}}})
    f = tmp_path / "resolved.yaml"
    f.write_text(cfg.to_yaml())
    assert resolve(file=f) == cfg


def test_example_configs_are_the_presets():
    """examples/configs/<preset>.yaml resolves to the preset; regenerate one with
    `tokentrust train --preset NAME --print-config > examples/configs/NAME.yaml` after a preset changes."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "configs"
    assert set(PRESETS) <= {p.stem for p in folder.glob("*.yaml")}
    for name in PRESETS:
        assert resolve(file=folder / f"{name}.yaml") == resolve(preset=name), f"examples/configs/{name}.yaml is stale"
    for path in folder.glob("*.yaml"):  # the other examples validate
        resolve(file=path)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    """Regression: YAML 1.1 (PyYAML) reads `lr: 1e-5` as the string '1e-5', which strict validation refused."""
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-5\n  weight_decay: 1E+2\nrollout:\n  temperature: .5\nseed: 3\nout_dir: '1e-5'\n")
    cfg = resolve(file=f)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.rollout.temperature, cfg.seed) == (1e-5, 100.0, 0.5, 3)
    assert cfg.out_dir == "1e-5"  # quoted stays a string


# Keywords the learner's loss call passes itself (read off Learner._optimizer_step), by a loss taking each.
TRAINER_KEYS = [("dppo-tv", "delta"), ("dppo-tv", "agg"), ("dppo-tv", "is_cap"), ("dppo-tv", "global_tokens"),
                ("dppo-tv", "global_seqs"), ("dppo-tv", "horizon"), ("ppo", "eps_low"), ("ppo", "eps_high"),
                ("decoupled-ppo", "prox_logp"), ("dppo-topk-tv", "topk_logp"), ("dppo-topk-tv", "behavior_topk_logp"),
                ("dppo-tv", "behavior_logp"), ("dppo-tv", "logp"), ("dppo-tv", "advantages"), ("dppo-tv", "mask")]


@pytest.mark.parametrize("loss, key", TRAINER_KEYS)
def test_algo_params_refuses_what_the_trainer_supplies(loss, key):
    """They used to pass validation and then override (or be overridden by) the trainer's own values."""
    with pytest.raises(ConfigError) as e:
        resolve(overrides={"algo": {"loss": loss, "params": {key: 0.5}}})
    msg = str(e.value)
    assert msg.startswith(f"algo.params.{key} is supplied by the trainer") and "\n" not in msg


def test_algo_params_still_takes_the_losses_own_knobs():
    assert resolve(overrides={"algo": {"loss": "cppo", "params": {"w_min": 0.5}}}).algo.params == {"w_min": 0.5}
    assert resolve(overrides={"algo": {"loss": "dppo-tv-hybrid", "params": {"tau": 0.01}}}).algo.params["tau"] == 0.01


def test_the_adapters_refuse_the_same_shared_keys():
    from tokentrust.train.config import trainer_supplied_params
    from tokentrust.integrations import RESERVED_PARAMS, TokenTrustSettings
    from tokentrust.losses import CALLER_PARAMS

    assert RESERVED_PARAMS is CALLER_PARAMS and set(CALLER_PARAMS) <= set(trainer_supplied_params())
    for key in CALLER_PARAMS:
        with pytest.raises(ValueError, match=key):
            TokenTrustSettings(params={key: 0.5})
