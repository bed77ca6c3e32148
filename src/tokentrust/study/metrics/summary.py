"""One run -> one flat dict of scalar metrics (`summarize_run`), the row that
`tokentrust.study.report` aggregates over seeds."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokentrust.study.metrics.curves import Record, _finite, _values, bucket_table, curve
from tokentrust.study.metrics.stability import (
    collapse_events,
    drawdown_smoothed,
    entropy_trajectory,
    grad_norm_p99,
    grad_spike_count,
    loss_variance,
    max_drawdown,
    mean_abs_pi_mu,
    reward_diff_std,
    reward_noise_design_effect,
    reward_noise_normalized,
    reward_std,
    time_to_collapse,
)
from tokentrust.train.rundir import load_metrics


_EVAL_RENAMES = {
    "greedy_pass@1": "eval/greedy_pass@1",
    "mean@k": "eval/mean@k",
    "pass@k": "eval/pass@k",
    "k": "eval/k",
    "n": "eval/n",
    "coherence_nll": "coherence/nll",
    "garbage_share": "coherence/garbage_share",
    "rare_share": "rare/share_rare",
    "distinct_rare_per_1k": "rare/distinct_rare_per_1k",
    "distinct_1": "rare/distinct_1",
    "distinct_2": "rare/distinct_2",
    "distinct_3": "rare/distinct_3",
}


def _head_tail(v: np.ndarray, w: int = 10) -> tuple[float, float]:
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v[:w].mean()), float(v[-w:].mean())


def summarize_records(
    records: Sequence[Record], samples_per_step: int | None = None, group_size: int | None = None
) -> dict[str, float]:
    """Scalar training metrics of one run from its step records (see `summarize_run`).

    `samples_per_step` (prompts_per_step * group_size) normalises the reward noise; with
    `group_size` too, the noise is also corrected for the within-prompt correlation."""
    out: dict[str, float] = {"train/steps": float(len(records))}
    if not records:
        return out
    rsteps, reward = curve(records, "reward/mean")
    out["stability/reward_std"] = reward_std(records)
    out["stability/reward_diff_std"] = reward_diff_std(records)
    out["stability/reward_noise_norm"] = reward_noise_normalized(records, samples_per_step)
    prompts = samples_per_step // group_size if samples_per_step and group_size else None
    out["stability/reward_noise_deff"] = reward_noise_design_effect(records, prompts, group_size)
    out["stability/max_drawdown"] = max_drawdown(reward)
    out["stability/drawdown_smoothed"] = drawdown_smoothed(reward)
    out["stability/collapse_count"] = float(len(collapse_events(reward)))
    ttc, collapsed = time_to_collapse(rsteps, reward)
    out["stability/time_to_collapse"] = ttc
    out["stability/collapsed"] = float(collapsed)
    out["stability/loss_var"] = loss_variance(records)
    out["stability/grad_norm_p99"] = grad_norm_p99(records)
    raw_norms = [r.get("actor/grad_norm") for r in records if "actor/grad_norm" in r]
    norms = [float(x) if isinstance(x, (int, float)) else float("nan") for x in raw_norms]
    out["stability/grad_spikes"] = float(grad_spike_count(norms)) if norms else float("nan")
    ent = entropy_trajectory(records)
    out["stability/entropy_first"] = ent["first"]
    out["stability/entropy_last"] = ent["last"]
    out["stability/entropy_slope"] = ent["slope"]
    out["stability/mean_abs_pi_mu"] = mean_abs_pi_mu(records)
    skipped = _values(records, "train/nonfinite_skipped")
    out["stability/nonfinite_skipped"] = float(skipped.sum()) if skipped.size else 0.0

    steps, _ = curve(records, "step")
    out["train/last_step"] = float(steps.max()) if steps.size else float(len(records) - 1)
    out["train/reward_first10"], out["train/reward_last10"] = _head_tail(reward)
    out["train/accuracy_last10"] = _head_tail(_values(records, "reward/accuracy"))[1]
    out["train/response_length_last10"] = _head_tail(_values(records, "response/length_mean"))[1]
    out["train/distinct_rare_per_1k_last10"] = _head_tail(
        _values(records, "rare/distinct_rare_per_1k")
    )[1]
    tps = _values(records, "perf/tokens_per_s")
    out["perf/tokens_per_s"] = float(tps.mean()) if tps.size else float("nan")
    for name in ("kept_frac", "masked_frac", "kept_frac_pos", "kept_frac_neg", "over_cap_frac"):
        v = _values(records, f"trust_region/{name}")
        if v.size:
            out[f"trust_region/{name}"] = float(v.mean())
    for name, arr in bucket_table(records, "trust_region").items():
        out.update(_bucket_keys("trust_region", name, arr))
    for name, arr in bucket_table(records, "mechanism").items():  # the ratio pi/mu, e.g. "ratio_p99/pos"
        if name.startswith("ratio_"):
            out.update({f"mechanism/{name}/bucket_{i}": float(x) for i, x in enumerate(arr) if np.isfinite(x)})
    for name, arr in bucket_table(list(records[-10:]), "rare").items():
        out.update(_bucket_keys("train/rare_last10", name, arr))
    return out


def _bucket_keys(prefix: str, name: str, arr: np.ndarray) -> dict[str, float]:
    """Back to the log naming: ("kept_frac/pos", [..]) -> prefix/kept_frac/bucket_<i>/pos."""
    base, suffix = name, ""
    if name.endswith(("/pos", "/neg")):
        base, suffix = name[:-4], name[-4:]
    return {
        f"{prefix}/{base}/bucket_{i}{suffix}": float(x) for i, x in enumerate(arr) if np.isfinite(x)
    }


def summarize_eval(results: Mapping[str, Any]) -> dict[str, float]:
    """Flatten eval/results.json into namespaced scalars (`eval/`, `rare/`, `coherence/`)."""
    out: dict[str, float] = {}
    for k, v in results.items():
        if k == "bucket_shares" and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if _finite(x) is not None:
                    out[f"rare/share/bucket_{i}"] = float(x)
            continue
        x = _finite(v)
        if x is not None:
            out[_EVAL_RENAMES.get(k, f"eval/{k}")] = x
    if "coherence/nll" in out:
        out["coherence/ppl"] = math.exp(min(out["coherence/nll"], 700.0))
    out.update(_seen_and_unseen(results, out))
    return out


def _seen_and_unseen(results: Mapping[str, Any], flat: Mapping[str, float]) -> dict[str, float]:
    """Split the rare-token share: tokens the corpus never holds (the unseen bucket, second to last
    of `bucket_shares`; garbage, a coherence outcome) and rare tokens it does hold (utility).

    `rare_share` counts both over all generated tokens, so rare seen = rare - unseen."""
    shares = results.get("bucket_shares")
    if not isinstance(shares, (list, tuple)) or len(shares) < 2 or _finite(shares[-2]) is None:
        return {}
    unseen = float(shares[-2])
    out = {"coherence/unseen_token_share": unseen}
    if "rare/share_rare" in flat:
        out["rare/share_rare_seen"] = max(0.0, flat["rare/share_rare"] - unseen)
    return out


def rollout_shape(run_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(rollout.prompts_per_step, rollout.group_size) from RUN_DIR/config.json (None if absent)."""
    p = Path(run_dir) / "config.json"
    try:
        ro = json.loads(p.read_text(encoding="utf-8")).get("rollout", {})
        return int(ro["prompts_per_step"]), int(ro["group_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def samples_per_step(run_dir: str | os.PathLike) -> int | None:
    """rollout.prompts_per_step * rollout.group_size from RUN_DIR/config.json (None if absent)."""
    shape = rollout_shape(run_dir)
    return shape[0] * shape[1] if shape else None


def summarize_run(run_dir: str | os.PathLike, records: Sequence[Record] | None = None) -> dict[str, float]:
    """One flat dict of scalar metrics for a run directory.

    Reads RUN_DIR/metrics.jsonl (stability/*, train/*, trust_region/*, perf/*; pass `records`
    when they are already loaded) and, if present, RUN_DIR/eval/results.json (eval/*, rare/*,
    coherence/*). `train/done` is 1.0 if RUN_DIR/DONE exists. Stability metrics are computed on
    the raw per-step curves (see the functions above).
    """
    d = Path(run_dir)
    shape = rollout_shape(d)
    out = summarize_records(load_metrics(d) if records is None else records,
                            shape[0] * shape[1] if shape else None, shape[1] if shape else None)
    out["train/done"] = 1.0 if (d / "DONE").exists() else 0.0
    res = d / "eval" / "results.json"
    if res.exists():
        try:
            results = json.loads(res.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            warnings.warn(f"{res}: not valid JSON, eval metrics skipped", stacklevel=2)
            results = {}
        if isinstance(results, dict):
            out.update(summarize_eval(results))
    return out
