"""The study's pieces: grid parts, dose-response cells, answer-class accuracy, garbage share and the
rarity-vs-mu mechanism metric, each against a hand computation or an independent formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from tokentrust.study import compare
from tokentrust.train.config import ConfigError, resolve
from tokentrust.train.diagnostics import mechanism_metrics
from tokentrust.study.eval_metrics import accuracy_by_answer_class, garbage_share, task_results, unseen_tokens
from tokentrust.tasks.arith import MEASURES, OBJECTS, RARE_ANSWER_MASS, ZIPF_S, Arith
from tokentrust.vocab import TokenInfo


# ------------------------------------------------------------------------------ grid parts

def test_study_parts_cover_the_grid_once():
    spec = compare.load_grid("stress-study")
    names = list(compare.expand_methods(spec["methods"]))
    in_parts = [m for part in spec["parts"].values() for m in part]
    assert sorted(in_parts) == sorted(names) and len(in_parts) == len(set(in_parts))
    with pytest.raises(ConfigError, match="no part '9'"):
        compare.part_runs(spec, "9")
    with pytest.raises(ConfigError, match="not in grid.methods"):
        compare.part_runs({**spec, "parts": {"1": ["nope"]}}, "1")
    every = {(n, s) for n, s, _ in compare.run_configs(spec, compare.Path("/tmp/unused"))}
    pairs = [p for part in spec["parts"] for p in compare.part_runs(spec, part)]
    assert sorted(pairs) == sorted(every)


def test_run_grid_runs_only_the_part(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(compare, "_run_one", lambda cfg, status, threads: ran.append(cfg.out_dir))
    spec = {"name": "g", "preset": "tiny-arith", "seeds": [0, 1], "methods": ["ppo", "dppo-tv", "pg-is"],
            "parts": {"a": ["ppo", "pg-is"], "b": ["dppo-tv"]}}
    compare.run_grid(spec, tmp_path, part="a", build_report=False, quiet=True)
    assert ran[0].endswith("warm_start")  # the reference evaluation, first: it builds the warm start once
    assert sorted(p.split("/runs/")[1] for p in ran[1:]) == ["pg-is/seed_0", "pg-is/seed_1", "ppo/seed_0", "ppo/seed_1"]
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert set(grid["methods"]) == {"ppo", "dppo-tv", "pg-is"} and grid["parts"]["b"] == ["dppo-tv"]


def test_a_part_may_select_seeds(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(compare, "_run_one", lambda cfg, status, threads: ran.append(cfg.out_dir))
    spec = {"name": "g", "preset": "tiny-arith", "seeds": [0, 1, 2], "methods": ["ppo", {"name": "pg-is", "seeds": [1]}],
            "parts": {"a": {"seeds": [0, 1]}, "b": {"methods": ["ppo"], "seeds": [2]}}}
    compare.run_grid(spec, tmp_path, part="a", build_report=False, quiet=True)
    assert sorted(p.split("/runs/")[1] for p in ran[1:]) == ["pg-is/seed_1", "ppo/seed_0", "ppo/seed_1"]
    assert compare.part_runs(spec, "b") == {("ppo", 2)}


def test_dose_cells_are_the_declared_doses():
    spec = compare.load_grid("stress-study")
    cfgs = {n: c for n, s, c in compare.run_configs(spec, compare.Path("/tmp/unused")) if s == 0}
    betas = {c.algo.thresholds.beta for n, c in cfgs.items()
             if c.algo.delta == 0.15 and c.algo.thresholds.kind == "frequency" and c.algo.thresholds.normalize}
    assert betas == {-1.0, -0.5, 0.0, 0.5, 1.0, 2.0}
    for base in ("dppo-tv", "av-freq-norm"):
        th = cfgs[base].algo.thresholds
        deltas = {c.algo.delta for c in cfgs.values() if c.algo.loss == "dppo-tv"
                  and c.algo.thresholds.kind == th.kind and c.algo.thresholds.beta == th.beta
                  and c.algo.thresholds.normalize == th.normalize}
        assert deltas == {0.05, 0.1, 0.15, 0.3}, base


def test_beta_zero_reproduces_dppo_tv(tmp_path):
    """The dose-response origin: AV-DPPO with beta 0 trains exactly as the fixed threshold does."""
    from tokentrust.train.loop import run_training
    from tokentrust.train.rundir import read_jsonl

    spec = compare.load_grid("stress-study")
    methods = compare.expand_methods(spec["methods"])
    out = {}
    for name in ("dppo-tv", "av-beta0"):
        over = tiny_overrides(tmp_path / name, algo=methods[name]["algo"], rollout={"staleness": 1})
        over["algo"].setdefault("thresholds", {"kind": "constant"})
        out[name] = read_jsonl(run_training(resolve(preset="tiny-arith", overrides=over), quiet=True) / "metrics.jsonl")
    keys = ("reward/mean", "loss/policy", "trust_region/kept_frac", "actor/grad_norm")
    for a, b in zip(out["dppo-tv"], out["av-beta0"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


# ----------------------------------------------------------------------- answer-class accuracy

def _tail(pairs, n_first):
    w = np.array([1.0 / (r + 1) ** ZIPF_S for r in range(len(pairs))])
    before = np.concatenate([[0.0], np.cumsum(w)[:-1]]) / w.sum()
    return {p[n_first] for p, b in zip(pairs, before) if b >= RARE_ANSWER_MASS}


def test_arith_answer_class_is_the_zipf_tail():
    task = Arith()
    rare_objects = _tail(OBJECTS, 1)
    rare_units = _tail([(s, p) for s, p, _ in MEASURES], 1)
    assert task.answer_class("3 apples") == "common" and task.answer_class("1 apple") == "common"
    assert "ziggurats" in rare_objects and task.answer_class("12 ziggurats") == "rare"
    assert task.answer_class("7 liters") == "common" and task.answer_class("2 pottles") == "rare"
    for plural in rare_objects | rare_units:
        assert task.answer_class(f"4 {plural}") == "rare"
    assert task.answer_class("4 unicorns") is None and task.answer_class("42") is None
    classes = [task.answer_class(ex.answer) for ex in task.examples("test")]
    assert 0.1 < classes.count("rare") / len(classes) < 0.35  # the tail is drawn about 20% of the time


def test_accuracy_by_answer_class_hand_case():
    out = accuracy_by_answer_class(["rare", "common", None, "rare"], [True, False, True, False],
                                   [[True, True], [False, True], [True, True], [False, False]])
    assert out == {"num_rare_answer": 2.0, "acc_rare_answer": 0.5, "mean@k_rare_answer": 0.5,
                   "num_common_answer": 1.0, "acc_common_answer": 0.0, "mean@k_common_answer": 0.5}
    assert accuracy_by_answer_class([None, None], [True, False], [[True], [False]]) == {}


# ------------------------------------------------------------------------------ garbage share

def _info(bucket, special=None):
    bucket = torch.tensor(bucket)
    n = len(bucket)
    special = torch.zeros(n, dtype=torch.bool) if special is None else torch.tensor(special)
    return TokenInfo(torch.zeros(n), bucket, torch.zeros(n, dtype=torch.bool), special, 4, 0.0)


def test_garbage_share_counts_outputs_with_an_unseen_token():
    info = _info([0, 1, 2, 0, 3, 2])  # 2 buckets of mass, unseen = 2, special = 3
    unseen = unseen_tokens(info)
    assert unseen.tolist() == [False, False, True, False, False, True]
    assert garbage_share([[0, 1], [0, 2], [3, 4], [1, 5, 5], [9]], unseen) == pytest.approx(3 / 5)  # 9: beyond
    assert math.isnan(garbage_share([], unseen))
    res = task_results(Arith(), ["2 apples"], [True], [[True, False]], [[0], [2]], info)
    assert res["garbage_share"] == 0.5 and res["acc_common_answer"] == 1.0 and res["num_rare_answer"] == 0.0


# --------------------------------------------------------------------------------- mechanism

def test_mechanism_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    rarity = torch.rand(3, 5, generator=g) * 8
    logp = -(0.5 * rarity + torch.rand(3, 5, generator=g))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    buckets = (rarity > 4).long()
    out = mechanism_metrics(rarity, logp, mask, buckets, 3)
    x, y = rarity[mask].numpy(), -logp[mask].numpy()
    assert out["mechanism/corr_rarity_neglogmu"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
    mu = np.exp(-y)
    b = buckets[mask].numpy()
    assert out["mechanism/mu_mean/bucket_0"] == pytest.approx(mu[b == 0].mean(), rel=1e-6)
    assert out["mechanism/mu_mean/bucket_1"] == pytest.approx(mu[b == 1].mean(), rel=1e-6)
    assert math.isnan(out["mechanism/mu_mean/bucket_2"])
    flat = mechanism_metrics(torch.ones(2, 2), logp[:2, :2], torch.ones(2, 2, dtype=torch.bool),
                             torch.zeros(2, 2, dtype=torch.long), 1)
    assert "mechanism/corr_rarity_neglogmu" not in flat  # no variance: no correlation


# ------------------------------------------------------------------------------ report sections

def test_dose_series_are_read_from_the_method_descriptions():
    from tokentrust.study.report.sections import dose_series

    methods = {m: {k: v for k, v in e["algo"].items()} for m, e in compare.expand_methods(
        compare.load_grid("stress-study")["methods"]).items()}
    series = dose_series(methods)
    beta = dict(series["beta (frequency-normalised, delta 0.15)"])
    assert beta == {-1.0: "av-beta-1", -0.5: "av-freq-inverse", 0.0: "av-beta0", 0.5: "av-freq-norm",
                    1.0: "av-beta1", 2.0: "av-beta2"}
    assert dict(series["delta, fixed threshold (dppo-tv)"]) == {
        0.05: "dppo-tv-delta0.05", 0.1: "dppo-tv-delta0.1", 0.15: "dppo-tv", 0.3: "dppo-tv-delta0.3"}
    assert [m for _, m in series["delta, frequency-normalised beta 0.5"]] == [
        "av-freq-norm-delta0.05", "av-freq-norm-delta0.1", "av-freq-norm", "av-freq-norm-delta0.3"]
    assert dose_series({"ppo": {"loss": "ppo"}}) == {}


def test_descriptive_fe_slope_matches_statsmodels_with_seed_fixed_effects():
    import pandas as pd
    import statsmodels.formula.api as smf

    from tokentrust.study.report.sections import trend_fixed_effects as trend

    rng = np.random.default_rng(3)
    pts = [(x, s, 0.3 * x + 0.5 * s + rng.normal(0, 0.2)) for x in (-1, -0.5, 0, 0.5, 1, 2) for s in range(4)]
    slope, lo, hi, p = trend(pts)
    fit = smf.ols("y ~ x + C(s)", pd.DataFrame(pts, columns=["x", "s", "y"])).fit()
    assert slope == pytest.approx(fit.params["x"], rel=1e-9)
    assert (lo, hi) == pytest.approx(tuple(fit.conf_int().loc["x"]), rel=1e-9)
    assert p == pytest.approx(fit.pvalues["x"], rel=1e-6)
    assert all(math.isnan(v) for v in trend([(0, 0, 1.0), (1, 0, 2.0)]))  # no residual degrees of freedom


def test_study_preset_runs_each_regime_into_its_own_folder(tmp_path, monkeypatch):
    from tokentrust.cli import main

    calls = []
    monkeypatch.setattr(compare, "run_grid", lambda spec, out, **kw: calls.append((spec["name"], str(out))))
    assert main(["compare", "--preset", "study", "--out", str(tmp_path)]) == 0
    assert calls == [(g, str(tmp_path / g)) for g in ("stress-study", "sync-study", "smollm2-study")]
    assert compare.load_grid("sync-study")["preset"] == "tiny-arith"  # the synchronous control regime


def test_grid_evaluates_the_warm_start_once_as_its_reference(tmp_path, monkeypatch):
    from pathlib import Path

    ran = []

    def fake_run(cfg, status, threads):
        ran.append((cfg.out_dir, cfg.max_steps, cfg.seed, cfg.task.eval_limit))
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "DONE").write_text("{}")

    monkeypatch.setattr(compare, "_run_one", fake_run)
    spec = {"name": "g", "preset": "tiny-arith", "seeds": [3], "methods": ["ppo"],
            "overrides": {"task": {"eval_limit": 7}}}
    compare.run_grid(spec, tmp_path, build_report=False, quiet=True)
    compare.run_grid(spec, tmp_path, build_report=False, quiet=True)  # both DONE: nothing runs again
    assert ran == [(str(tmp_path / "warm_start"), 0, 3, 7), (str(tmp_path / "runs/ppo/seed_3"), 40, 3, 7)]


def test_mechanism_section_means_over_steps_then_seeds():
    from types import SimpleNamespace

    from tokentrust.study.report.sections import section_mechanism

    recs = {0: [{"mechanism/corr_rarity_neglogmu": 0.2, "mechanism/mu_mean/bucket_0": 0.9,
                 "mechanism/mu_mean/bucket_1": float("nan")},
                {"mechanism/corr_rarity_neglogmu": 0.4, "mechanism/mu_mean/bucket_0": 0.7}],
            1: [{"mechanism/corr_rarity_neglogmu": 0.6, "mechanism/mu_mean/bucket_0": 0.5,
                 "mechanism/mu_mean/bucket_1": 0.1}]}
    out = section_mechanism(SimpleNamespace(records={"m": recs, "ppo": {0: [{"step": 1}]}}))
    row = out[-1].splitlines()[-1]
    # r = mean(mean(0.2, 0.4), 0.6) = 0.45; mu: bucket 0 over all steps (0.9, 0.7, 0.5), bucket 1 (0.1)
    assert row == "| `m` | 2 | 0.450 | 0.203 | 0.797 | 0.700 / 0.100 |"
    assert section_mechanism(SimpleNamespace(records={"ppo": {0: [{"step": 1}]}})) == []
