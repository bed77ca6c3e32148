"""scripts/hybrid_test.py: the hybrid pre-registration's validity check, its uncorrected primary and
its secondary family Holm-adjusted together (statsmodels as the reference)."""

import json

import pytest
from statsmodels.stats.multitest import multipletests

from conftest import load_script
from tests.test_report import GOOD, POOR, _write_run
from tokentrust.study.report.data import load_runs
from tokentrust.study.verdicts import compare, primary_p

METHODS = {"av-hybrid": GOOD, "av-freq-norm": POOR, "dppo-tv": POOR, "ppo": GOOD, "ppo-lowmu-exempt": POOR}


@pytest.fixture(scope="module")
def ht():
    return load_script("hybrid_test")


def _grid(root, bound):
    for m, q in METHODS.items():
        for s in range(4):
            d = root / "runs" / m / f"seed_{s}"
            _write_run(d, m, s, q)
            if m == "av-hybrid":  # the bound's share per step
                lines = (d / "metrics.jsonl").read_text().splitlines()
                recs = [json.loads(x) for x in lines[:-1]]
                for r in recs:
                    r["trust_region/ratio_bounded_frac"] = bound
                (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (root / "grid.json").write_text(json.dumps({"methods": {m: {} for m in METHODS}, "seeds": [0, 1, 2, 3]}))
    return root


def test_primary_uncorrected_and_secondary_holm_together(tmp_path, ht):
    grid = _grid(tmp_path / "g", bound=0.004)
    a = ht.analyse(grid)
    assert a["valid"] and a["bound"] == pytest.approx(0.004)
    _, _, _, summ, prob = load_runs(grid)
    ref = compare(summ, prob, "av-hybrid", "av-freq-norm", "eval/greedy_pass@1")
    assert a["primary"].result.p == pytest.approx(ref.p) and a["primary"].p_holm == pytest.approx(ref.p)
    raw = [c.result.p for c in a["family"]] + [primary_p(r.hypothesis, r.result, r.margin) for r in a["rows"]]
    assert len(raw) == 7
    got = [c.p_holm for c in a["family"]] + [r.p_holm for r in a["rows"]]
    assert got == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert [r.hypothesis.key for r in a["rows"]] == ["H1", "H3", "H4"]
    text = ht.render(a)
    assert "valid" in text and "| 3b converse, garbage |" in text


def test_a_bound_that_does_not_bind_voids_the_primary(tmp_path, ht):
    a = ht.analyse(_grid(tmp_path / "g", bound=0.0005))
    assert not a["valid"]
    text = ht.render(a)
    assert "NOT TESTED: the bound did not bind" in text and "**not tested**" in text
