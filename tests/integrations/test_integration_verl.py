"""verl adapter: registration through verl's plugin loading, equality with verl's built-in DPPO
losses, and per-token thresholds reaching the loss through verl's own ``ppo_loss``.

Runs only where verl is installed (``bash scripts/setup_integrations.sh``, then
``.venv-integrations/bin/python -m pytest tests/integrations``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import tokentrust.integrations.verl as ttv  # noqa: E402
from tokentrust.vocab import FrequencyTable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# Prints which tt_* losses verl's registry holds after `import verl`, and whether the actor
# worker module bound the hooked ppo_loss. Import errors inside plugins are only logged at debug
# level by verl, so the test must look at the registry itself.
PROBE = textwrap.dedent("""
    import json, verl
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
    import verl.workers.engine_workers as workers
    get_policy_loss_fn("tt_dppo_tv")
    print(json.dumps({"losses": sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith("tt_")),
                      "hooked": bool(getattr(workers.ppo_loss, "_tokentrust_hook", False))}))
""")


def run_probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def actor_config(policy_loss=None, **kw) -> ActorConfig:
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_c=3.0)
    base.update(kw)
    return ActorConfig(policy_loss=policy_loss or PolicyLossConfig(), **base)


def tt_config(tokentrust: dict | None = None, **kw) -> ActorConfig:
    return actor_config(ttv.TokenTrustPolicyLossConfig(loss_mode="tt_av_dppo", tokentrust=tokentrust or {}), **kw)


def random_inputs(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    new = (old + 0.6 * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0] = False  # one empty response, as padding can produce
    return old, new, adv, mask


# ------------------------------------------------------------------------------ registration


def test_registered_via_verl_use_external_modules():
    res = run_probe({"VERL_USE_EXTERNAL_MODULES": "tokentrust.integrations.verl", "VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert res["losses"] == sorted(ttv.LOSS_NAMES)
    assert res["hooked"]


def test_registered_via_entry_point(tmp_path):
    """verl's entry-point discovery (group verl.plugins) imports our module: shown with a
    distribution declaring exactly the lines pyproject.toml is to carry."""
    dist = tmp_path / "tokentrust_verl_plugin-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokentrust-verl-plugin\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\ntokentrust = tokentrust.integrations.verl\n")
    # only this entry point: proves that discovery, not something else, registered the losses
    res = run_probe({"PYTHONPATH": str(tmp_path), "VERL_USE_EXTERNAL_PLUGINS": "tokentrust"})
    assert res["losses"] == sorted(ttv.LOSS_NAMES)
    assert res["hooked"]


def test_not_registered_without_plugin():
    """The probe can fail: with plugins off and no external module, no tt_* loss exists."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Unsupported loss mode: tt_dppo_tv" in out.stderr


def test_installed_entry_point_when_declared():
    """Once pyproject.toml declares the plugin, the installed metadata must expose it."""
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {}).get(
        "entry-points", {}).get("verl.plugins", {})
    if not declared:
        pytest.skip("pyproject.toml does not declare [project.entry-points.\"verl.plugins\"] yet")
    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("tokentrust") == "tokentrust.integrations.verl", "reinstall: pip install -e . --no-deps"


# ------------------------------------------------------------------ equality with built-ins


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kind", ["tv", "kl"])
@pytest.mark.parametrize("low,high", [(0.15, 0.15), (0.05, 0.25)])
def test_matches_verl_builtin(agg, kind, low, high):
    """Same value and gradient as verl's dppo_tv / dppo_kl (thresholds clip_ratio_low/high, cap clip_ratio_c)."""
    old, new, adv, mask = random_inputs(seed=AGG_MODES.index(agg) * 4 + (kind == "kl") * 2 + (low != high))
    cfg = actor_config(clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=1.5)
    ref_fn, tt_fn = get_policy_loss_fn(f"dppo_{kind}"), get_policy_loss_fn(f"tt_dppo_{kind}")
    results = []
    for fn in (ref_fn, tt_fn):
        x = new.clone().requires_grad_()
        loss, metrics = fn(old, x, adv, mask, agg, cfg, None)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), grad, metrics))
    (l_ref, g_ref, m_ref), (l_tt, g_tt, m_tt) = results
    torch.testing.assert_close(l_tt, l_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_tt, g_ref, rtol=1e-5, atol=1e-7)
    assert m_tt["actor/pg_clipfrac"] == pytest.approx(m_ref["actor/pg_clipfrac"], abs=1e-6)
    assert m_tt["actor/ppo_kl"] == pytest.approx(m_ref["actor/ppo_kl"], abs=1e-5)
    assert 0 < m_ref["actor/pg_clipfrac"] < 1  # the region is active: the comparison means something


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_builtin_with_global_batch_info_and_is_weights(agg):
    """dp_size / global counts (set by verl's ppo_loss) and rollout IS weights are honoured alike."""
    old, new, adv, mask = random_inputs(seed=7)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(8)) * 2
    cfg = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.1)
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 3, global_batch_size=11,
                                 loss_scale_factor=32)
    out = []
    for name in ("dppo_tv", "tt_dppo_tv"):
        x = new.clone().requires_grad_()
        loss, _ = get_policy_loss_fn(name)(old, x, adv, mask, agg, cfg, w)
        out.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-8)


