"""Report builder on fabricated grids (synthetic metrics.jsonl, config.json, eval results and
per-problem outcomes); the statistics themselves are tested in test_inference / test_calibration."""

from __future__ import annotations

import csv
import json
import math
import re
import zlib

import numpy as np
import pytest
from scipy import stats

from tokentrust.study.metrics import summarize_run
from tokentrust.study.report.build import build_report

BASE = "dppo-tv"
AV = "av-freq"
COMMAND = "tokentrust compare --preset x --out runs/x"
CONFIG = {"model": "tiny", "train": {"steps": 40, "lr": 1e-5}}
PROMPTS, GROUP = 8, 8  # samples per step m = 64
N_PROBLEMS = 60

# quality knobs of a synthetic method: extra per-step policy noise on the reward, eval accuracy,
# rare-token share and coherence NLL
GOOD = dict(jump=0.0, acc=0.75, rare=0.08, nll=1.2)
POOR = dict(jump=0.12, acc=0.45, rare=0.03, nll=1.6)
SEEDS8 = tuple(range(8))


def _rng(method: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{method}/{seed}".encode()))


def _write_run(d, method: str, seed: int, q: dict, steps: int = 40) -> None:
    rng = _rng(method, seed)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"rollout": {"prompts_per_step": PROMPTS, "group_size": GROUP}}))
    m = PROMPTS * GROUP
    with open(d / "metrics.jsonl", "w") as f:
        for t in range(1, steps + 1):
            p = float(np.clip(0.3 + 0.008 * t + q["jump"] * rng.normal(), 0.02, 0.98))
            rec = {
                "step": t,
                "reward/mean": rng.binomial(m, p) / m,
                "loss/total": 0.01 * rng.normal(),
                "actor/grad_norm": 1.0 + 0.05 * rng.random(),
                "actor/entropy": 1.5 - 0.01 * t,
                "trust_region/kept_frac": 0.9,
            }
            for b in range(5):
                rec[f"trust_region/kept_frac/bucket_{b}"] = 0.95 - 0.05 * b
                rec[f"rare/share/bucket_{b}"] = [0.5, 0.3, 0.15, q["rare"], 0.001][b]
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 41, "reward/me')  # a crash mid-write
    (d / "eval").mkdir()
    offset = 0.05 * rng.normal()  # training randomness shifts the whole run
    difficulty = np.random.default_rng(123).normal(size=N_PROBLEMS)  # shared by every run
    p_correct = 1 / (1 + np.exp(-(np.log(q["acc"] / (1 - q["acc"])) + offset - difficulty)))
    greedy = rng.random(N_PROBLEMS) < p_correct
    samples = rng.random((N_PROBLEMS, 4)) < p_correct[:, None]
    rows = [
        {"id": f"p{i}", "greedy_correct": bool(greedy[i]), "samples_correct": samples[i].tolist()}
        for i in range(N_PROBLEMS)
    ]
    (d / "eval" / "problems.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval" / "results.json").write_text(
        json.dumps(
            {
                "greedy_pass@1": float(greedy.mean()),
                "mean@k": float(samples.mean()),
                "pass@k": float(samples.any(1).mean()),
                "k": 4,
                "n": 4,
                "coherence_nll": q["nll"] + 0.05 * rng.normal(),
                "rare_share": q["rare"] + 0.001 + 0.005 * rng.normal(),
                "distinct_rare_per_1k": 100 * q["rare"] + rng.normal(),
                "distinct_2": 0.6,
                "bucket_shares": [0.5, 0.3, 0.15, q["rare"], 0.001, 0.0],  # ..., unseen, special
            }
        )
    )
    (d / "DONE").write_text("")


