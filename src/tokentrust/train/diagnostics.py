"""Diagnostics of one training step, pooled over all its micro-batches, minibatches and epochs.

* ``TrustRegionStats``: a loss's trust-region metrics, token-weighted, with true maxima;
* ``BucketStats``: kept fraction and mean delta per corpus-frequency bucket and advantage sign;
* ``RunningMean``: plain per-key means (losses, gradient norms over optimizer steps);
* ``EpochStats``, ``RatioStats``: masked share and |pi - mu| per epoch; the ratio pi / mu (mean, p99)
  per bucket and advantage sign.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class RunningMean:
    """Weighted mean per key that skips NaN values (a metric undefined for one part, e.g. no A < 0)."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for k, v in values.items():
            self.weights[k] += 0.0
            if v is not None and math.isfinite(v):
                self.sums[k] += v * weight
                self.weights[k] += weight

    def result(self) -> dict[str, float]:
        return {k: (self.sums[k] / w if w > 0 else float("nan")) for k, w in self.weights.items()}


class TrustRegionStats:
    """A loss's per-micro-batch trust-region metrics pooled over a whole step (all micro-batches,
    minibatches and PPO epochs) as if computed on all its tokens at once.

    Every metric a loss reports is a mean over the micro-batch's valid tokens (``*_pos`` / ``*_neg``:
    over its tokens with A > 0 / A < 0), so the pooled value is the mean weighted by those token
    counts; ``*_max`` / ``*_min`` pool as the maximum / minimum. Non-finite values (a metric
    undefined for one part, e.g. no A < 0) are skipped.
    """

    def __init__(self, prefix: str = "trust_region/"):
        self.prefix = prefix
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    @torch.no_grad()
    def add(self, metrics: dict[str, float], mask: torch.Tensor, adv: torch.Tensor) -> None:
        m = mask.bool()
        counts = torch.stack([m.sum(), (m & (adv > 0)).sum(), (m & (adv < 0)).sum()]).tolist()
        for k, v in metrics.items():
            self.weights[k] += 0.0
            if v is None or not math.isfinite(v):
                continue
            if k.endswith(("_max", "_min")):
                pick = max if k.endswith("_max") else min
                if counts[0] > 0:
                    self.extremes[k] = pick(self.extremes.get(k, v), v)
                continue
            w = counts[1] if k.endswith("_pos") else counts[2] if k.endswith("_neg") else counts[0]
            self.sums[k] += v * w
            self.weights[k] += w

    def result(self) -> dict[str, float]:
        out = {}
        for k, w in self.weights.items():
            if k.endswith(("_max", "_min")):
                out[self.prefix + k] = self.extremes.get(k, float("nan"))
            else:
                out[self.prefix + k] = self.sums[k] / w if w > 0 else float("nan")
        return out


class BucketStats:
    """Kept fraction and mean delta per corpus-frequency bucket (and advantage sign)."""

    def __init__(self, num_buckets: int, device: torch.device):
        self.n = num_buckets
        z = lambda: torch.zeros(num_buckets, device=device)  # noqa: E731
        self.kept, self.count, self.delta = z(), z(), z()
        self.kept_pos, self.count_pos, self.kept_neg, self.count_neg = z(), z(), z(), z()
        self.has_delta = False  # losses without a threshold (ppo, pg-is) log no delta_mean

    @torch.no_grad()
    def add(self, buckets: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
            delta: torch.Tensor | float | None) -> None:
        b = buckets.to(keep.device)[mask]
        k = keep[mask].float()
        self.count += torch.bincount(b, minlength=self.n).float()
        self.kept += torch.bincount(b, weights=k, minlength=self.n)
        a = adv[mask]
        for sel, kept, cnt in ((a > 0, self.kept_pos, self.count_pos), (a < 0, self.kept_neg, self.count_neg)):
            cnt += torch.bincount(b[sel], minlength=self.n).float()
            kept += torch.bincount(b[sel], weights=k[sel], minlength=self.n)
        self.has_delta |= delta is not None
        if isinstance(delta, torch.Tensor):
            self.delta += torch.bincount(b, weights=delta[mask].float(), minlength=self.n)
        elif delta is not None:
            self.delta += torch.bincount(b, minlength=self.n).float() * float(delta)

    def metrics(self) -> dict[str, float]:
        out = {}
        rows = torch.stack([self.kept / self.count, self.delta / self.count, self.kept_pos / self.count_pos,
                            self.kept_neg / self.count_neg]).tolist()
        for i in range(self.n):
            out[f"trust_region/kept_frac/bucket_{i}"] = rows[0][i]
            if self.has_delta:
                out[f"trust_region/delta_mean/bucket_{i}"] = rows[1][i]
            out[f"trust_region/kept_frac/bucket_{i}/pos"] = rows[2][i]
            out[f"trust_region/kept_frac/bucket_{i}/neg"] = rows[3][i]
        return out


