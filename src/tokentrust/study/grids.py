"""The named grids (`tokentrust compare --preset NAME`: methods x seeds, base preset, overrides,
declared primary comparison, parts) and the studies that run several of them."""

from __future__ import annotations

from typing import Any

from tokentrust.study.methods import _AV

_FOUR = [0, 1, 2, 3]
_STRESS_OTHERS = ("av-freq-inverse", "pg-is", "ppo", "clip-higher", "dppo-kl", "cppo", "decoupled-ppo", "drpo",
                  "av-freq", "av-batch-norm", "av-entropy-norm", "av-combined-norm")


def _dose(name: str, delta: float, beta: float | None) -> dict[str, Any]:
    """A dose-response cell: Binary-TV with threshold delta, frequency-normalised schedule with beta
    (None: the fixed threshold)."""
    thr = {"kind": "constant"} if beta is None else {"kind": "frequency", "beta": beta, "normalize": True}
    what = "fixed threshold" if beta is None else f"frequency-normalised, beta {beta:g}"
    return {"name": name, "algo": {**_AV, "delta": delta, "thresholds": thr}, "seeds": _FOUR,
            "family": "dose", "description": f"dose-response: DPPO-TV delta {delta:g}, {what}"}


# beta in {-1, -0.5, 0, 0.5, 1, 2} at delta 0.15 (-0.5 is av-freq-inverse, 0.5 av-freq-norm; beta 0 must
# reproduce dppo-tv) and delta in {0.05, 0.1, 0.15, 0.3} for dppo-tv and av-freq-norm (beta 0.5).
_DOSE = [_dose(f"av-beta{b:g}", 0.15, float(b)) for b in (-1, 0, 1, 2)] + \
        [_dose(f"dppo-tv-delta{d:g}", d, None) for d in (0.05, 0.1, 0.3)] + \
        [_dose(f"av-freq-norm-delta{d:g}", d, 0.5) for d in (0.05, 0.1, 0.3)]