def _make_grid(root, av_quality, base_quality, seeds=SEEDS8, av_family="av-dppo", primary=True):
    methods = {
        BASE: {"loss": "dppo-tv", "delta": 0.15, "description": "fixed-threshold DPPO", "family": "baseline"},
        AV: {"loss": "dppo-tv", "delta": 0.15, "description": "frequency thresholds", "family": av_family},
    }
    grid = {"methods": methods, "seeds": list(seeds), "command": COMMAND, "config": CONFIG}
    if primary:
        grid["primary"] = {"method": AV, "baseline": BASE}
    root.mkdir(parents=True)
    (root / "grid.json").write_text(json.dumps(grid))
    for s in seeds:
        _write_run(root / "runs" / BASE / f"seed_{s}", BASE, s, base_quality)
        _write_run(root / "runs" / AV / f"seed_{s}", AV, s, av_quality)
    return root


def _first_paragraph(text: str) -> str:
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return next(b for b in blocks if not b.startswith("#"))


def _verdicts(report_path) -> dict[str, str]:
    para = _first_paragraph(report_path.read_text())
    out = {}
    for h in ("H1", "H2", "H3", "H4"):
        m = re.search(rf"\*\*{h} [^*]*: (SUPPORTED|CONTRADICTED|INCONCLUSIVE|EQUIVALENT)\*\*", para)
        assert m, f"{h} verdict missing from first paragraph: {para}"
        out[h] = m[1]
    return out


def test_report_files_and_supported(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    path = build_report(grid, baseline=BASE)
    text = path.read_text()
    assert path == grid / "report.md"
    assert _verdicts(path) == {h: "SUPPORTED" for h in ("H1", "H2", "H3", "H4")}
    assert "declared in grid.json" in _first_paragraph(text)
    assert "2/2^n = 0.0078 at n = 8" in text
    assert COMMAND in text
    assert json.dumps(CONFIG, indent=2, sort_keys=True) in text
    for name in ("forest", "reward", "entropy", "rare_share", "kept_frac_buckets", "accuracy"):
        png = grid / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in text
    # summary.csv: one row per run plus mean / ci_lo / ci_hi (t-interval) per method
    rows = list(csv.DictReader(open(grid / "summary.csv")))
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, str(s)) for m in (BASE, AV) for s in SEEDS8)
    for r in runs:
        ref = summarize_run(grid / "runs" / r["method"] / f"seed_{r['seed']}")
        assert float(r["eval/greedy_pass@1"]) == pytest.approx(ref["eval/greedy_pass@1"])
        assert float(r["stability/reward_noise_norm"]) == pytest.approx(ref["stability/reward_noise_norm"])
    agg = {(r["kind"], r["method"]): r for r in rows if r["kind"] != "run"}
    assert set(agg) == {(k, m) for k in ("mean", "ci_lo", "ci_hi") for m in (BASE, AV)}
    vals = np.array([float(r["eval/greedy_pass@1"]) for r in runs if r["method"] == AV])
    half = stats.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size)
    assert float(agg[("mean", AV)]["eval/greedy_pass@1"]) == pytest.approx(vals.mean())
    assert float(agg[("ci_lo", AV)]["eval/greedy_pass@1"]) == pytest.approx(vals.mean() - half)
    assert float(agg[("ci_hi", AV)]["eval/greedy_pass@1"]) == pytest.approx(vals.mean() + half)


