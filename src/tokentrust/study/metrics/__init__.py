"""Experiment metrics: accuracy, stability, rare-token diversity, coherence and trust-region
diagnostics (inference over seeds lives in `tokentrust.study.inference`). Log reading lives in
`tokentrust.study.metrics.curves` and the stability metrics in `tokentrust.study.metrics.stability`; both are re-exported
here, so `tokentrust.study.metrics.<name>` keeps working.

Everything here is a pure function of logged data (RUN_DIR/metrics.jsonl, eval/results.json) or of
a frozen model; nothing touches trainer state. `summarize_run` turns one run directory into one
flat dict of scalar metrics, the row that `tokentrust.study.report.build` aggregates over seeds.

Conventions:
- Curves are read in step order; missing / non-finite values are skipped, not imputed.
- Higher frequency-bucket ids are rarer (`tokentrust.vocab.FrequencyTable.buckets`: bucket 0 is the
  most frequent tokens, the last seen bucket the rarest, then one bucket for unseen tokens).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokentrust.study.metrics.curves import Record, _finite, _values, curve, load_metrics, read_jsonl  # noqa: F401
from tokentrust.study.metrics.stability import (  # noqa: F401  (re-exported: metrics was one module)
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
    uniform_group_probability,
)

# ----------------------------------------------------------------------------------------------
# accuracy


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, Codex), which never forms the
    huge binomials.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct_matrix: Sequence[Sequence[float]] | np.ndarray, k: int) -> float:
    """pass@k averaged over problems; row i holds the 0/1 correctness of problem i's n samples."""
    rows = [np.asarray(r, dtype=np.float64) for r in correct_matrix]
    if not rows:
        return float("nan")
    return float(np.mean([pass_at_k(len(r), int((r > 0.5).sum()), k) for r in rows]))


