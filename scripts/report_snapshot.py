"""Write grid reports into one folder, to check that a refactor regenerates them byte for byte.

    python scripts/report_snapshot.py OUT [--grid NAME=GRID_DIR ...]
    ... change the code ...
    python scripts/report_snapshot.py OUT2 [--grid NAME=GRID_DIR ...]
    diff -r OUT OUT2

OUT gets synthetic grids (fabricated metrics.jsonl, eval results and per-problem outcomes: a
declared primary comparison, families, a dose series and a warm start; greedy-only evaluation;
three seeds) and a
copy of each --grid (its run files without model weights, checkpoints or TensorBoard events), each
with the report.md, summary.csv and plots/*.png that `tokentrust report` writes. PNGs are identical
only under the same matplotlib. The same inputs give the same bytes, so run both sides with the
same libraries. Takes about 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

BASE, AV = "dppo-tv", "av-freq"
PROMPTS, GROUP, N_PROBLEMS = 8, 8, 60
GOOD = dict(jump=0.0, acc=0.75, rare=0.08, nll=1.2)
POOR = dict(jump=0.12, acc=0.45, rare=0.03, nll=1.6)
_SKIP = ("final_model", "checkpoints", "tensorboard", "*.safetensors", "*.pt")


def _build_report():
    try:
        from tokentrust.study.report.build import build_report
    except ImportError:  # the layout before tokentrust.study
        from tokentrust.report import build_report
    return build_report


def _write_run(d: Path, method: str, seed: int, q: dict, greedy_only: bool, steps: int = 40) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}".encode()))
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"rollout": {"prompts_per_step": PROMPTS, "group_size": GROUP}}))
    m = PROMPTS * GROUP
    with open(d / "metrics.jsonl", "w") as f:
        for t in range(1, steps + 1):
            p = float(np.clip(0.3 + 0.008 * t + q["jump"] * rng.normal(), 0.02, 0.98))
            rec = {"step": t, "reward/mean": rng.binomial(m, p) / m, "loss/total": 0.01 * rng.normal(),
                   "actor/grad_norm": 1.0 + 0.05 * rng.random(), "actor/entropy": 1.5 - 0.01 * t,
                   "trust_region/kept_frac": 0.9, "trust_region/abs_diff_mean": 0.01 + 0.001 * rng.random(),
                   "mechanism/corr_rarity_neglogmu": 0.3 + 0.01 * rng.normal()}
            for b in range(5):
                rec[f"trust_region/kept_frac/bucket_{b}"] = 0.95 - 0.05 * b
                rec[f"rare/share/bucket_{b}"] = [0.5, 0.3, 0.15, q["rare"], 0.001][b]
                rec[f"mechanism/mu_mean/bucket_{b}"] = 0.9 - 0.1 * b
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 41, "reward/me')  # a crash mid-write
    (d / "eval").mkdir()
    offset = 0.05 * rng.normal()
    difficulty = np.random.default_rng(123).normal(size=N_PROBLEMS)
    p_correct = 1 / (1 + np.exp(-(np.log(q["acc"] / (1 - q["acc"])) + offset - difficulty)))
    greedy = rng.random(N_PROBLEMS) < p_correct
    samples = rng.random((N_PROBLEMS, 4)) < p_correct[:, None]
    rows = [{"id": f"p{i}", "greedy_correct": bool(greedy[i]),
             "samples_correct": [] if greedy_only else samples[i].tolist()} for i in range(N_PROBLEMS)]
    (d / "eval" / "problems.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = {"greedy_pass@1": float(greedy.mean()), "coherence_nll": q["nll"] + 0.05 * rng.normal(),
               "rare_share": q["rare"] + 0.001 + 0.005 * rng.normal(),
               "distinct_rare_per_1k": 100 * q["rare"] + rng.normal(), "distinct_2": 0.6,
               "bucket_shares": [0.5, 0.3, 0.15, q["rare"], 0.001, 0.0]}
    if not greedy_only:
        results.update({"mean@k": float(samples.mean()), "pass@k": float(samples.any(1).mean()), "k": 4, "n": 4})
    (d / "eval" / "results.json").write_text(json.dumps(results))
    (d / "DONE").write_text("")


def synthetic_grid(root: Path, seeds: tuple[int, ...], *, primary: bool, families: bool,
                   warm_start: bool, greedy_only: bool, dose: bool = False) -> Path:
    methods = {BASE: {"loss": "dppo-tv", "delta": 0.15, "description": "fixed-threshold DPPO", "family": "baseline"},
               AV: {"loss": "dppo-tv", "delta": 0.15, "description": "frequency thresholds",
                    "family": "av-dppo" if families else "baseline"},
               "ppo": {"loss": "ppo", "description": "PPO clip", "family": "baseline"}}
    quality = {BASE: POOR, AV: GOOD, "ppo": POOR}
    if dose:  # with the baseline's 0.15: a dose-response series of three fixed thresholds
        for delta, q in ((0.05, POOR), (0.3, GOOD)):
            name = f"dppo-tv-delta{delta:g}"
            methods[name] = {"loss": "dppo-tv", "delta": delta, "description": f"dose {delta:g}", "family": "dose"}
            quality[name] = q
    grid: dict = {"methods": methods, "seeds": list(seeds), "command": "tokentrust compare --preset x",
                  "config": {"model": "tiny", "train": {"steps": 40}}}
    if primary:
        grid["primary"] = {"method": AV, "baseline": BASE}
    root.mkdir(parents=True)
    (root / "grid.json").write_text(json.dumps(grid))
    for s in seeds:
        for name, q in quality.items():
            _write_run(root / "runs" / name / f"seed_{s}", name, s, q, greedy_only)
    if warm_start:
        (root / "warm_start" / "eval").mkdir(parents=True)
        (root / "warm_start" / "eval" / "results.json").write_text(json.dumps(
            {"greedy_pass@1": 0.625, "coherence_nll": 0.75, "bucket_shares": [0.5, 0.3, 0.15, 0.04, 0.01]}))
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--grid", action="append", default=[], help="NAME=GRID_DIR: a real grid to copy and report")
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    build_report = _build_report()
    grids = [
        synthetic_grid(args.out / "primary8", tuple(range(8)), primary=True, families=True, warm_start=True,
                       greedy_only=False, dose=True),
        synthetic_grid(args.out / "default3", (0, 1, 2), primary=False, families=False, warm_start=False,
                       greedy_only=False),
        synthetic_grid(args.out / "greedy3", (0, 1, 2), primary=True, families=True, warm_start=True,
                       greedy_only=True),
    ]
    for spec in args.grid:
        name, src = spec.split("=", 1)
        grids.append(Path(shutil.copytree(src, args.out / name, ignore=shutil.ignore_patterns(*_SKIP))))
    os.chdir(args.out)  # reports name their grid directory: relative, the same in every OUT
    for g in grids:
        g = g.relative_to(args.out)
        for f in ("report.md", "summary.csv"):
            (g / f).unlink(missing_ok=True)
        shutil.rmtree(g / "plots", ignore_errors=True)
        grid = json.loads((g / "grid.json").read_text())
        baseline = (grid.get("primary") or {}).get("baseline", BASE)
        print(build_report(g, baseline=baseline))


if __name__ == "__main__":
    main()