def test_primary_comparison_is_not_repeated_as_secondary(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    text = build_report(grid, baseline=BASE).read_text()
    secondary = text.split("## Secondary comparisons", 1)[1].split("## Setup", 1)[0]
    assert "stability/reward_noise_norm" not in secondary  # H1's primary
    assert "stability/collapse_count" in secondary and "eval/mean@k" in secondary
    assert "Holm-corrected across all" in secondary


def test_identical_methods_are_inconclusive_and_state_the_mde(tmp_path):
    grid = _make_grid(tmp_path / "g", POOR, POOR)
    path = build_report(grid, baseline=BASE)
    # H4 is non-inferiority: identical NLL (run sd 0.05) is shown to be within the 0.1 margin
    assert _verdicts(path) == {"H1": "INCONCLUSIVE", "H2": "INCONCLUSIVE", "H3": "INCONCLUSIVE", "H4": "SUPPORTED"}
    para = _first_paragraph(path.read_text())
    assert para.count("detectable at n = 8 with 80% power (level 0.0125)") == 3
    assert para.count("no detectable improvement; equivalence within ±") == 3
    assert "non-inferiority margin 0.1 (nll higher by at most 0.1)" in para
    assert "seeds for 80% power at the observed difference" in para


def test_worse_everywhere_is_contradicted(tmp_path):
    grid = _make_grid(tmp_path / "g", POOR, GOOD)
    v = _verdicts(build_report(grid, baseline=BASE))
    assert v == {h: "CONTRADICTED" for h in ("H1", "H2", "H3", "H4")}


def test_rare_gain_with_accuracy_loss_contradicts_h3(tmp_path):
    av = dict(POOR, rare=0.08)  # more rare tokens, but the baseline is more accurate
    grid = _make_grid(tmp_path / "g", av, dict(POOR, acc=0.75))
    path = build_report(grid, baseline=BASE)
    v = _verdicts(path)
    assert v["H3"] == "CONTRADICTED" and v["H2"] == "CONTRADICTED"
    assert v["H1"] == "INCONCLUSIVE" and v["H4"] == "SUPPORTED"  # same NLL: non-inferior
    assert "guard eval/greedy_pass@1 is worse than the non-inferiority margin 0.05" in path.read_text()


def test_default_primary_and_family(tmp_path):
    # no `primary` in grid.json: the first av-dppo method is compared with the baseline, and the
    # report says the comparison was defaulted
    grid = _make_grid(tmp_path / "a", GOOD, POOR, primary=False)
    path = build_report(grid, baseline=BASE)
    assert "defaulted (grid.json has no `primary`)" in _first_paragraph(path.read_text())
    assert _verdicts(path)["H2"] == "SUPPORTED"
    # the same data without an av-dppo method and without a declaration: nothing is judged
    grid = _make_grid(tmp_path / "b", GOOD, POOR, av_family="baseline", primary=False)
    path = build_report(grid, baseline=BASE)
    assert set(_verdicts(path).values()) == {"INCONCLUSIVE"}
    assert "no primary declared" in _first_paragraph(path.read_text())


def test_three_seeds_state_the_permutation_floor(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR, seeds=(0, 1, 2))
    text = build_report(grid, baseline=BASE).read_text()
    assert "2/2^n = 0.250 at n = 3, and with fewer than 6 paired seeds it cannot reach p < 0.05" in text
    assert "the paired t-test is therefore the deciding test" in text


def test_bad_primary_spec_and_missing_baseline_raise(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR, seeds=(0, 1))
    with pytest.raises(ValueError, match="baseline"):
        build_report(grid, baseline="ppo")
    spec = json.loads((grid / "grid.json").read_text())
    for primary, field in (({"method": "nope"}, r"grid\.primary\.H1\.method"),
                           ({"method": AV, "H9": {}}, r"grid\.primary: unknown key"),
                           ({"method": AV, "H2": {"metric": "x"}}, r"grid\.primary\.H2")):
        (grid / "grid.json").write_text(json.dumps({**spec, "primary": primary}))
        with pytest.raises(ValueError, match=field):
            build_report(grid, baseline=BASE)


def test_runs_still_training_are_left_out_and_named(tmp_path):
    from tokentrust.study.report.build import build_report
    from tokentrust.study.report.data import load_grid

    g = _make_grid(tmp_path / "grid", GOOD, POOR, seeds=(0, 1, 2))
    partial = g / "runs" / BASE / "seed_9"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.0}) + "\n")
    _, runs = load_grid(g)
    assert 9 not in runs[BASE] and len(runs[BASE]) == 3
    report = build_report(g).read_text()
    assert f"Left out, still training or stopped before evaluation: {BASE}/seed_9." in report