def mean_at_k(correct_matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """mean@k: per-problem mean correctness over its k samples, averaged over problems."""
    rows = [np.asarray(r, dtype=np.float64) for r in correct_matrix]
    rows = [r for r in rows if r.size]
    if not rows:
        return float("nan")
    return float(np.mean([r.mean() for r in rows]))


def greedy_pass_at_1(correct: Sequence[float] | np.ndarray) -> float:
    """Fraction of problems whose single greedy completion is correct."""
    a = np.asarray(correct, dtype=np.float64).reshape(-1)
    return float(a.mean()) if a.size else float("nan")


# ----------------------------------------------------------------------------------------------
# rare-token diversity


def _flat_ids(token_ids: Any) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.reshape(-1).long()
    if isinstance(token_ids, np.ndarray):
        return torch.as_tensor(token_ids.reshape(-1), dtype=torch.long)
    parts: list[int] = []
    for x in token_ids:
        if isinstance(x, (int, np.integer)):
            parts.append(int(x))
        else:
            parts.extend(_flat_ids(x).tolist())
    return torch.tensor(parts, dtype=torch.long)


def bucket_shares(
    token_ids: Any,
    bucket_of_token: torch.Tensor,
    num_buckets: int,
    mask: torch.Tensor | None = None,
) -> np.ndarray:
    """Share of generated tokens falling in each corpus-frequency bucket, float64 [num_buckets].

    `token_ids`: a tensor (any shape; `mask` selects the generated positions) or nested lists of
    ids. All-NaN if there are no tokens.
    """
    ids = _flat_ids(token_ids)
    if mask is not None:
        ids = ids[torch.as_tensor(mask).reshape(-1).bool()]
    if ids.numel() == 0:
        return np.full(num_buckets, np.nan)
    b = torch.as_tensor(bucket_of_token, dtype=torch.long)[ids]
    counts = torch.bincount(b, minlength=num_buckets)[:num_buckets]
    return (counts.double() / ids.numel()).numpy()


def distinct_rare_per_1k(token_ids_list: Any, rare_mask: torch.Tensor) -> float:
    """Distinct rare token types used per 1,000 generated tokens (all tokens in the denominator)."""
    ids = _flat_ids(token_ids_list)
    if ids.numel() == 0:
        return float("nan")
    rare = ids[torch.as_tensor(rare_mask, dtype=torch.bool)[ids]]
    return 1000.0 * torch.unique(rare).numel() / ids.numel()


def distinct_n(sequences: Any, n: int) -> float:
    """Distinct n-grams / total n-grams over all sequences (n-grams never cross sequences).

    `sequences`: token-id sequences (lists / tensors) or texts (str, split on whitespace); a single
    str counts as one text. 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if isinstance(sequences, str):
        sequences = [sequences]
    total, seen = 0, set()
    for s in sequences:
        toks = s.split() if isinstance(s, str) else _flat_ids(s).tolist()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# coherence


def _pad(seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(list(s), dtype=torch.long)
        sl = slice(width - len(t), width) if left else slice(0, len(t))
        ids[i, sl], mask[i, sl] = t, 1
    return ids, mask


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    response_ids: torch.Tensor | Sequence[Sequence[int]],
    response_mask: torch.Tensor | None = None,
    *,
    prompt_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> float:
    """Mean per-token NLL (nats) of responses under `model` given their prompts.

    Token-weighted over all valid response tokens. Tensors: prompts [B, P] (left-padded, with
    `prompt_mask`; all ones if omitted), responses [B, T] (right-padded, with `response_mask`).
    Lists of id sequences are padded here. Left padding is handled with explicit position ids.
    """
    if not isinstance(prompt_ids, torch.Tensor):
        prompt_ids, prompt_mask = _pad(prompt_ids, left=True)
    if not isinstance(response_ids, torch.Tensor):
        response_ids, rm = _pad(response_ids, left=False)
        response_mask = rm if response_mask is None else response_mask
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    if response_mask is None:
        response_mask = torch.ones_like(response_ids)
    if prompt_ids.shape[1] == 0:
        raise ValueError("sequence_nll needs at least one prompt token to condition on")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    from tokentrust.train.packed import packed_response_logprobs, unsupported_reason

    try:
        if unsupported_reason(model) is None and bool((response_mask[:, 1:] <= response_mask[:, :-1]).all()):
            # the packed forward (no padding, each distinct prompt once): the same NLL up to rounding
            with torch.no_grad():
                for s in range(0, prompt_ids.shape[0], 64):
                    rm = response_mask[s : s + 64].long().to(device)
                    logp, _ = packed_response_logprobs(model, prompt_ids[s : s + 64].to(device),
                                                       prompt_mask[s : s + 64].long().to(device),
                                                       response_ids[s : s + 64].to(device), rm)
                    total -= float(logp.sum())
                    count += float(rm.sum())
            return total / count if count else float("nan")
        for s in range(0, prompt_ids.shape[0], batch_size):
            p, pm = prompt_ids[s : s + batch_size], prompt_mask[s : s + batch_size].long()
            r, rm = response_ids[s : s + batch_size], response_mask[s : s + batch_size].float()
            P, T = p.shape[1], r.shape[1]
            ids = torch.cat([p, r], 1).to(device)
            att = torch.cat([pm, torch.ones_like(r)], 1).to(device)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": att}
            if not bool(pm.all()):  # left padding: positions must start at the first real token
                kwargs["position_ids"] = (att.cumsum(1) - 1).clamp(min=0)
            logits = model(**kwargs).logits[:, P - 1 : P + T - 1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), r.to(device).reshape(-1), reduction="none"
            ).view(r.shape[0], T)
            rm = rm.to(device)
            total += float((nll * rm).sum())
            count += float(rm.sum())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# trust-region diagnostics and correlations

_BUCKET_RE = re.compile(r"^(?P<name>.+)/bucket_(?P<i>\d+)(?P<suffix>/pos|/neg)?$")


def bucket_table(records: Sequence[Record], prefix: str = "trust_region") -> dict[str, np.ndarray]:
    """Per-bucket metrics `<prefix>/<name>/bucket_<i>[/pos|/neg]` averaged over the steps that
    logged them. Returns {"<name>[/pos|/neg]": float64 [num_buckets]} (NaN where never logged),
    e.g. {"kept_frac": ..., "kept_frac/pos": ..., "delta_mean": ...}."""
    sums: dict[str, dict[int, float]] = {}
    counts: dict[str, dict[int, int]] = {}
    pre = prefix.rstrip("/") + "/"
    for r in records:
        for k, v in r.items():
            if not k.startswith(pre):
                continue
            m = _BUCKET_RE.match(k[len(pre) :])
            x = _finite(v)
            if m is None or x is None:
                continue
            name, i = m["name"] + (m["suffix"] or ""), int(m["i"])
            sums.setdefault(name, {})
            counts.setdefault(name, {})
            sums[name][i] = sums[name].get(i, 0.0) + x
            counts[name][i] = counts[name].get(i, 0) + 1
    nb = 1 + max((i for d in sums.values() for i in d), default=-1)
    out = {}
    for name in sorted(sums):
        a = np.full(nb, np.nan)
        for i, s in sums[name].items():
            a[i] = s / counts[name][i]
        out[name] = a
    return out


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN if either input is constant or there are < 2 points."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled)."""
    from scipy.stats import rankdata  # lazy: the adapters' environments import this module

    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    return pearson(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------------------------
# one run -> one flat dict

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
