"""Regime sweep: where do trust regions bind, and what happens to each baseline there?

Runs tiny-arith grids over off-policy regimes (rollout staleness, optimizer updates per rollout
batch, learning rate) for a few methods and seeds, then tabulates, per regime and method:
masked fraction, mean |pi - mu|, reward at the start and end, collapses (as the report defines
them, `tokentrust.metrics.collapse_events`) and wall time per step.
Every run is an ordinary `tokentrust compare` run directory, so the sweep resumes after an
interruption (finished runs are skipped) and any run can be inspected or re-reported.

    python scripts/regime_sweep.py --spec docs/results/regime-sweep/probe.json --out runs/regime-sweep
    python scripts/regime_sweep.py --spec ... --out ... --table-only     # rebuild the table

Spec (JSON): {"preset": "tiny-arith", "overrides": {...}, "seeds": [0, 1, 2],
              "methods": ["ppo", "dppo-tv", ...],
              "regimes": {"s2-u8-lr1e-4": {"rollout": {"staleness": 2},
                                           "optim": {"ppo_epochs": 2, "minibatches": 4, "lr": 1e-4}}, ...}}
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust.compare import METHODS, run_grid
from tokentrust.config import deep_merge
from tokentrust.metrics import collapse_events, load_metrics

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
    res = run_dir / "eval" / "results.json"
    if res.exists():
        out["greedy_pass@1"] = float(json.loads(res.read_text()).get("greedy_pass@1", float("nan")))
    return out


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
    for regime in spec["regimes"]:
        runs = [out / regime / "runs" / method / f"seed_{s}" for s in spec["seeds"]]
        mech = [mechanism(d) for d in runs if (d / "metrics.jsonl").exists()]
        if not mech:
            continue
        avg = {k: np.nanmean(np.array([m[k] for m in mech], dtype=float), axis=0) for k in mech[0]}
        cells = [f"{m:.3f} / {d:.3f}" for m, d in zip(avg["masked"], avg["abs_diff"])]
        lines.append(f"| {regime} | " + " | ".join(cells) + " | " + ", ".join(f"{x:.3f}" for x in avg["epoch_masked"])
                     + " |")
    return "\n".join(lines)


def run_sweep(spec: dict[str, Any], out: Path, workers: int, table_only: bool) -> list[dict[str, Any]]:
    rows = []
    for regime, over in spec["regimes"].items():
        grid = {"name": f"sweep-{regime}", "preset": spec.get("preset", "tiny-arith"),
                "methods": spec["methods"], "seeds": spec["seeds"],
                "overrides": deep_merge(spec.get("overrides", {}), over)}
        gdir = out / regime
        if not table_only:
            t0 = time.time()
            run_grid(grid, gdir, workers=workers, build_report=False,
                     command="python " + " ".join(sys.argv))
            print(f"regime {regime}: {time.time() - t0:.0f}s", flush=True)
        for m in spec["methods"]:
            name = m if isinstance(m, str) else m["name"]
            for seed in spec["seeds"]:
                d = gdir / "runs" / name / f"seed_{seed}"
                if (d / "metrics.jsonl").exists():
                    rows.append({"regime": regime, "method": name, "seed": seed, **run_row(d)})
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="sweep spec (JSON)")
    ap.add_argument("--out", required=True, help="directory for the run grids")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from existing runs")
    ap.add_argument("--results", default=None, help="write sweep.csv and sweep.md here (default: --out)")
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    unknown = [m for m in spec["methods"] if isinstance(m, str) and m not in METHODS]
    if unknown:
        raise SystemExit(f"{args.spec}: unknown method(s) {unknown}")
    out = Path(args.out)
    rows = run_sweep(spec, out, args.workers, args.table_only)
    res = Path(args.results or out)
    res.mkdir(parents=True, exist_ok=True)
    with open(res / "sweep.csv", "w", newline="") as fh:
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("regime", "method", "seed"), k))
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    md = table(rows) + "\n\n" + mechanism_table(out, spec)
    (res / "sweep.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
