"""TRL adapter: TokenTrustGRPOTrainer trains on CPU, computes exactly our loss on TRL's inputs,
and with ``ppo`` reproduces TRL's own clipped loss (value and gradient) for every loss_type.

Runs only where TRL is installed (see scripts/setup_integrations.sh). The model and tokenizer are
built locally (random tiny Llama, byte-level BPE): nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from tokentrust.integrations import ThresholdSettings  # noqa: E402
from tokentrust.integrations.trl import TokenTrustGRPOConfig, TokenTrustGRPOTrainer  # noqa: E402
from tokentrust.train.models import build_tiny_model, train_bpe_tokenizer  # noqa: E402
from tokentrust.thresholds import BatchFrequencyState, compute_thresholds  # noqa: E402
from tokentrust.vocab import FrequencyTable, special_token_ids, tokenizer_hash  # noqa: E402

DATA = Dataset.from_dict({"prompt": [f"the cat {i} sat" for i in range(16)]})


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, tokenizer): a 1-layer random Llama saved locally."""
    tok = train_bpe_tokenizer([f"the cat {i} sat on the mat" for i in range(200)], vocab_size=300)
    model = build_tiny_model(tok, hidden=32, layers=1, heads=2, intermediate=64, seed=0)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def make_trainer(tiny, tmp_path, cls=TokenTrustGRPOTrainer, **cfg):
    path, tok = tiny
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=2, report_to="none", logging_steps=1, save_strategy="no",
                bf16=False, seed=0, learning_rate=5e-3)
    base.update(cfg)
    return cls(model=path, reward_funcs=length_reward, args=TokenTrustGRPOConfig(**base), train_dataset=DATA,
               processing_class=tok)


def dppo_tv_reference(logp, mu, adv, mask, delta, n, cap=3.0):
    """DPPO Binary-TV loss value written from the paper's rule: -sum_t M_t min(r_t, C) A_t / n, with
    C = 3 by default (verl's clip_ratio_c, the library's default) and None for no cap."""
    r = (logp - mu).exp()
    r = r if cap is None else r.clamp(max=cap)
    a = adv[:, None].expand_as(logp)
    pi, m = logp.exp(), mu.exp()
    masked = ((a > 0) & (pi - m > delta)) | ((a < 0) & (m - pi > delta))
    keep = mask.bool() & ~masked
    return -(keep * r * a).sum() / n, keep


def synthetic_inputs(trainer, seed: int, noise: float = 0.4) -> dict:
    """A TRL-shaped inputs dict: padded prompts/completions, group advantages, old log-probs off by noise."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 8, 4, 7
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # left padding
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[1] = 0  # an empty completion: loss types differ in whether it counts
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            C)[0]
    old = logp + noise * torch.randn(B, C, generator=g)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
            "old_per_token_logps": old, "num_items_in_batch": completion_mask.sum().float()}


def loss_and_grads(fn, trainer, inputs):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = fn(trainer, trainer.model, inputs)
    return loss.detach(), torch.autograd.grad(loss, params)


# ------------------------------------------------------------------------------------ tests


def test_two_training_steps_compute_our_loss(tiny, tmp_path):
    """Two real GRPO steps on CPU; at every micro-step the loss equals the DPPO-TV formula on the
    captured inputs, and our metrics are logged next to TRL's."""
    records = []

    class Capturing(TokenTrustGRPOTrainer):
        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                logp = self._get_per_token_logps_and_entropies(model, ids, am, inputs["completion_ids"].size(1))[0]
            records.append((loss.detach(), logp, {k: v for k, v in inputs.items() if torch.is_tensor(v)}))
            return loss

    # num_iterations=2: the second pass reuses the batch, so old_per_token_logps exist and r != 1
    trainer = make_trainer(tiny, tmp_path, cls=Capturing, num_iterations=2, tokentrust_loss="dppo-tv",
                           tokentrust_delta=0.001, learning_rate=2e-2)  # pi ~ 1/V: a small delta bites
    trainer.train()
    assert len(records) == 2
    moved = masked = 0
    for loss, logp, inp in records:
        mask = inp["completion_mask"]
        assert float(inp["num_items_in_batch"]) == float(mask.sum())  # one process, one micro-batch
        mu = inp.get("old_per_token_logps", logp)
        ref, keep = dppo_tv_reference(logp, mu, inp["advantages"], mask, 0.001, inp["num_items_in_batch"])
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
        moved += int((logp - mu).abs().max() > 1e-4)
        masked += int((mask.bool() & ~keep).sum())
    assert moved >= 1 and masked >= 1  # pi != mu and the mask bites: the comparison exercises both
    logged = trainer.state.log_history[0]
    assert {"trust_region/kept_frac", "trust_region/masked_frac", "entropy", "reward"} <= set(logged)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_ppo_matches_trl_clipped_loss(tiny, tmp_path, loss_type):
    """tokentrust 'ppo' with TRL's epsilons = TRL's own _compute_loss: same value, same gradient."""
    trainer = make_trainer(tiny, tmp_path, tokentrust_loss="ppo", epsilon=0.2, epsilon_high=0.28,
                           loss_type=loss_type)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # exercise the accumulation divisors too
    inputs = synthetic_inputs(trainer, seed=11)
    ours, g_ours = loss_and_grads(TokenTrustGRPOTrainer._compute_loss, trainer, inputs)
    theirs, g_theirs = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert 0 < clipped < 1  # TRL itself reports clipping on these inputs
    assert trainer._metrics["train"]["trust_region/masked_frac"][-1] == pytest.approx(clipped, abs=1e-6)


