"""scripts/regime_sweep.py: rows and tables from run directories (no training)."""

import json
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def sweep():
    return load_script("regime_sweep")


def _run(d: Path, rewards, greedy=None, rare=None):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as fh:
        for i, r in enumerate(rewards):
            fh.write(json.dumps({"step": i + 1, "reward/mean": r, "actor/entropy": 0.4 + 0.01 * i,
                                 "trust_region/masked_frac": 0.01, "trust_region/abs_diff_mean": 0.002,
                                 "timing/step_s": 2.0}) + "\n")
    if greedy is not None:
        (d / "eval").mkdir()
        (d / "eval" / "results.json").write_text(json.dumps(
            {"greedy_pass@1": greedy, "acc_rare_answer": rare, "acc_common_answer": 0.5, "num_rare_answer": 93,
             "num_problems": 512, "per_problem": [1, 0]}))


def test_rows_carry_the_warm_start_and_the_gain(tmp_path, sweep):
    spec = {"seeds": [1000, 1001], "methods": ["ppo"], "regimes": {"r1": {}}}
    _run(tmp_path / "r1" / "warm_start", [], greedy=0.30, rare=0.10)
    _run(tmp_path / "r1" / "runs" / "ppo" / "seed_1000", [0.2] * 10 + [0.5] * 10, greedy=0.45, rare=0.25)
    _run(tmp_path / "r1" / "runs" / "ppo" / "seed_1001", [0.2] * 20)  # not evaluated
    rows = sweep.run_sweep(spec, tmp_path, workers=1, table_only=True)
    assert [r["seed"] for r in rows] == [1000, 1001]
    first, second = rows
    assert first["warm_greedy_pass@1"] == 0.30 and first["greedy_pass@1"] == 0.45
    assert first["gain"] == pytest.approx(0.15)
    assert first["reward_first10"] == pytest.approx(0.2) and first["reward_last10"] == pytest.approx(0.5)
    assert first["entropy_first10"] == pytest.approx(0.445)
    assert first["num_rare_answer"] == 93 and first["warm_acc_rare_answer"] == 0.10
    assert "gain" not in second and "greedy_pass@1" not in second
    md = sweep.gain_table(rows)
    assert md.count("\n") == 2  # header, rule, the one evaluated run
    assert "| r1 | ppo | 1000 | 512 (93) | 0.300 | 0.450 | +0.150 | 0.100 -> 0.250 | 0.200 -> 0.500 |" in md
    assert sweep.gain_table(rows[1:]) == ""
    assert "| r1 | ppo | 2 |" in sweep.table(rows)


def test_a_regime_may_name_its_own_methods_and_seeds(tmp_path, sweep):
    spec = {"seeds": [1000], "methods": ["ppo", "dppo-tv"],
            "regimes": {"sync": {}, "stale": {"methods": ["dppo-tv"], "seeds": [1001], "rollout": {"staleness": 2}}}}
    for regime, method, seed in [("sync", "ppo", 1000), ("sync", "dppo-tv", 1000), ("stale", "dppo-tv", 1001),
                                 ("stale", "ppo", 1000)]:  # the last is outside its regime's list
        _run(tmp_path / regime / "runs" / method / f"seed_{seed}", [0.3] * 12)
    rows = sweep.run_sweep(spec, tmp_path, workers=1, table_only=True)
    assert [(r["regime"], r["method"], r["seed"]) for r in rows] == [
        ("sync", "ppo", 1000), ("sync", "dppo-tv", 1000), ("stale", "dppo-tv", 1001)]
    assert "| stale |" in sweep.mechanism_table(tmp_path, spec)


def test_a_method_may_name_its_own_seeds(tmp_path, sweep):
    """A method given as {"name", "seeds"} is tabulated on its own seeds (it was on the spec's)."""
    spec = {"seeds": [1001], "methods": ["dppo-tv", {"name": "ppo", "seeds": [1000]}], "regimes": {"r": {}}}
    for method, seed in [("dppo-tv", 1001), ("ppo", 1000)]:
        _run(tmp_path / "r" / "runs" / method / f"seed_{seed}", [0.3] * 12)
    rows = sweep.run_sweep(spec, tmp_path, workers=1, table_only=True)
    assert [(r["method"], r["seed"]) for r in rows] == [("dppo-tv", 1001), ("ppo", 1000)]
