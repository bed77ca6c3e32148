"""The methods a grid may name (`tokentrust compare --list-methods`): loss, trust-region settings,
family and description of each."""

from __future__ import annotations

from typing import Any

# Every method a grid may name. "family" groups them in the report: AV-DPPO variants are
# what the hypotheses are about; everything else is a baseline.
# DPPO's truncated IS weight min(r, C) with C = 3.0, as verl runs dppo_tv / dppo_kl (clip_ratio_c, docs/methods.md);
# every DPPO-based method carries it so the primary pair stays matched. Grids committed before this cap
# record is_cap null in grid.json (resolved_example): they ran uncapped, as the *-uncapped methods do.
_CAP = 3.0
_AV = {"loss": "dppo-tv", "is_cap": _CAP}
METHODS: dict[str, dict[str, Any]] = {
    "ppo": {"algo": {"loss": "ppo", "eps_low": 0.2}, "family": "baseline", "description": "PPO ratio clip, eps 0.2"},
    "clip-higher": {"algo": {"loss": "ppo", "eps_low": 0.2, "eps_high": 0.28}, "family": "baseline",
                    "description": "DAPO clip-higher, eps 0.2 / 0.28"},
    "dppo-tv": {"algo": {"loss": "dppo-tv", "delta": 0.15, "is_cap": _CAP}, "family": "baseline",
                "description": "DPPO Binary-TV, delta 0.15, IS weight capped at 3 (verl)"},
    "dppo-kl": {"algo": {"loss": "dppo-kl", "delta": 0.05, "is_cap": _CAP}, "family": "baseline",
                "description": "DPPO Binary-KL, delta 0.05, IS weight capped at 3 (verl)"},
    "dppo-tv-uncapped": {"algo": {"loss": "dppo-tv", "delta": 0.15, "is_cap": None}, "family": "baseline",
                         "description": "DPPO Binary-TV, delta 0.15, uncapped IS weight (dppo-tv before the cap)"},
    "dppo-kl-uncapped": {"algo": {"loss": "dppo-kl", "delta": 0.05, "is_cap": None}, "family": "baseline",
                         "description": "DPPO Binary-KL, delta 0.05, uncapped IS weight (dppo-kl before the cap)"},
    "dppo-topk-tv": {"algo": {"loss": "dppo-topk-tv", "delta": 0.15, "is_cap": _CAP}, "family": "baseline",
                     "description": "DPPO Top-K TV (K = 20), delta 0.15, IS weight capped at 3"},
    "bandpo": {"algo": {"loss": "bandpo", "delta": 0.05, "eps_low": 0.2, "eps_high": 0.28}, "family": "baseline",
               "description": "BandPO-KL bounds, radius 0.05, upper bound <= 10, dual clip 10 (BandPO main recipe)"},
    "bandpo-relax": {"algo": {"loss": "bandpo", "delta": 0.05, "eps_low": 0.2, "eps_high": 0.28,
                              "params": {"relax": True}}, "family": "baseline",
                     "description": "BandPO-KL relaxed to the 0.2 / 0.28 clip (BandPO's _relax recipe)"},
    "dcpo": {"algo": {"loss": "dcpo", "eps_low": 0.2, "eps_high": 0.28}, "family": "baseline",
             "description": "DCPO dynamic adaptive clipping, eps 0.2 / 0.28, upper bound <= 10, dual clip 10"},
    "ppo-lowmu-exempt": {"algo": {"loss": "ppo-lowmu-exempt", "eps_low": 0.2, "params": {"tau": 0.01}},
                         "family": "ablation",
                         "description": "PPO clip, eps 0.2, tokens with mu < 0.01 exempt (the hybrid's converse)"},
    "cppo": {"algo": {"loss": "cppo", "delta": 0.15}, "family": "baseline", "description": "CPPO, delta 0.15"},
    "drpo": {"algo": {"loss": "drpo", "delta": 12.5}, "family": "baseline",
             "description": "DRPO soft region, delta 12.5 (the UniRL reference setting)"},
    "decoupled-ppo": {"algo": {"loss": "decoupled-ppo", "eps_low": 0.2}, "family": "baseline",
                      "description": "AReaL decoupled PPO: clip vs recomputed pi_prox, eps 0.2, times pi_prox/mu"},
    "pg-is": {"algo": {"loss": "pg-is", "is_cap": None}, "family": "control",
              "description": "no trust region: importance-weighted policy gradient r A, uncapped"},
    "pg-is-capped": {"algo": {"loss": "pg-is", "is_cap": 5.0}, "family": "control",
                     "description": "no trust region: truncated IS policy gradient min(r, 5) A"},
}
for _kind, _short in (("frequency", "freq"), ("batch-frequency", "batch"), ("entropy", "entropy"),
                      ("combined", "combined")):
    for _norm in (False, True):
        _name = f"av-{_short}" + ("-norm" if _norm else "")
        METHODS[_name] = {"algo": {**_AV, "delta": 0.15, "thresholds": {"kind": _kind, "beta": 0.5,
                                                                          "normalize": _norm}},
                          "family": "av-dppo",
                          "description": f"AV-DPPO TV, {_kind} thresholds, beta 0.5" + (", mean-preserving" if _norm else "")}
METHODS["av-freq-inverse"] = {"algo": {**_AV, "delta": 0.15, "thresholds": {"kind": "frequency", "beta": -0.5,
                                                                             "normalize": True}},
                              "family": "control", "description": "inverse control: beta -0.5 (tighter for rare tokens)"}
METHODS["av-freq-norm-uncapped"] = {"algo": {**METHODS["av-freq-norm"]["algo"], "is_cap": None}, "family": "av-dppo",
                                    "description": "AV-DPPO TV, frequency thresholds, beta 0.5, mean-preserving, "
                                                   "uncapped IS weight (av-freq-norm before the cap)"}
# The hybrid (issue 18, pre-registered in docs/results/hybrid-preregistration.md): av-freq-norm whose A > 0
# tokens with mu < 0.01 are also ratio-bounded (r <= 1.2).
METHODS["av-hybrid"] = {"algo": {**METHODS["av-freq-norm"]["algo"], "loss": "dppo-tv-hybrid", "eps_low": 0.2,
                                 "params": {"tau": 0.01}},
                        "family": "hybrid", "description": "AV-DPPO TV (as av-freq-norm) with A > 0 tokens of "
                                                           "mu < 0.01 ratio-bounded at 1.2"}