@torch.no_grad()
def mismatch_metrics(behavior_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                     buckets: torch.Tensor, num_buckets: int) -> dict[str, float]:
    """How far the sampler (mu) is from the learner's weights before the update (pi_old) on the
    sampled tokens: everything between the two, i.e. the rollout engine's numerics (dtype, kernels)
    and, with rollout.staleness > 0, the updates the sampler has not seen yet.

    With d = log mu - log pi_old per valid token (tokens are samples of mu):
    ``logp_abs_diff_mean|max`` = mean / max |d|; ``kl_k1`` = mean d and ``kl_k3`` = mean(e^-d - 1 + d),
    both unbiased estimates of KL(mu || pi_old) (k3 is >= 0 per token, lower variance: Schulman's
    k3); ``ratio_outside_10pct`` = share of tokens with pi_old / mu outside [0.9, 1.1]. The mean |d|
    and k3 are also given per corpus-frequency bucket (``.../bucket_<i>``, NaN where empty).
    """
    m = mask.bool()
    d = (behavior_logp.float() - old_logp.float())[m].clamp(-20.0, 20.0)
    if d.numel() == 0:
        return {}
    k3 = (-d).exp() - 1 + d
    ratio = (-d).exp()
    vals = torch.stack([d.abs().mean(), d.abs().max(), d.mean(), k3.mean(),
                        ((ratio < 0.9) | (ratio > 1.1)).float().mean()]).tolist()
    out = dict(zip(("logp_abs_diff_mean", "logp_abs_diff_max", "kl_k1", "kl_k3", "ratio_outside_10pct"), vals))
    b = buckets.to(d.device)[m]
    count = torch.bincount(b, minlength=num_buckets).double()
    per = torch.stack([torch.bincount(b, weights=d.abs().double(), minlength=num_buckets) / count,
                       torch.bincount(b, weights=k3.double(), minlength=num_buckets) / count]).tolist()
    for i in range(num_buckets):
        out[f"logp_abs_diff_mean/bucket_{i}"] = per[0][i]
        out[f"kl_k3/bucket_{i}"] = per[1][i]
    return {f"mismatch/{k}": v for k, v in out.items()}


@torch.no_grad()
def mechanism_metrics(rarity: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                      buckets: torch.Tensor, num_buckets: int) -> dict[str, float]:
    """How much of a token's corpus rarity its in-context probability mu already carries.

    Binary-TV masks |pi - mu| > delta, i.e. a ratio window of width ~delta / mu, so improbable tokens
    get a wide window whatever their corpus frequency. ``mechanism/corr_rarity_neglogmu`` is the
    Pearson correlation over the batch's valid non-special tokens between corpus rarity and -log mu;
    its square is the share of rarity's variance that mu explains (the rest is what a frequency
    schedule adds). ``mechanism/mu_mean/bucket_<i>`` is the mean mu per frequency bucket (NaN where
    empty). ``rarity``, ``buckets``: per response token, [N, T]; special tokens should be masked out.
    """
    m = mask.bool()
    x = rarity[m].double()
    y = -behavior_logp.float()[m].clamp(max=30.0).double()
    out: dict[str, float] = {}
    if x.numel() > 1 and float(x.std()) > 0 and float(y.std()) > 0:
        out["mechanism/corr_rarity_neglogmu"] = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    b = buckets[m]
    count = torch.bincount(b, minlength=num_buckets).double()
    mean_mu = (torch.bincount(b, weights=(-y).exp(), minlength=num_buckets) / count).tolist()
    for i, v in enumerate(mean_mu):
        out[f"mechanism/mu_mean/bucket_{i}"] = v
    return out