def test_frequency_thresholds_and_sampling_anchor(tiny, tmp_path):
    """AV-DPPO thresholds from a frequency table; mu = vLLM-style sampling log-probs (NaN -> old)."""
    path, tok = tiny
    V = len(tok)
    counts = (torch.arange(V, dtype=torch.int64) % 17) ** 3
    table = tmp_path / "freq.safetensors"
    FrequencyTable(counts=counts, tokenizer_name="tiny", vocab_size=V, fingerprint="f", source="test",
                   tokenizer_hash=tokenizer_hash(tok)).save(table)
    beta, s_min, s_max, delta = 0.8, 0.1, 10.0, 0.001  # random model: pi ~ 1/V
    trainer = make_trainer(tiny, tmp_path, tokentrust_loss="dppo-tv", tokentrust_delta=delta,
                           tokentrust_thresholds={"kind": "frequency", "beta": beta, "s_min": s_min, "s_max": s_max,
                                                  "table": str(table)})
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = synthetic_inputs(trainer, seed=5, noise=0.0)
    g = torch.Generator().manual_seed(6)
    sampling = inputs["old_per_token_logps"] + 0.5 * torch.randn(inputs["old_per_token_logps"].shape, generator=g)
    sampling[0, 0] = float("nan")  # a token the sampler could not score
    inputs["sampling_per_token_logps"] = sampling
    trainer.tokentrust_add_thresholds(inputs, train=True)  # done once per generation batch in training
    loss = TokenTrustGRPOTrainer._compute_loss(trainer, trainer.model, inputs).detach()

    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, inputs["completion_ids"].size(1))[0]
    mu = torch.where(sampling.isnan(), inputs["old_per_token_logps"], sampling)
    f = (counts.double() + 1) / (counts.sum() + V)
    rho = -f.log()
    rho_ref = float((counts.double() / counts.sum() * rho).sum())
    scale = torch.tensor([[min(max(math.exp(beta * (float(rho[t]) - rho_ref)), s_min), s_max) for t in row]
                          for row in inputs["completion_ids"].tolist()])
    n = inputs["num_items_in_batch"]
    ref, keep = dppo_tv_reference(logp, mu, inputs["advantages"], inputs["completion_mask"], delta * scale, n)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-7)
    _, keep_const = dppo_tv_reference(logp, mu, inputs["advantages"], inputs["completion_mask"], delta, n)
    assert not torch.equal(keep, keep_const)  # the schedule changed the kept set


def test_unsupported_settings_are_rejected(tiny, tmp_path):
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        make_trainer(tiny, tmp_path, loss_type="sapo")
    with pytest.raises(ValueError, match="unknown loss"):
        make_trainer(tiny, tmp_path, tokentrust_loss="nope")
    with pytest.raises(ValueError, match="decoupled-ppo needs prox_logp"):  # at construction, not at the first loss
        make_trainer(tiny, tmp_path, tokentrust_loss="decoupled-ppo")


