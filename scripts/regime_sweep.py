"""Regime sweep: where do trust regions bind, and what happens to each baseline there?

Runs tiny-arith grids over off-policy regimes (rollout staleness, optimizer updates per rollout
batch, learning rate) for a few methods and seeds, then tabulates, per regime and method:
masked fraction, mean |pi - mu|, reward at the start and end, collapses (as the report defines
them, `tokentrust.study.metrics.collapse_events`) and wall time per step.
Every run is an ordinary `tokentrust compare` run directory, so the sweep resumes after an
interruption (finished runs are skipped) and any run can be inspected or re-reported.

    python scripts/regime_sweep.py --spec docs/results/regime-sweep/probe.json --out runs/regime-sweep
    python scripts/regime_sweep.py --spec ... --out ... --table-only     # rebuild the table
    python scripts/regime_sweep.py --spec docs/results/headroom-sweep/sweep.json --out runs/headroom \
        --threads 1 --results docs/results/headroom-sweep    # one run at a time, 1 thread each

With an end-of-run evaluation (task.eval_limit > 0) each regime's warm start (its runs' model with
no RL step) is evaluated the same way into OUT/<regime>/warm_start/, and the table adds greedy
pass@1 before and after RL, the gain, and accuracy on problems whose answer word is rare.

Spec (JSON): {"preset": "tiny-arith", "overrides": {...}, "seeds": [0, 1, 2],
              "methods": ["ppo", "dppo-tv", ...],
              "regimes": {"s2-u8-lr1e-4": {"rollout": {"staleness": 2},
                                           "optim": {"ppo_epochs": 2, "minibatches": 4, "lr": 1e-4}}, ...}}
A regime may name its own "methods" and "seeds" (replacing the spec's for that regime).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust.study.compare import _run_one, evaluate_warm_start, run_configs, run_grid, run_status
from tokentrust.study.methods import METHODS
from tokentrust.train.config import deep_merge
from tokentrust.study.metrics import collapse_events
from tokentrust.train.rundir import load_metrics

def _smooth(x: np.ndarray, w: int = 5) -> np.ndarray:
    return x if x.size < w else np.convolve(x, np.ones(w) / w, mode="valid")


def run_row(run_dir: Path) -> dict[str, float]:
    """Sweep metrics of one run directory."""
    recs = load_metrics(run_dir)
    get = lambda k: np.array([r[k] for r in recs if isinstance(r.get(k), (int, float))], dtype=float)  # noqa: E731
    reward = get("reward/mean")
    masked = get("trust_region/masked_frac")
    out = {"steps": float(len(recs)),
           "masked_frac": float(masked.mean()) if masked.size else float("nan"),
           "masked_frac_max": float(masked.max()) if masked.size else float("nan"),
           "abs_pi_mu": float(get("trust_region/abs_diff_mean").mean()) if recs else float("nan"),
           "reward_first5": float(reward[:5].mean()) if reward.size else float("nan"),
           "reward_last5": float(reward[-5:].mean()) if reward.size else float("nan"),
           "reward_max5": float(_smooth(reward).max()) if reward.size else float("nan"),
           # metrics.collapse_events: >= 3 consecutive steps below half the running max reward
           "collapsed": float(bool(collapse_events(reward))),
           "step_s": float(get("timing/step_s").mean()) if recs else float("nan")}
    staleness = get("rollout/staleness")
    out["staleness"] = float(staleness.max()) if staleness.size else 0.0
    out.update(eval_row(run_dir))
    entropy = get("actor/entropy")
    if entropy.size:
        out["entropy_first10"], out["entropy_last10"] = float(entropy[:10].mean()), float(entropy[-10:].mean())
    if reward.size:
        out["reward_first10"], out["reward_last10"] = float(reward[:10].mean()), float(reward[-10:].mean())
    return out


EVAL_KEYS = ("greedy_pass@1", "acc_rare_answer", "acc_common_answer", "num_rare_answer", "num_problems")


def eval_row(run_dir: Path) -> dict[str, float]:
    """The end-of-run evaluation's headline numbers ({} without one)."""
    res = run_dir / "eval" / "results.json"
    if not res.exists():
        return {}
    data = json.loads(res.read_text())
    return {k: float(data[k]) for k in EVAL_KEYS if isinstance(data.get(k), (int, float))}