def cap_inputs(seed: int):
    """random_inputs with the new log-probs pushed up 1.5 nats on a third of the tokens: ratios > 3 occur."""
    old, new, adv, mask = random_inputs(seed=seed)
    bump = torch.rand(old.shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.35
    return old, torch.where(bump, (new + 1.5).clamp(max=-1e-3), new), adv, mask


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_dppo_cap_defaults_to_verls_clip_ratio_c(kind):
    """verl's ActorConfig default clip_ratio_c (3.0) caps the weight in verl's dppo_tv / dppo_kl and in ours
    alike; a config without clip_ratio_c falls back to the library default, also 3; tokentrust.params.is_cap
    null removes the cap."""
    old, new, adv, mask = cap_inputs(seed=40)
    default_cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    assert (default_cfg.clip_ratio_c, default_cfg.clip_ratio_low, default_cfg.clip_ratio_high) == (3.0, 0.2, 0.2)
    assert bool(((new - old).exp() > 3)[mask].any())

    def run(fn, cfg):
        x = new.clone().requires_grad_()
        loss, _ = fn(old, x, adv, mask, "token-mean", cfg, None)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    ref = run(get_policy_loss_fn(f"dppo_{kind}"), default_cfg)
    ours = run(get_policy_loss_fn(f"tt_dppo_{kind}"), default_cfg)
    no_key = run(ttv.ADAPTERS[f"tt_dppo_{kind}"], {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2})  # no clip_ratio_c
    for got in (ours, no_key):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
    uncapped = run(get_policy_loss_fn(f"tt_dppo_{kind}"), actor_config(
        ttv.TokenTrustPolicyLossConfig(loss_mode=f"tt_dppo_{kind}", tokentrust={"params": {"is_cap": None}})))
    big_c = run(get_policy_loss_fn(f"dppo_{kind}"), actor_config(clip_ratio_c=1e9))
    torch.testing.assert_close(uncapped[1], big_c[1], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(uncapped[1], ref[1])  # the cap bit


def test_tt_drpo_delta_defaults_to_the_reference_not_clip_ratio():
    """tt_drpo ignores verl's clip_ratio (0.2 would reverse DRPO's gradient for |pi - mu| > 0.2): delta is
    tokentrust.delta, else DRPO's reference 12.5; the cap is clip_ratio_c."""
    from tokentrust.losses import get_loss

    old, new, adv, mask = random_inputs(seed=41)

    def run(cfg=None, **kw):
        x = new.clone().requires_grad_()
        if cfg is None:
            loss = get_loss("drpo")(x, old, adv, mask, **kw).loss
        else:
            loss, _ = get_policy_loss_fn("tt_drpo")(old, x, adv, mask, "token-mean", cfg, None)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    drpo = dict(loss_mode="tt_drpo")
    got = run(actor_config(ttv.TokenTrustPolicyLossConfig(**drpo), clip_ratio=0.2, clip_ratio_c=3.0))
    ref = run(delta=12.5, is_cap=3.0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got[1], run(delta=0.2, is_cap=3.0)[1])  # clip_ratio would differ
    own = run(actor_config(ttv.TokenTrustPolicyLossConfig(**drpo, tokentrust={"delta": 0.5}), clip_ratio_c=3.0))
    torch.testing.assert_close(own[1], run(delta=0.5, is_cap=3.0)[1], rtol=1e-5, atol=1e-7)


def test_ppo_keeps_what_ratio_clipping_keeps():
    """tt_ppo: the gradient is zero exactly where verl's vanilla PPO clip is active."""
    old, new, adv, mask = random_inputs(seed=3)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1e9)
    x = new.clone().requires_grad_()
    loss, _ = get_policy_loss_fn("tt_ppo")(old, x, adv, mask, "token-sum", cfg, None)
    (grad,) = torch.autograd.grad(loss, x)
    r = (new - old).exp()
    clipped = ((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8))
    expected_grad = -(adv * r) * (mask & ~clipped)  # token-sum: d/dlogp of -r A, no normaliser
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert clipped[mask].any() and (~clipped[mask]).any()


# ------------------------------------------------------ thresholds through verl's ppo_loss


def micro_batch(seed: int, V: int):
    """A micro-batch as verl's actor sees it: left/right padded, then converted to no-padding."""
    g = torch.Generator().manual_seed(seed)
    B, P, R = 8, 4, 10
    prompt_len = torch.randint(1, P + 1, (B,), generator=g)
    resp_len = torch.randint(1, R + 1, (B,), generator=g)
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    attn = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        prompts[i, P - prompt_len[i]:] = torch.randint(1, V, (int(prompt_len[i]),), generator=g)
        responses[i, :resp_len[i]] = torch.randint(1, V, (int(resp_len[i]),), generator=g)
        attn[i, P - prompt_len[i]:P + resp_len[i]] = 1
    mask = attn[:, P:].bool()
    old = torch.log(torch.rand(B, R, generator=g) * 0.9 + 0.05)
    new = (old + 0.5 * torch.randn(B, R, generator=g)).clamp(max=-1e-3) * mask
    adv = torch.randn(B, 1, generator=g).expand(B, R).contiguous()
    td = TensorDict({"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
                     "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
                     "response_mask": mask.long(), "old_log_probs": old, "advantages": adv}, batch_size=[B])
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    # the model's flat log-probs: response token j of sequence i is predicted at its position - 1
    flat = torch.zeros(int(attn.sum()))
    end = 0
    for i in range(B):
        end += int(prompt_len[i] + resp_len[i])
        flat[end - int(resp_len[i]) - 1:end - 1] = new[i, :resp_len[i]]
    return td, flat, dict(old=old, new=new, adv=adv, mask=mask, responses=responses)


def reached(grad: torch.Tensor, td, x: dict) -> torch.Tensor:
    """[B, R] bool: which response tokens got a non-zero gradient (flat no-padding layout -> padded)."""
    got = torch.zeros_like(x["mask"])
    end = 0
    for i, (pl, rl) in enumerate(zip(td["prompts"].ne(0).sum(-1).tolist(), x["mask"].sum(-1).tolist())):
        end += pl + rl
        got[i, :rl] = grad[end - rl - 1:end - 1] != 0
    return got


def write_table(path: Path, counts: torch.Tensor) -> Path:
    table = FrequencyTable(counts=counts, tokenizer_name="test", vocab_size=len(counts), fingerprint="f", source="test")
    table.save(path)
    return path


def expected_keep(x: dict, delta: torch.Tensor) -> torch.Tensor:
    """DPPO-TV kept set written from the paper's rule, independently of the library."""
    pi, mu, a = x["new"].exp(), x["old"].exp(), x["adv"]
    masked = ((a > 0) & (pi - mu > delta)) | ((a < 0) & (mu - pi > delta))
    return x["mask"] & ~masked


def run_ppo_loss(cfg: ActorConfig, td, flat):
    """verl's own ppo_loss (hooked by register()); returns (loss, metrics, d loss / d response logp)."""
    import verl.workers.utils.losses as vl

    leaf = flat.clone().requires_grad_()
    nested = torch.nested.nested_tensor_from_jagged(leaf, offsets=td["input_ids"].offsets())
    loss, metrics = vl.ppo_loss(cfg, {"log_probs": nested}, td)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, metrics, grad


def test_frequency_schedule_reaches_loss_through_ppo_loss(tmp_path):
    """Token ids travel micro-batch -> ppo_loss -> tt_av_dppo; the kept set is exactly the one the
    per-token thresholds delta * clamp(exp(beta (rho(y) - rho_ref)), s_min, s_max) give."""
    V = 40
    counts = torch.arange(V, dtype=torch.int64) ** 2  # token id = frequency rank: low ids rare
    table = write_table(tmp_path / "freq.safetensors", counts)
    beta, s_min, s_max, delta = 1.0, 0.2, 5.0, 0.1
    cfg = tt_config({"delta": delta, "thresholds": {"kind": "frequency", "beta": beta, "s_min": s_min,
                                                    "s_max": s_max, "table": str(table)}})
    td, flat, x = micro_batch(seed=1, V=V)
    assert ttv.attach_thresholds(td, cfg)  # what the train_mini_batch hook does once per rollout batch
    _, metrics, grad = run_ppo_loss(cfg, td, flat)

    # independent reference: rarity from counts with add-one smoothing, frequency-weighted rho_ref
    f = (counts.double() + 1) / (counts.sum() + V)
    rho = -f.log()
    rho_ref = float((counts.double() / counts.sum() * rho).sum())
    scale = torch.tensor([[min(max(math.exp(beta * (float(rho[t]) - rho_ref)), s_min), s_max)
                           for t in row] for row in x["responses"].tolist()])
    delta_t = (delta * scale).float()
    keep = expected_keep(x, delta_t)
    keep_const = expected_keep(x, torch.full_like(delta_t, delta))
    assert (keep != keep_const).any(), "test inputs must make the schedule matter"

    # the gradient reaches a response token iff it is kept (A != 0 everywhere here)
    assert torch.equal(reached(grad, td, x), keep)
    assert metrics["trust_region/delta_mean"].aggregate() == pytest.approx(float(delta_t[x["mask"]].mean()), rel=1e-5)


def test_asymmetric_thresholds_without_schedule(tmp_path):
    """tt_dppo_tv with clip_ratio_low != high keeps per advantage sign, through ppo_loss too."""
    td, flat, x = micro_batch(seed=4, V=30)
    cfg = actor_config(ttv.TokenTrustPolicyLossConfig(loss_mode="tt_dppo_tv"), clip_ratio_low=0.02,
                       clip_ratio_high=0.3)
    _, _, grad = run_ppo_loss(cfg, td, flat)
    keep = expected_keep(x, torch.where(x["adv"] > 0, 0.3, 0.02))
    assert torch.equal(reached(grad, td, x), keep)
    assert not torch.equal(keep, expected_keep(x, torch.full_like(x["old"], 0.3)))


def test_schedule_outside_ppo_loss_raises(tmp_path):
    """Without the hook's context (a loss called directly) a schedule cannot see token ids: say so."""
    table = write_table(tmp_path / "f.safetensors", torch.ones(10, dtype=torch.int64))
    cfg = tt_config({"thresholds": {"kind": "frequency", "table": str(table)}})
    old, new, adv, mask = random_inputs(seed=0)
    with pytest.raises(ValueError, match="token ids"):
        get_policy_loss_fn("tt_av_dppo")(old, new, adv, mask, "token-mean", cfg, None)


def test_entropy_schedule_is_refused_in_verl(tmp_path):
    """verl holds no entropy of mu before the update, so an entropy schedule cannot be computed once
    per rollout batch: refused with a one-line error (not silently computed per micro-batch)."""
    td, flat, _ = micro_batch(seed=2, V=20)
    cfg = tt_config({"thresholds": {"kind": "entropy"}})
    with pytest.raises(ValueError, match="not available in verl"):
        ttv.attach_thresholds(td, cfg)
    with pytest.raises(ValueError, match="not available in verl"):
        run_ppo_loss(cfg, td, flat)


def test_anchor_rollout_uses_rollout_log_probs():
    """anchor=rollout takes mu from data['rollout_log_probs'] instead of old_log_probs."""
    td, flat, x = micro_batch(seed=5, V=20)
    g = torch.Generator().manual_seed(6)
    rollout = x["old"] + 0.2 * torch.randn(x["old"].shape, generator=g)
    td["rollout_log_probs"] = rollout
    cfg_old = actor_config(ttv.TokenTrustPolicyLossConfig(loss_mode="tt_dppo_tv"), clip_ratio_c=1e9)
    cfg_roll = actor_config(ttv.TokenTrustPolicyLossConfig(loss_mode="tt_dppo_tv", tokentrust={"anchor": "rollout"}),
                            clip_ratio_c=1e9)
    _, m_old, _ = run_ppo_loss(cfg_old, td, flat)
    _, m_roll, _ = run_ppo_loss(cfg_roll, td, flat)
    m = x["mask"]
    assert m_roll["actor/ppo_kl"].aggregate() == pytest.approx(float((rollout - x["new"])[m].mean()), rel=1e-5)
    assert m_old["actor/ppo_kl"].aggregate() == pytest.approx(float((x["old"] - x["new"])[m].mean()), rel=1e-5)


# ------------------------------------------------------------------------------ configuration


def test_config_via_target_as_verl_instantiates_it():
    """`policy_loss._target_` = our subclass lets the actor yaml carry a `tokentrust` section."""
    actor = {"_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "rollout_n": 1,
             "ppo_micro_batch_size_per_gpu": 1,
             "policy_loss": {"_target_": "tokentrust.integrations.verl.TokenTrustPolicyLossConfig",
                             "loss_mode": "tt_av_dppo",
                             "tokentrust": {"delta": 0.12, "params": {"divergence": "kl"},
                                            "thresholds": {"kind": "entropy", "beta": 0.7}}}}
    cfg = omega_conf_to_dataclass(actor)
    s = ttv.settings_from_config(cfg)
    assert (s.delta, s.params, s.thresholds.kind, s.thresholds.beta) == (0.12, {"divergence": "kl"}, "entropy", 0.7)
    again = pickle.loads(pickle.dumps(cfg))  # Ray ships configs between processes
    assert type(again.policy_loss) is ttv.TokenTrustPolicyLossConfig and again.policy_loss.tokentrust["delta"] == 0.12


def test_config_via_env_file(tmp_path, monkeypatch):
    path = tmp_path / "tt.json"
    path.write_text(json.dumps({"delta": 0.3}))
    monkeypatch.setenv(ttv.ENV_CONFIG, str(path))
    old, new, adv, mask = random_inputs(seed=9)
    cfg = actor_config(clip_ratio_low=0.01, clip_ratio_high=0.01)  # plain PolicyLossConfig
    _, m = get_policy_loss_fn("tt_dppo_tv")(old, new, adv, mask, "token-mean", cfg, None)
    pi, mu = new.exp(), old.exp()
    masked = ((adv > 0) & (pi - mu > 0.3)) | ((adv < 0) & (mu - pi > 0.3))
    assert m["actor/pg_clipfrac"] == pytest.approx(float(masked[mask].float().mean()), abs=1e-6)


def test_unknown_or_reserved_settings_are_errors():
    with pytest.raises(ValueError, match="thresholdz"):
        ttv.settings_from_config(tt_config({"thresholdz": {}}))
    with pytest.raises(ValueError, match="agg"):  # aggregation is verl's loss_agg_mode, not a param
        ttv.settings_from_config(tt_config({"params": {"agg": "token-mean"}}))


def test_example_config_composes_with_verl_defaults():
    """examples/verl/config composes on top of verl's packaged ppo_trainer.yaml; the actor config it
    yields instantiates our PolicyLossConfig subclass with the tokentrust section."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "examples/verl/config"), version_base=None):
        cfg = compose(config_name="tokentrust_gsm8k",
                      overrides=["actor_rollout_ref.actor.policy_loss.tokentrust.thresholds.table=/x/f.safetensors"])
    actor = omega_conf_to_dataclass(OmegaConf.merge(cfg.actor_rollout_ref.actor, {"rollout_n": 8}))
    assert isinstance(actor.policy_loss, ttv.TokenTrustPolicyLossConfig)
    assert actor.policy_loss.loss_mode in ttv.LOSS_NAMES
    s = ttv.settings_from_config(actor)
    assert (s.thresholds.kind, s.thresholds.table, s.params) == ("frequency", "/x/f.safetensors", {"divergence": "tv"})
    assert cfg.algorithm.rollout_correction.bypass_mode and cfg.actor_rollout_ref.rollout.calculate_log_probs
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES == "tokentrust.integrations.verl"
    # rewards: verl loads tokentrust's own verifier through its custom-reward hook
    from verl.utils.import_utils import load_extern_object

    import tokentrust.rewards

    hook = cfg.reward.custom_reward_function
    assert load_extern_object(module_path=hook.path, object_name=hook.name) is tokentrust.rewards.compute_score


# ------------------------------------------------- verl semantics: dual clip, rollout IS weights


@pytest.mark.parametrize("agg", AGG_MODES)
def test_tt_ppo_clip_ratio_c_is_verl_dual_clip(agg):
    """tt_ppo = verl's vanilla PPO, clip_ratio_c included: the dual-clip bound for A < 0, not an IS cap."""
    old, new, adv, mask = random_inputs(seed=21 + AGG_MODES.index(agg))
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.3)
    out = []
    for name in ("vanilla", "tt_ppo"):
        x = new.clone().requires_grad_()
        loss, metrics = get_policy_loss_fn(name)(old, x, adv, mask, agg, cfg, None)
        out.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-8)
    r = (new - old).exp()
    assert bool(((adv < 0) & (r > 1.3) & mask).any()) and bool(((adv > 0) & (r > 1.3) & (r < 1.28 + 1) & mask).any())