def test_greedy_only_evaluation_reports_without_sampled_metrics(tmp_path):
    """eval_samples 0 (the SmolLM2 grid): no mean@k / pass@k anywhere, and H2 still tested per problem."""
    grid = _make_grid(tmp_path / "g", POOR, POOR, seeds=(0, 1, 2))
    for res in grid.glob("runs/*/seed_*/eval/results.json"):
        r = json.loads(res.read_text())
        res.write_text(json.dumps({k: v for k, v in r.items() if k not in ("mean@k", "pass@k", "k", "n")}))
        probs = res.parent / "problems.jsonl"
        rows = [{**json.loads(x), "samples_correct": []} for x in probs.read_text().splitlines()]
        probs.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    text = build_report(grid, baseline=BASE).read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows and not [r for r in rows if "mean@k" in r or "eval/pass@k" in r]
    assert _verdicts(grid / "report.md")["H2"] == "INCONCLUSIVE"
    assert "eval/greedy_pass@1" in text


def test_method_tables_use_matched_seeds_only(tmp_path):
    """AV has seeds 0-7, the baseline 0-3: every method-vs-method table (summary.csv means, the
    per-method summary) is on the shared seeds 0-3, never AV's 8-seed mean next to a 4-seed one."""
    import shutil

    grid = _make_grid(tmp_path / "g", GOOD, POOR)
    for s in range(4, 8):
        shutil.rmtree(grid / "runs" / BASE / f"seed_{s}")
    text = build_report(grid, baseline=BASE).read_text()
    rows = list(csv.DictReader(open(grid / "summary.csv")))
    av_runs = {int(r["seed"]): float(r["eval/greedy_pass@1"]) for r in rows if r["kind"] == "run" and r["method"] == AV}
    assert sorted(av_runs) == list(range(8))  # every run is still listed
    mean = next(r for r in rows if r["kind"] == "mean" and r["method"] == AV)
    assert float(mean["eval/greedy_pass@1"]) == pytest.approx(np.mean([av_runs[s] for s in range(4)]))
    assert float(mean["eval/greedy_pass@1"]) != pytest.approx(np.mean(list(av_runs.values())))
    summary = text.split("## Per-method summary", 1)[1].split("\n## ", 1)[0]
    assert f"| `{AV}` | 4 |" in summary


def test_warm_start_is_a_summary_row(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR, seeds=(0, 1, 2))
    (grid / "warm_start" / "eval").mkdir(parents=True)
    (grid / "warm_start" / "eval" / "results.json").write_text(
        json.dumps({"greedy_pass@1": 0.625, "coherence_nll": 0.75, "bucket_shares": [0.5, 0.3, 0.15, 0.04, 0.01]}))
    build_report(grid, baseline=BASE)
    rows = list(csv.DictReader(open(grid / "summary.csv")))
    warm = [r for r in rows if r["kind"] == "warm_start"]
    assert len(warm) == 1 and warm[0]["method"] == "warm_start"
    assert float(warm[0]["eval/greedy_pass@1"]) == 0.625 and float(warm[0]["coherence/nll"]) == 0.75
    assert warm[0]["train/reward_last10"] == ""  # never trained


def test_plots_are_small_multiples_by_family():
    from tokentrust.study.report.plots import panel_groups

    methods = ["base", *[f"av{i}" for i in range(8)], "ppo", "clip"]
    fam = {"base": "baseline", "ppo": "baseline", "clip": "baseline", **{f"av{i}": "av-dppo" for i in range(8)}}
    groups = panel_groups(methods, fam, "base", max_per_panel=6)
    assert groups == {"av-dppo (1/2)": ["base", "av0", "av1", "av2", "av3", "av4", "av5"],
                      "av-dppo (2/2)": ["base", "av6", "av7"], "baseline": ["base", "ppo", "clip"]}
    assert panel_groups(["base"], {}, "base") == {"methods": ["base"]}
    assert panel_groups(["a", "b"], {}, None) == {"methods": ["a", "b"]}