def test_dppo_is_weight_capped_at_three_by_default(tiny, tmp_path):
    """mu = TRL's old log-probs 2 nats off: some kept ratios exceed 3. The default loss caps them at 3
    (as verl runs dppo_tv); tokentrust_params {"is_cap": null} restores the uncapped weight."""
    losses = {}
    for name, params in (("capped", None), ("uncapped", {"is_cap": None})):
        trainer = make_trainer(tiny, tmp_path, tokentrust_loss="dppo-tv", tokentrust_delta=0.5,
                               tokentrust_params=params)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = synthetic_inputs(trainer, seed=7, noise=2.0)
        losses[name] = TokenTrustGRPOTrainer._compute_loss(trainer, trainer.model, inputs).detach()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, inputs["completion_ids"].size(1))[0]
    mu, n = inputs["old_per_token_logps"], inputs["num_items_in_batch"]
    args = (logp, mu, inputs["advantages"], inputs["completion_mask"], 0.5, n)
    torch.testing.assert_close(losses["capped"], dppo_tv_reference(*args)[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["uncapped"], dppo_tv_reference(*args, cap=None)[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(losses["capped"], losses["uncapped"])  # the cap bit


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_anchor_old_applies_trl_importance_sampling_ratio(tiny, tmp_path, level):
    """anchor "old": ratio pi / pi_old, times TRL's importance_sampling_ratio (pi_old / mu_vLLM), exactly as
    TRL's own loss applies it (ppo = TRL's clipped loss): same value, same gradient. anchor "default"
    takes the ratio against the sampler, so it ignores the weights."""
    trainer = make_trainer(tiny, tmp_path, tokentrust_loss="ppo", epsilon=0.2, epsilon_high=0.28,
                           tokentrust_anchor="old")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = synthetic_inputs(trainer, seed=9)
    g = torch.Generator().manual_seed(10)
    shape = inputs["old_per_token_logps"].shape if level == "token" else (8, 1)
    weight = torch.rand(shape, generator=g) * 1.5 + 0.25
    weight[2] = 0.0  # TRL's *_mask modes zero a rejected token or sequence
    inputs["importance_sampling_ratio"] = weight
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True  # what makes TRL apply it
    ours, g_ours = loss_and_grads(TokenTrustGRPOTrainer._compute_loss, trainer, inputs)
    theirs, g_theirs = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    trainer.vllm_importance_sampling_correction = False
    plain, _ = loss_and_grads(GRPOTrainer._compute_loss, trainer, inputs)
    assert not torch.allclose(ours, plain)  # the weights mattered
    trainer.tokentrust = dataclasses.replace(trainer.tokentrust, anchor="default")
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"]  # mu = the sampler = pi_old here
    default, _ = loss_and_grads(TokenTrustGRPOTrainer._compute_loss, trainer, inputs)
    torch.testing.assert_close(default, plain, rtol=1e-5, atol=1e-7)


def test_batch_frequency_once_per_generation_batch_and_never_in_eval(tiny, tmp_path):
    """batch-frequency thresholds with an EMA: computed on each whole generation batch (8 rows, used
    by 2 accumulation steps x 2 iterations = 4 loss calls), the EMA advanced once per generation
    batch, and evaluation (which also runs the loss) leaves it untouched."""
    generated, seen = [], []

    class Capturing(TokenTrustGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            generated.append((self.model.training, batch["completion_ids"].clone(), batch["completion_mask"].clone()))
            return batch

        def _compute_loss(self, model, inputs):
            seen.append((self.model.training, inputs["completion_ids"].clone(), inputs.get("tokentrust_scale")))
            return super()._compute_loss(model, inputs)

    ema, V = 0.5, len(tiny[1])
    th = {"kind": "batch-frequency", "ema": ema, "beta": 1.0, "s_min": 0.2, "s_max": 5.0}
    trainer = make_trainer(tiny, tmp_path, cls=Capturing, tokentrust_loss="dppo-tv", tokentrust_thresholds=th,
                           gradient_accumulation_steps=2, num_iterations=2, max_steps=4,
                           per_device_eval_batch_size=4, eval_strategy="no")
    trainer.train()
    train_batches = [g for g in generated if g[0]]
    assert len(train_batches) == 2 and len([x for x in seen if x[0]]) == 8

    # reference: the EMA over whole generation batches, the thresholds from each whole batch
    state, expected_scales = BatchFrequencyState(), []
    spec = ThresholdSettings(**th).spec()
    special = torch.zeros(V, dtype=torch.bool)
    special[special_token_ids(tiny[1])] = True  # EOS / pad: base delta, not counted
    for _, ids, mask in train_batches:
        expected_scales.append(compute_thresholds(spec, 1.0, ids * mask, mask.bool(), vocab_size=V, state=state,
                                                  special=special))
    torch.testing.assert_close(trainer.tokentrust_schedule.state.probs, state.probs)
    for (_, ids, scale), k in zip([x for x in seen if x[0]], [0, 0, 0, 0, 1, 1, 1, 1]):
        _, batch_ids, _ = train_batches[k]
        rows = [next(i for i in range(len(batch_ids)) if torch.equal(batch_ids[i], r)) for r in ids]
        torch.testing.assert_close(scale, expected_scales[k][rows])

    before = trainer.tokentrust_schedule.state.probs.clone()
    trainer.evaluate(eval_dataset=DATA.select(range(2)))
    assert any(not x[0] for x in seen)  # the evaluation loss ran ...
    assert torch.equal(trainer.tokentrust_schedule.state.probs, before)  # ... and did not move the EMA


def launch(model_dir: str, out: Path, processes: int) -> list[dict]:
    """trl_distributed_run.py under `accelerate launch`; returns each rank's record.

    accelerate 1.15's `--cpu` launches ONE process whatever --num_processes says; its torchrun
    launcher (`--multi_gpu`) with use_cpu=True in the script gives MULTI_CPU on gloo, checked below.
    """
    out.mkdir()
    script = Path(__file__).with_name("trl_distributed_run.py")
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29500 + os.getpid() % 1000 + processes), str(script), model_dir, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    records = [torch.load(out / f"rank{r}.pt") for r in range(processes)]
    assert [r["world"] for r in records] == [processes] * processes and records[-1]["backend"] in ("gloo", None)
    return records


def by_row(records: list[dict], key: str) -> dict[tuple, torch.Tensor]:
    """{completion tokens: that row's values of `key` over its valid tokens}, across ranks."""
    out = {}
    for rec in records:
        for ids, mask, val in zip(rec["completion_ids"], rec["completion_mask"], rec[key]):
            n = int(mask.sum())
            out[tuple(ids[:n].tolist())] = val[:n] if val.dim() else val
    return out


def test_two_processes_match_one_process(tiny, tmp_path):
    """The same 8-row generation batch trained by 1 process and by 2 (gloo): identical per-token
    normalised batch-frequency thresholds, global normalisers and EMA state; the mean of the two
    ranks' losses (what DDP's gradient averaging optimises) equals the 1-process loss."""
    one = launch(tiny[0], tmp_path / "one", 1)
    two = launch(tiny[0], tmp_path / "two", 2)
    s1, s2 = by_row(one, "scale"), by_row(two, "scale")
    assert len(s1) == 8 and s1.keys() == s2.keys()
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-6, atol=1e-7)
    # the schedule matters: not all 1, and a per-process computation would differ
    flat = torch.cat(list(s1.values()))
    assert flat.std() > 0.05 and abs(float(flat.mean()) - 1.0) < 1e-5  # normalised over the whole batch
    local = [torch.cat([s for ids, s in by_row([r], "scale").items()]) for r in two]
    assert all(abs(float(x.mean()) - 1.0) > 1e-3 for x in local)  # each rank's share alone is not normalised
    a1, a2 = by_row(one, "advantages"), by_row(two, "advantages")
    assert all(torch.allclose(a1[k], a2[k]) for k in a1)
    assert {r["num_items_in_batch"] for r in two} == {one[0]["num_items_in_batch"]}
    assert [r["global_tokens"] * r["world"] for r in two] == [one[0]["global_tokens"]] * 2
    for r in two:
        torch.testing.assert_close(r["ema_probs"], one[0]["ema_probs"])
    assert sum(r["loss"] for r in two) / 2 == pytest.approx(one[0]["loss"], rel=1e-5, abs=1e-7)