def test_rollout_is_weights_only_against_recomputed_old_policy():
    """Decoupled mode: verl's rollout_is_weights (pi_old / mu) multiply the loss when the ratio is
    pi / pi_old (anchor default), and are ignored when the ratio is already pi / mu (anchor=rollout)."""
    td, flat, x = micro_batch(seed=12, V=20)
    g = torch.Generator().manual_seed(13)
    rollout = x["old"] + 0.3 * torch.randn(x["old"].shape, generator=g)
    td["rollout_log_probs"] = rollout
    weights = (x["old"] - rollout).exp().clamp(max=2.0)  # truncated pi_old / mu, as verl computes them
    loss_mode = dict(loss_mode="tt_dppo_tv")
    cfg_roll = actor_config(ttv.TokenTrustPolicyLossConfig(**loss_mode, tokentrust={"anchor": "rollout"}),
                            clip_ratio_c=1e9, clip_ratio_low=0.1, clip_ratio_high=0.1)
    cfg_old = actor_config(ttv.TokenTrustPolicyLossConfig(**loss_mode), clip_ratio_c=1e9, clip_ratio_low=0.1,
                           clip_ratio_high=0.1)
    plain_roll, _, g_plain_roll = run_ppo_loss(cfg_roll, td, flat)
    plain_old, _, _ = run_ppo_loss(cfg_old, td, flat)
    td["rollout_is_weights"] = weights
    with_w_roll, _, g_with_w_roll = run_ppo_loss(cfg_roll, td, flat)
    with_w_old, _, _ = run_ppo_loss(cfg_old, td, flat)
    torch.testing.assert_close(with_w_roll, plain_roll)  # against mu: no second correction
    torch.testing.assert_close(g_with_w_roll, g_plain_roll)
    # against pi_old: the weights enter, exactly as verl's built-in applies them
    ref, _ = get_policy_loss_fn("dppo_tv")(x["old"], x["new"], x["adv"], x["mask"], "token-mean", cfg_old, weights)
    torch.testing.assert_close(with_w_old, ref, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(with_w_old, plain_old)


# -------------------------------------------- thresholds once per rollout batch (train_mini_batch)


def dense_to_flat(td, dense: torch.Tensor) -> torch.Tensor:
    """Response values [B, R] in the model's flat no-padding layout (token j predicted at position - 1)."""
    prompt_len = td["prompts"].ne(0).sum(-1).tolist()
    resp_len = td["response_mask"].sum(-1).tolist()
    flat = torch.zeros(int(td["input_ids"].offsets()[-1]))
    end = 0
    for i, (pl, rl) in enumerate(zip(prompt_len, resp_len)):
        end += pl + rl
        flat[end - rl - 1:end - 1] = dense[i, :rl]
    return flat


class FakeEngine:
    """What TrainingWorker.train_mini_batch asks of its engine, for one process."""

    def get_data_parallel_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_group(self):
        return None

    def is_mp_src_rank_with_outputs(self):
        return False

    def train_mode(self, **kw):
        import contextlib

        return contextlib.nullcontext()


class FakeWorker:
    """verl's TrainingWorker.train_mini_batch (hooked by register()) around a fake engine whose
    train_batch runs verl's ppo_loss on micro-batches of 2 and records what each one saw."""

    def __init__(self, config):
        import functools
        import verl.workers.utils.losses as vl
        from verl.workers.engine_workers import TrainingWorker

        self.engine = FakeEngine()
        self.loss_fn = functools.partial(vl.ppo_loss, config=config)
        self.profiler = type("P", (), {"step": lambda self: None})()
        self.records = []
        self.train_mini_batch = TrainingWorker.train_mini_batch.__get__(self)

    def train_batch(self, data):
        import verl.workers.utils.losses as vl

        for mb in tu.chunk_tensordict(data, len(data) // 2):
            leaf = dense_to_flat(mb, mb["fake_new"]).requires_grad_()
            nested = torch.nested.nested_tensor_from_jagged(leaf, offsets=mb["input_ids"].offsets())
            loss, metrics = vl.ppo_loss(self.loss_fn.keywords["config"], {"log_probs": nested}, mb)
            grad = torch.autograd.grad(loss, leaf)[0]
            self.records.append((mb["row"].clone(), grad, mb))


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def rollout_batch(seed: int, V: int):
    td, _, x = micro_batch(seed, V)
    td["fake_new"] = x["new"]
    td["row"] = torch.arange(len(td))
    tu.assign_non_tensor(td, mini_batch_size=4, epochs=2, seed=0, dataloader_kwargs={"shuffle": True})
    return td, x


def test_thresholds_once_per_rollout_batch_across_epochs_and_micro_batches(tmp_path, monkeypatch, one_process_group):
    """normalize=True: every micro-batch of every epoch uses delta_t normalised over the WHOLE rollout
    batch (mean of s over all its valid tokens), not over its own 2 sequences."""
    monkeypatch.setattr(ttv, "_SCHEDULES", {})
    V = 40
    counts = torch.arange(V, dtype=torch.int64) ** 2
    table = write_table(tmp_path / "freq.safetensors", counts)
    beta, delta = 1.0, 0.1
    cfg = tt_config({"delta": delta, "thresholds": {"kind": "frequency", "beta": beta, "s_min": 0.2, "s_max": 5.0,
                                                    "normalize": True, "table": str(table)}})
    td, x = rollout_batch(seed=31, V=V)
    worker = FakeWorker(cfg)
    worker.train_mini_batch(td)
    assert len(worker.records) == 2 * 2 * 2  # epochs x mini-batches x micro-batches

    f = (counts.double() + 1) / (counts.sum() + V)
    rho = -f.log()
    rho_ref = float((counts.double() / counts.sum() * rho).sum())
    s = (beta * (rho[x["responses"]] - rho_ref)).exp().clamp(0.2, 5.0)
    m = x["mask"]
    delta_t = (delta * s / s[m].mean()).float()  # normalised over the whole batch
    keep = expected_keep(x, delta_t)
    seen, local_differs = set(), False
    for rows, grad, mb in worker.records:
        sub = {k: v[rows] for k, v in x.items()}
        assert torch.equal(reached(grad, mb, sub), keep[rows])
        local = delta * s[rows] / s[rows][sub["mask"]].mean()  # what a per-micro-batch normalisation gives
        local_differs |= not torch.equal(expected_keep(sub, local.float()), keep[rows])
        seen.update(rows.tolist())
    assert seen == set(range(len(td))) and local_differs  # the test can tell the two apart


def test_batch_frequency_ema_advances_once_per_rollout_batch(monkeypatch, one_process_group):
    """The EMA of batch frequencies moves once per train_mini_batch call (one rollout batch), not at
    each of its 8 loss calls (2 epochs x 2 mini-batches x 2 micro-batches)."""
    monkeypatch.setattr(ttv, "_SCHEDULES", {})
    V, ema, alpha = 30, 0.5, 1.0
    cfg = tt_config({"thresholds": {"kind": "batch-frequency", "ema": ema, "smoothing": alpha, "vocab_size": V}})
    worker = FakeWorker(cfg)
    expected = None
    for seed in (41, 42):
        td, x = rollout_batch(seed=seed, V=V)
        worker.train_mini_batch(td)
        counts = torch.bincount(x["responses"][x["mask"]], minlength=V).double()
        probs = (counts + alpha) / (counts.sum() + alpha * V)
        expected = probs if expected is None else ema * expected + (1 - ema) * probs
    schedule = ttv._schedule(ttv.settings_from_config(cfg), cfg)
    torch.testing.assert_close(schedule.state.probs.double(), expected, rtol=1e-6, atol=1e-9)


# ----------------------------------------- asynchronous trainers: bypass mode, mu = rollout log-probs


@pytest.mark.parametrize("trainer_yaml", ["one_step_off_policy/config/one_step_off_ppo_trainer.yaml",
                                          "fully_async_policy/config/fully_async_ppo_trainer.yaml"])
def test_async_trainers_anchor_the_loss_on_rollout_log_probs(trainer_yaml, monkeypatch):
    """verl's one-step-off and fully-async configs force bypass mode; the batch then reaches the
    tt_* loss with old_log_probs := rollout_log_probs (verl's apply_bypass_mode), so the tokentrust
    loss gets mu = the rollout engine's log-probs as behavior_logp, not a recomputed pi_old."""
    import verl
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode
    from verl.workers.config import FSDPActorConfig

    yaml = OmegaConf.load(Path(verl.__file__).parent / "experimental" / trainer_yaml)
    assert yaml.algorithm.rollout_correction.bypass_mode  # what the async trainers run with
    td, flat, x = micro_batch(seed=51, V=20)
    g = torch.Generator().manual_seed(52)
    rollout = (x["old"] + 0.3 * torch.randn(x["old"].shape, generator=g)).clamp(max=-1e-3)
    stale = torch.full_like(x["old"], -9.0)  # what must NOT be used: no old-log-prob recompute in bypass
    batch = DataProto.from_dict(tensors={"old_log_probs": stale, "rollout_log_probs": rollout,
                                         "response_mask": x["mask"].long()})
    driver_policy_loss = OmegaConf.create({"loss_mode": "tt_dppo_tv"})
    apply_bypass_mode(batch, OmegaConf.create(dict(yaml.algorithm.rollout_correction)), driver_policy_loss)
    # verl also renames the DRIVER's loss_mode; the actor workers were built with theirs (tt_*) before
    assert driver_policy_loss.loss_mode == "bypass_mode"
    td["old_log_probs"] = batch.batch["old_log_probs"]
    td["rollout_log_probs"] = batch.batch["rollout_log_probs"]

    seen = []
    real_get_loss = ttv.get_loss

    def spy(name):
        fn = real_get_loss(name)

        def call(logp, behavior_logp, *args, **kw):
            seen.append(behavior_logp.detach().clone())
            return fn(logp, behavior_logp, *args, **kw)
        return call

    monkeypatch.setattr(ttv, "get_loss", spy)
    for anchor in ("default", "rollout"):  # both give mu = rollout log-probs in bypass mode
        cfg = FSDPActorConfig(policy_loss=ttv.TokenTrustPolicyLossConfig(loss_mode="tt_dppo_tv",
                                                                       tokentrust={"anchor": anchor}),
                              strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_rollout_log_probs=True)
        run_ppo_loss(cfg, td, flat)
    m = x["mask"]
    for mu in seen:
        torch.testing.assert_close(mu[m], rollout[m])
    assert len(seen) == 2


def test_special_tokens_get_the_base_delta(tmp_path):
    """Special ids recorded in the table (EOS, pad, ...) get exactly delta and stay out of the
    normalisation mean, as in tokentrust's trainer (the EOS confound of issue 9)."""
    V, delta = 40, 0.1
    counts = torch.arange(V, dtype=torch.int64) ** 2
    table = FrequencyTable(counts=counts, tokenizer_name="test", vocab_size=V, fingerprint="f", source="test",
                           special_ids=[1, 2])
    table.save(tmp_path / "freq.safetensors")
    cfg = tt_config({"delta": delta, "thresholds": {"kind": "frequency", "beta": 1.0, "s_min": 0.2, "s_max": 5.0,
                                                    "normalize": True, "table": str(tmp_path / "freq.safetensors")}})
    td, _, x = micro_batch(seed=61, V=V)
    responses = x["responses"].clone()
    responses[:, 0] = 1  # every response starts with a special token
    td["responses"] = responses
    ttv.attach_thresholds(td, cfg)
    delta_t = delta * td["tokentrust_scale"]
    m, special = x["mask"], (responses == 1) | (responses == 2)
    assert special[m].any()
    torch.testing.assert_close(delta_t[m & special], torch.full_like(delta_t[m & special], delta))
    c = counts.double().clone()
    c[[1, 2]] = 0  # special tokens carry no corpus frequency
    f = (c + 1) / (c.sum() + V)
    rho_ref = float((c / c.sum() * -f.log()).sum())
    s = (-f.log()[responses] - rho_ref).exp().clamp(0.2, 5.0)
    normal = m & ~special
    expected = delta * s / s[normal].mean()
    torch.testing.assert_close(delta_t[normal].double(), expected[normal], rtol=1e-5, atol=1e-7)