class EpochStats:
    """Masked fraction and mean |pi - mu| per PPO epoch: overall, by advantage sign, by frequency bucket.

    Keys ``trust_region/epoch_<e>/masked_frac`` and ``.../abs_diff_mean``, each also ``/pos`` and
    ``/neg`` (tokens with A > 0 / A < 0) and ``/bucket_<i>``; token-weighted over the epoch's minibatches.
    """

    def __init__(self, num_buckets: int, device: torch.device):
        self.n, self.device = num_buckets, device
        self.acc: dict[int, torch.Tensor] = {}  # epoch -> [sign (all, pos, neg), (count, masked, |pi-mu|), bucket]

    @torch.no_grad()
    def add(self, epoch: int, buckets: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
            abs_diff: torch.Tensor) -> None:
        acc = self.acc.setdefault(epoch, torch.zeros(3, 3, self.n, dtype=torch.float64, device=self.device))
        m = mask.bool()
        b, masked, diff, a = buckets.to(m.device)[m], (~keep[m]).double(), abs_diff[m].double(), adv[m]
        for row, sel in enumerate((torch.ones_like(a, dtype=torch.bool), a > 0, a < 0)):
            for col, w in enumerate((None, masked, diff)):
                acc[row, col] += torch.bincount(b[sel], weights=None if w is None else w[sel],
                                                minlength=self.n).to(acc.dtype)

    def metrics(self) -> dict[str, float]:
        out = {}
        for e, acc in sorted(self.acc.items()):
            total = acc.sum(-1)  # [sign, (count, masked, diff)]
            frac = (total[:, 1:] / total[:, :1]).tolist()  # NaN when no token has that sign
            per_bucket = (acc[0, 1:] / acc[0, :1]).tolist()
            pre = f"trust_region/epoch_{e}"
            for sign, (mf, ad) in zip(("", "/pos", "/neg"), frac):
                out[f"{pre}/masked_frac{sign}"], out[f"{pre}/abs_diff_mean{sign}"] = mf, ad
            for i in range(self.n):
                out[f"{pre}/masked_frac/bucket_{i}"] = per_bucket[0][i]
                out[f"{pre}/abs_diff_mean/bucket_{i}"] = per_bucket[1][i]
        return out


class RatioStats:
    """The ratio pi / mu per corpus-frequency bucket and advantage sign over one step's updates.

    Keys ``mechanism/ratio_mean/<pos|neg>/bucket_<i>`` and ``mechanism/ratio_p99/...`` (NaN where a
    bucket has no token of that sign): what the loss sees at each update, pooled over its epochs and
    minibatches. It shows where a region lets the ratio run (low-mu tokens under divergence masks).
    The log-ratio is clamped to [-20, 20] before the exponent."""

    def __init__(self, num_buckets: int):
        self.n = num_buckets
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def add(self, buckets: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor,
            behavior_logp: torch.Tensor) -> None:
        m = mask.bool()
        ratio = (logp.detach().double() - behavior_logp.double()).clamp(-20, 20).exp()
        self.parts.append((buckets.to(m.device)[m].cpu(), torch.sign(adv[m]).cpu(), ratio[m].cpu()))

    def metrics(self) -> dict[str, float]:
        if not self.parts:
            return {}
        b, sign, ratio = (torch.cat(x) for x in zip(*self.parts, strict=True))
        out = {}
        for name, s in (("pos", 1), ("neg", -1)):
            for i in range(self.n):
                r = ratio[(sign == s) & (b == i)]
                empty = r.numel() == 0
                out[f"mechanism/ratio_mean/{name}/bucket_{i}"] = math.nan if empty else float(r.mean())
                out[f"mechanism/ratio_p99/{name}/bucket_{i}"] = math.nan if empty else float(torch.quantile(r, 0.99))
        return out


class MaskedTokenCounter:
    """How often each vocabulary id was masked by the trust region over a run (counted per loss call,
    i.e. once per PPO epoch), and how often it was seen, for the run's most-masked tokens."""

    def __init__(self, rows: int, device: torch.device):
        self.masked = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, ids: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.bool()
        n = len(self.seen)
        self.seen += torch.bincount(ids[m], minlength=n)[:n]
        self.masked += torch.bincount(ids[m & ~keep], minlength=n)[:n]

    def state(self) -> dict[str, torch.Tensor]:
        return {"masked_token_counts": self.masked.cpu(), "seen_token_counts": self.seen.cpu()}

    def load_state(self, state: dict) -> None:
        if state.get("masked_token_counts") is not None:
            self.masked.copy_(state["masked_token_counts"])
            self.seen.copy_(state["seen_token_counts"])

    def top(self, k: int, tokenizer) -> list[dict]:
        """The ``k`` most-masked ids (ties by id) with counts, masked share and decoded text."""
        order = torch.argsort(-self.masked, stable=True)[:k].tolist()  # ties by id
        masked, seen = self.masked.tolist(), self.seen.tolist()
        out = []
        for i in order:
            if masked[i] == 0:
                break
            out.append({"id": i, "text": tokenizer.decode([i]) if i < len(tokenizer) else None, "masked": masked[i],
                        "seen": seen[i], "masked_share": masked[i] / max(seen[i], 1)})
        return out