GRID_PRESETS: dict[str, dict[str, Any]] = {
    # README main job: the off-policy headroom regime of the confirmatory study (tiny-arith-offpolicy,
    # where RL learns and the regions bind), cut to its first 100 of 250 steps: the no-region control
    # (pg-is), DPPO-TV with the references' IS cap and AV-DPPO, 2 seeds each. By step 100 the reward
    # of the regions has risen from ~0.38 to ~0.5 while pg-is stays flat, so the methods separate; 6
    # runs of ~2 min plus the warm start fit `make run` in 10 minutes on 2 cores, install included.
    "demo": {"preset": "tiny-arith-offpolicy", "methods": ["pg-is", "dppo-tv", "av-freq-norm"], "seeds": [0, 1],
             "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
             "overrides": {"max_steps": 100, "task": {"eval_limit": 256}}},
    # Every baseline, the AV-DPPO schedules, the inverse control, 3 seeds: ~40 min on 2 cores. The
    # synchronous regime, where the regions hardly act (kept fraction > 99.5%).
    "cpu-study": {"preset": "tiny-arith",
                  "methods": ["ppo", "clip-higher", "dppo-tv", "dppo-kl", "cppo", "drpo", "av-freq", "av-freq-norm",
                              "av-batch-norm", "av-entropy-norm", "av-combined-norm", "av-freq-inverse"],
                  "seeds": [0, 1, 2], "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
                  "overrides": {"max_steps": 40, "task": {"eval_limit": 128, "eval_samples": 4}}},
    # The study (issue 11) in the stress regime, in resumable parts of at most about an hour on 2 cores
    # with 2 workers (`--part N`; finished runs are skipped, so the parts may run in any order):
    # 1, the primary pair with 8 seeds; 2, the inverse control, the no-region control and PPO; 3, every
    # other baseline and AV-DPPO schedule; 4, dose-response in beta; 5, in delta. 4 seeds per non-primary cell.
    "stress-study": {"preset": "tiny-arith-async",
                     "methods": ["dppo-tv", "av-freq-norm",
                                 *({"name": m, "seeds": _FOUR} for m in _STRESS_OTHERS), *_DOSE],
                     "seeds": list(range(8)), "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
                     "parts": {"1": ["dppo-tv", "av-freq-norm"], "2": ["av-freq-inverse", "pg-is", "ppo"],
                               "3": [m for m in _STRESS_OTHERS if m not in ("av-freq-inverse", "pg-is", "ppo")],
                               "4": [d["name"] for d in _DOSE if d["name"].startswith("av-beta")],
                               "5": [d["name"] for d in _DOSE if "-delta" in d["name"]]},
                     "overrides": {"max_steps": 40, "task": {"eval_limit": 128, "eval_samples": 4}}},
    # The control regime: the synchronous default (tiny-arith, 2 epochs x 2 minibatches, on-policy
    # batches), same step count and evaluation as stress-study, 4 seeds.
    "sync-study": {"preset": "tiny-arith",
                   "methods": ["dppo-tv", "av-freq-norm", "ppo", "av-freq-inverse", "pg-is"],
                   "seeds": _FOUR, "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
                   "overrides": {"max_steps": 40, "task": {"eval_limit": 128, "eval_samples": 4}}},
    # The pilot of issue 18 in the off-policy headroom regime (tiny-arith-offpolicy: staleness 4, 8 updates
    # per batch at lr 6e-5, 250 steps, greedy pass@1 on 640 held-out problems): does the regime have
    # headroom (best method >= +0.10 over the warm start) and do the regions bind (DPPO-TV masks >= 1%)?
    # Not confirmatory; it names the variants the confirmatory study runs. Seeds 0-3. Parts of ~35-45 min
    # on 2 cores with 2 workers: 1, the primary pair, PPO and the no-region control; 2, the uncapped
    # DPPO-TV, BandPO and the hybrid; 3, DCPO.
    "pilot": {"preset": "tiny-arith-offpolicy",
              "methods": ["dppo-tv", "av-freq-norm", "ppo", "pg-is", "dppo-tv-uncapped", "bandpo", "av-hybrid",
                          "dcpo"],
              "seeds": _FOUR, "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
              "parts": {"1": ["dppo-tv", "av-freq-norm", "ppo", "pg-is"],
                        "2": ["dppo-tv-uncapped", "bandpo", "av-hybrid"], "3": ["dcpo"]}},
    # The real-model check (issue 11): SmolLM2-135M-Instruct on GSM8K, the primary pair only, 4 seeds x 8
    # steps (95-105 s per 16-sample step on 2 CPU cores, ~16 min per run). A 2% starting accuracy leaves a
    # group of 4 without an advantage 92% of the time, so the reward adds 0.2 for the asked answer form
    # (followed in ~60% of samples); lr 2e-5, 2 epochs x 2 minibatches on batches one step stale make
    # the regions act. Accuracy here has no power; the point is the mechanism on a 49k vocabulary.
    # Parts: 1, seeds 0-1 (52 min with 2 workers); 2, seeds 2-3 (75 min with 1 worker).
    "smollm2-study": {"preset": "smollm2-gsm8k", "methods": ["dppo-tv", "av-freq-norm"], "seeds": _FOUR,
                      "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
                      "parts": {"1": {"seeds": [0, 1]}, "2": {"seeds": [2, 3]}},
                      "overrides": {"max_steps": 8,
                                    "task": {"eval_limit": 64, "eval_samples": 0,
                                             "options": {"answer_fallback": True, "format_reward": 0.2}},
                                    "rollout": {"staleness": 1},
                                    "optim": {"lr": 2e-5, "minibatches": 2, "warmup_steps": 0},
                                    "log": {"mismatch": True, "checkpoint_every": 4}}},
    # GPU: Qwen2.5-Math-1.5B on GSM8K; about 8 GPU-hours per run on one H100 (300 steps x 512 samples).
    "gpu-study": {"preset": "qwen-math-gsm8k",
                  "methods": ["ppo", "clip-higher", "dppo-tv", "dppo-kl", "dppo-topk-tv", "cppo", "drpo", "av-freq",
                              "av-freq-norm", "av-batch-norm", "av-entropy-norm", "av-combined-norm", "av-freq-inverse"],
                  "seeds": [0, 1, 2], "primary": {"method": "av-freq-norm", "baseline": "dppo-tv"},
                  "overrides": {"task": {"eval_limit": 1319, "eval_samples": 4}}},
}


# A study: grid presets run one after another into OUT/<grid>/ (`tokentrust compare --preset study`).
STUDIES: dict[str, tuple[str, ...]] = {"study": ("stress-study", "sync-study", "smollm2-study")}