def test_report_with_families_draws_one_panel_each(tmp_path):
    grid = _make_grid(tmp_path / "g", GOOD, POOR, seeds=(0, 1, 2))
    text = build_report(grid, baseline=BASE).read_text()
    assert f"one panel per method family, `{BASE}` dashed grey in each" in text
    for name in ("reward", "entropy", "rare_share", "accuracy", "kept_frac_buckets"):
        assert (grid / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_declared_margins_reach_the_verdicts(tmp_path):
    grid = _make_grid(tmp_path / "g", POOR, POOR, seeds=(0, 1, 2))
    spec = json.loads((grid / "grid.json").read_text())
    spec["primary"]["margins"] = {"H2": 0.5}
    (grid / "grid.json").write_text(json.dumps(spec))
    para = _first_paragraph(build_report(grid, baseline=BASE).read_text())
    assert "H2 ±0.5 (grid.json), H3 ±0.005 (default)" in para
    assert "equivalent within ±0.5" in para  # identical accuracy, a generous margin
    assert _verdicts(grid / "report.md")["H2"] == "EQUIVALENT"


def test_inconclusive_states_the_seeds_equivalence_would_need(tmp_path):
    from tokentrust.study.inference import tost_seeds_needed
    from tokentrust.study.report.data import analyse

    grid = _make_grid(tmp_path / "g", POOR, POOR, seeds=(0, 1, 2))
    para = _first_paragraph(build_report(grid, baseline=BASE).read_text())
    h2 = next(v for v in analyse(grid, BASE, 0.05).verdicts if v.hypothesis.key == "H2")
    need = tost_seeds_needed(h2.result.sd, 0.05)
    assert h2.label == "INCONCLUSIVE" and need is not None and need > 3
    sentence = para.split("**H2 ", 1)[1].split("**H3 ", 1)[0]
    assert f"seeds to show it with 80% power at this sd: {need})" in sentence


def test_ratio_per_bucket_and_sign_is_summarised_and_reported(tmp_path):
    """mechanism/ratio_{mean,p99}/{pos,neg}/bucket_<i>: mean over steps per run, then over seeds."""
    grid = _make_grid(tmp_path / "g", GOOD, POOR, seeds=(0, 1))
    for run in (grid / "runs").glob("*/seed_*"):
        seed = int(run.name[5:])
        lines = (run / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines[:-1]]  # the last line is the simulated crash
        for r in recs:  # ratio mean at step t: 1 + 0.01 t + seed; p99 only in bucket 1, only for A < 0
            r["mechanism/ratio_mean/pos/bucket_0"] = 1 + 0.01 * r["step"] + seed
            r["mechanism/ratio_p99/neg/bucket_1"] = 2.0 * (seed + 1)
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    s = summarize_run(grid / "runs" / BASE / "seed_1")
    assert s["mechanism/ratio_mean/pos/bucket_0"] == pytest.approx(1 + 0.01 * 20.5 + 1)  # steps 1-40
    assert s["mechanism/ratio_p99/neg/bucket_1"] == pytest.approx(4.0)
    text = build_report(grid).read_text()
    block = text.split("ratio pi / mu, mean, A > 0")[1].split("\n\n")[1]
    row = next(line for line in block.splitlines() if line.startswith(f"| `{BASE}`"))
    assert [c.strip() for c in row.split("|")[2:-1]] == ["1.705"]  # seeds 0 and 1: 1.205 and 2.205
    block = text.split("ratio pi / mu, 99th percentile per step, A < 0")[1].split("\n\n")[1]
    row = next(line for line in block.splitlines() if line.startswith(f"| `{BASE}`"))
    assert [c.strip() for c in row.split("|")[2:-1]] == ["3"]  # bucket 1 only: (2 + 4) / 2