BUCKETS = ("0-50%", "50-80%", "80-95%", "95-99%", "99-100%", "unseen", "special")  # default edges


def mechanism(run_dir: Path) -> dict[str, list[float]]:
    """Per frequency bucket (mean over steps): masked fraction, |pi - mu| (mean over PPO epochs);
    and the masked fraction of each PPO epoch."""
    recs = load_metrics(run_dir)

    def mean(key: str) -> float:
        v = [r[key] for r in recs if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        return float(np.mean(v)) if v else float("nan")

    epochs = sorted({int(k.split("/")[1].split("_")[1]) for r in recs[:1] for k in r if "/epoch_" in k})
    masked = [1.0 - mean(f"trust_region/kept_frac/bucket_{i}") for i in range(len(BUCKETS))]
    absdiff = [float(np.nanmean([mean(f"trust_region/epoch_{e}/abs_diff_mean/bucket_{i}") for e in epochs]))
               if epochs else float("nan") for i in range(len(BUCKETS))]
    return {"masked": masked, "abs_diff": absdiff,
            "epoch_masked": [mean(f"trust_region/epoch_{e}/masked_frac") for e in epochs]}


def mechanism_table(out: Path, spec: dict[str, Any], method: str = "dppo-tv") -> str:
    """Markdown: where the region acts, per frequency bucket and per PPO epoch (mean over seeds)."""
    lines = [f"`{method}`, mean over seeds: masked fraction (m) and mean |pi - mu| (d) per corpus-frequency "
             "bucket (share of the token mass, most frequent first), and masked fraction per PPO epoch.", "",
             "| regime | " + " | ".join(f"{b} m / d" for b in BUCKETS) + " | masked by epoch |",
             "|---|" + "---:|" * len(BUCKETS) + "---|"]
    for regime, over in spec["regimes"].items():
        runs = [out / regime / "runs" / method / f"seed_{s}" for s in over.get("seeds", spec["seeds"])]
        mech = [mechanism(d) for d in runs if (d / "metrics.jsonl").exists()]
        if not mech:
            continue
        with warnings.catch_warnings():  # a bucket no seed sampled stays NaN ("nan" in the table)
            warnings.simplefilter("ignore", RuntimeWarning)
            avg = {k: np.nanmean(np.array([m[k] for m in mech], dtype=float), axis=0) for k in mech[0]}
        cells = [f"{m:.3f} / {d:.3f}" for m, d in zip(avg["masked"], avg["abs_diff"])]
        lines.append(f"| {regime} | " + " | ".join(cells) + " | " + ", ".join(f"{x:.3f}" for x in avg["epoch_masked"])
                     + " |")
    return "\n".join(lines)


def run_sequential(grid: dict[str, Any], gdir: Path, threads: int) -> None:
    """Every run of ``grid`` one after another with ``threads`` threads each (finished runs skipped),
    then its warm start; for a machine shared with others."""
    runs = run_configs(grid, gdir)
    for name, seed, cfg in runs:
        status = run_status(Path(cfg.out_dir))
        if status == "done":
            continue
        t0 = time.time()
        _run_one(cfg, status, threads)
        print(f"  {name} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    if runs and runs[0][2].task.eval_limit > 0:
        evaluate_warm_start(runs[0][2], gdir, threads=threads)


def run_sweep(spec: dict[str, Any], out: Path, workers: int, table_only: bool,
              threads: int = 0) -> list[dict[str, Any]]:
    rows = []
    for regime, over in spec["regimes"].items():
        over = dict(over)
        methods, seeds = over.pop("methods", spec["methods"]), over.pop("seeds", spec["seeds"])
        grid = {"name": f"sweep-{regime}", "preset": spec.get("preset", "tiny-arith"),
                "methods": methods, "seeds": seeds,
                "overrides": deep_merge(spec.get("overrides", {}), over)}
        gdir = out / regime
        if not table_only:
            t0 = time.time()
            if threads:
                run_sequential(grid, gdir, threads)
            else:
                run_grid(grid, gdir, workers=workers, build_report=False,
                         command="python " + " ".join(sys.argv))
            print(f"regime {regime}: {time.time() - t0:.0f}s", flush=True)
        warm = eval_row(gdir / "warm_start")
        for m in methods:
            name = m if isinstance(m, str) else m["name"]
            for seed in (seeds if isinstance(m, str) else m.get("seeds", seeds)):
                d = gdir / "runs" / name / f"seed_{seed}"
                if (d / "metrics.jsonl").exists():
                    row = {"regime": regime, "method": name, "seed": seed, **run_row(d)}
                    for k, v in warm.items():
                        row[f"warm_{k}"] = v
                    if "greedy_pass@1" in row and "greedy_pass@1" in warm:
                        row["gain"] = row["greedy_pass@1"] - warm["greedy_pass@1"]
                    rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (regime, method), mean over seeds (collapses counted)."""
    keys = list(dict.fromkeys((r["regime"], r["method"]) for r in rows))  # first-seen order
    lines = ["| regime | method | seeds | masked frac | max masked | mean \\|pi-mu\\| | reward first 5 | "
             "best 5-step | reward last 5 | collapsed | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for regime, method in keys:
        rs = [r for r in rows if r["regime"] == regime and r["method"] == method]
        def f(key: str) -> float:
            vals = [r[key] for r in rs if key in r and np.isfinite(r[key])]
            return float(np.mean(vals)) if vals else float("nan")

        lines.append(f"| {regime} | {method} | {len(rs)} | {f('masked_frac'):.4f} | {f('masked_frac_max'):.3f} | "
                     f"{f('abs_pi_mu'):.4f} | {f('reward_first5'):.3f} | {f('reward_max5'):.3f} | "
                     f"{f('reward_last5'):.3f} | {int(sum(r['collapsed'] for r in rs))}/{len(rs)} | "
                     f"{f('step_s'):.1f} |")
    return "\n".join(lines)


def gain_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: held-out greedy pass@1 of the warm start and after RL, per (regime, method); one line
    per seed and the mean. Empty when no run was evaluated."""
    rows = [r for r in rows if "greedy_pass@1" in r]
    if not rows:
        return ""
    lines = ["| regime | method | seed | problems (rare) | warm start | after RL | gain | rare: warm -> RL | "
             "reward first 10 -> last 10 | entropy first 10 -> last 10 | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in rows:
        lines.append(f"| {r['regime']} | {r['method']} | {r['seed']} | {r.get('num_problems', nan):.0f} "
                     f"({r.get('num_rare_answer', nan):.0f}) | {r.get('warm_greedy_pass@1', nan):.3f} | "
                     f"{r['greedy_pass@1']:.3f} | {r.get('gain', nan):+.3f} | "
                     f"{r.get('warm_acc_rare_answer', nan):.3f} -> {r.get('acc_rare_answer', nan):.3f} | "
                     f"{r.get('reward_first10', nan):.3f} -> {r.get('reward_last10', nan):.3f} | "
                     f"{r.get('entropy_first10', nan):.2f} -> {r.get('entropy_last10', nan):.2f} | "
                     f"{r.get('step_s', nan):.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="sweep spec (JSON)")
    ap.add_argument("--out", required=True, help="directory for the run grids")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="run one run at a time with this many threads (ignores --workers); 0: a parallel grid")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from existing runs")
    ap.add_argument("--results", default=None, help="write sweep.csv and sweep.md here (default: --out)")
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    unknown = [m for r in [spec, *spec["regimes"].values()] for m in r.get("methods", [])
               if isinstance(m, str) and m not in METHODS]
    if unknown:
        raise SystemExit(f"{args.spec}: unknown method(s) {unknown}")
    out = Path(args.out)
    rows = run_sweep(spec, out, args.workers, args.table_only, threads=args.threads)
    res = Path(args.results or out)
    res.mkdir(parents=True, exist_ok=True)
    with open(res / "sweep.csv", "w", newline="") as fh:
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("regime", "method", "seed"), k))
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    gains = gain_table(rows)
    md = (gains + "\n\n" if gains else "") + table(rows) + "\n\n" + mechanism_table(out, spec)
    (res / "sweep.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
