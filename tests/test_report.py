"""Report builder on fabricated grids (synthetic metrics.jsonl + eval/results.json)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from tokentrust.metrics import summarize_run
from tokentrust.report import build_report

BASE = "dppo-tv"
AV = "av-freq"
COMMAND = "tokentrust grid --methods dppo-tv,av-freq --seeds 0,1 --steps 40"
CONFIG = {"model": "tiny", "train": {"steps": 40, "lr": 1e-5}}

# what a synthetic run looks like: the quality knobs a method can have
GOOD = dict(noise=0.01, spikes=(), greedy=0.50, rare=0.08, rare_types=12.0, nll=1.2)
POOR = dict(noise=0.10, spikes=(15, 30), greedy=0.30, rare=0.03, rare_types=6.0, nll=1.6)


def _write_run(d, seed: int, q: dict, steps: int = 40) -> None:
    rng = np.random.default_rng(seed)  # same seed -> same noise for every method
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for t in range(1, steps + 1):
            rec = {
                "step": t,
                "reward/mean": 0.2 + 0.005 * t + q["noise"] * rng.normal(),
                "loss/total": 0.1 * q["noise"] * rng.normal(),
                "actor/grad_norm": (40.0 if t in q["spikes"] else 1.0) * (1 + 0.05 * rng.random()),
                "actor/entropy": 1.5 - 0.01 * t,
                "trust_region/kept_frac": 0.9,
                "trust_region/abs_diff_mean": 0.02,
            }
            for b in range(5):
                rec[f"trust_region/kept_frac/bucket_{b}"] = 0.95 - 0.05 * b
                rec[f"trust_region/delta_mean/bucket_{b}"] = 0.15 * (1 + 0.2 * b)
                rec[f"rare/share/bucket_{b}"] = [0.5, 0.3, 0.15, q["rare"], 0.001][b]
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 41, "reward/me')  # a crash mid-write
    (d / "eval").mkdir()
    jitter = 0.01 * seed
    (d / "eval" / "results.json").write_text(
        json.dumps(
            {
                "greedy_pass@1": q["greedy"] + jitter,
                "mean@k": q["greedy"] - 0.05 + jitter,
                "pass@k": q["greedy"] + 0.2 + jitter,
                "k": 4,
                "n": 4,
                "coherence_nll": q["nll"] + jitter,
                "rare_share": q["rare"] + jitter / 10,
                "distinct_rare_per_1k": q["rare_types"] + jitter,
                "distinct_2": 0.6,
                "bucket_shares": [0.5, 0.3, 0.15, q["rare"], 0.001],
            }
        )
    )
    (d / "DONE").write_text("")


def _make_grid(root, av_quality: dict, base_quality: dict, seeds=(0, 1, 2), av_family="av-dppo"):
    methods = {
        BASE: {
            "loss": "dppo_tv",
            "delta": 0.15,
            "description": "fixed-threshold DPPO",
            "family": "dppo",
        },
        AV: {
            "loss": "av_dppo",
            "delta": 0.15,
            "beta": 0.5,
            "description": "frequency thresholds",
            "family": av_family,
        },
    }
    root.mkdir(parents=True)
    (root / "grid.json").write_text(
        json.dumps({"methods": methods, "seeds": list(seeds), "command": COMMAND, "config": CONFIG})
    )
    for s in seeds:
        _write_run(root / "runs" / BASE / f"seed_{s}", s, base_quality)
        _write_run(root / "runs" / AV / f"seed_{s}", s, av_quality)
    return root


def _first_paragraph(text: str) -> str:
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return next(b for b in blocks if not b.startswith("#"))


def _verdicts(report_path) -> dict[str, str]:
    para = _first_paragraph(report_path.read_text())
    out = {}
    for h in ("H1", "H2", "H3", "H4"):
        m = re.search(rf"\*\*{h} [^*]*: (SUPPORTED|CONTRADICTED|INCONCLUSIVE)\*\*", para)
        assert m, f"{h} verdict missing from first paragraph: {para}"
        out[h] = m[1]
    return out


def test_report_files_and_supported(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    path = build_report(grid, baseline=BASE, n_boot=2000)
    text = path.read_text()
    assert path == grid / "report.md"
    assert _verdicts(path) == {
        "H1": "SUPPORTED",
        "H2": "SUPPORTED",
        "H3": "SUPPORTED",
        "H4": "SUPPORTED",
    }
    # exact command and config are in the report
    assert COMMAND in text
    assert json.dumps(CONFIG, indent=2, sort_keys=True) in text
    # plots exist, are PNGs and are linked
    for name in ("reward", "entropy", "rare_share", "kept_frac_buckets", "accuracy"):
        png = grid / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in text
    # summary.csv: one row per run plus mean / ci_lo / ci_hi per method, values from summarize_run
    rows = list(csv.DictReader(open(grid / "summary.csv")))
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, str(s)) for m in (BASE, AV) for s in (0, 1, 2)
    )
    for r in runs:
        ref = summarize_run(grid / "runs" / r["method"] / f"seed_{r['seed']}")
        assert float(r["eval/greedy_pass@1"]) == pytest.approx(ref["eval/greedy_pass@1"])
        assert float(r["stability/grad_spikes"]) == ref["stability/grad_spikes"]
    agg = {(r["kind"], r["method"]): r for r in rows if r["kind"] != "run"}
    assert set(agg) == {(k, m) for k in ("mean", "ci_lo", "ci_hi") for m in (BASE, AV)}
    assert float(agg[("mean", AV)]["eval/greedy_pass@1"]) == pytest.approx(0.51)
    lo, hi = (
        float(agg[("ci_lo", AV)]["eval/greedy_pass@1"]),
        float(agg[("ci_hi", AV)]["eval/greedy_pass@1"]),
    )
    assert lo == pytest.approx(0.50) and hi == pytest.approx(0.52)
    # the paired-difference table reports the accuracy gain of +0.2 in every seed
    assert re.search(r"eval/greedy_pass@1 ↑ \| \*\*0\.2 \[0\.2, 0\.2\]\*\* wins 3/3", text)


def test_identical_data_is_inconclusive(tmp_path):
    grid = _make_grid(tmp_path / "g", POOR, POOR)
    v = _verdicts(build_report(grid, baseline=BASE, n_boot=2000))
    assert v == {h: "INCONCLUSIVE" for h in ("H1", "H2", "H3", "H4")}


def test_worse_everywhere_is_contradicted(tmp_path):
    grid = _make_grid(tmp_path / "g", POOR, GOOD)
    v = _verdicts(build_report(grid, baseline=BASE, n_boot=2000))
    assert v == {h: "CONTRADICTED" for h in ("H1", "H2", "H3", "H4")}


def test_rare_gain_with_accuracy_loss_contradicts_h3(tmp_path):
    # more rare tokens, but lower accuracy: H3's accuracy guard fails
    av = dict(POOR, rare=0.08, rare_types=12.0)
    grid = _make_grid(tmp_path / "g", av, dict(POOR, greedy=0.5))
    v = _verdicts(build_report(grid, baseline=BASE, n_boot=2000))
    assert v["H3"] == "CONTRADICTED" and v["H2"] == "CONTRADICTED"
    assert v["H1"] == "INCONCLUSIVE" and v["H4"] == "INCONCLUSIVE"


def test_family_decides_which_methods_are_judged(tmp_path):
    # the same clearly-better data, but the method is not declared AV-DPPO: nothing is supported
    grid = _make_grid(tmp_path / "g", GOOD, POOR, av_family="ppo")
    v = _verdicts(build_report(grid, baseline=BASE, n_boot=500))
    assert set(v.values()) == {"INCONCLUSIVE"}


def test_too_few_seeds_is_inconclusive_and_missing_baseline_raises(tmp_path):
    for seeds in ((0,), (0, 1)):  # a percentile CI over 1 or 2 pairs decides nothing
        grid = _make_grid(tmp_path / f"g{len(seeds)}", GOOD, POOR, seeds=seeds)
        v = _verdicts(build_report(grid, baseline=BASE, n_boot=500))
        assert set(v.values()) == {"INCONCLUSIVE"}
    with pytest.raises(ValueError, match="baseline"):
        build_report(grid, baseline="ppo")
