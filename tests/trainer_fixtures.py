"""Shared helpers for trainer tests: a synthetic reward that varies, and the reference runs.

The 1-layer test model never solves an arithmetic problem, so every reward is 0, every advantage
is 0 and an update changes nothing. Tests that must see the policy move patch the verifier with
``digit_share_reward``: a deterministic function of the completion text, so two runs that sample
the same tokens get the same rewards.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from conftest import tiny_overrides
from tokentrust.tasks.base import Score, Task

DATA = Path(__file__).parent / "data"
REFERENCE_FILE = DATA / "sync_reference_metrics.json"

# Configurations whose metrics today's synchronous trainer wrote (tests/data/sync_reference_metrics.json).
# Constant thresholds only: frequency schedules and bucket keys depend on the vocabulary tables, which
# other work changes; the trajectory keys kept here do not.
REFERENCE_CASES: dict[str, dict[str, Any]] = {
    "dppo-tv": {},
    "ppo-kl-recompute": {"algo": {"loss": "ppo", "kl_coef": 0.05, "anchor": "recompute"}},
}
REFERENCE_STEPS = 3
# Keys that depend on wall-clock time or on the vocabulary's bucket layout are not compared.
_SKIP_PREFIXES = ("timing/", "perf/", "rare/")


def digit_share_reward(self: Task, completion: str, example: Any) -> Score:
    """Reward = share of digit characters in the completion (a deterministic stand-in verifier)."""
    share = sum(c.isdigit() for c in completion) / max(len(completion), 1)
    return Score(share, share > 0.25, True, None)


@contextlib.contextmanager
def synthetic_reward() -> Iterator[None]:
    """Patch every task's verifier with :func:`digit_share_reward` for the block."""
    real = Task.score
    Task.score = digit_share_reward
    try:
        yield
    finally:
        Task.score = real


def reference_overrides(out_dir: Path, case: str, **extra: Any) -> dict[str, Any]:
    from tokentrust.train.config import deep_merge

    over = tiny_overrides(out_dir, max_steps=REFERENCE_STEPS, rollout={"group_size": 4},
                          log={"checkpoint_every": 0, "samples_every": 0})
    return deep_merge(deep_merge(over, REFERENCE_CASES[case]), extra)


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys of each record that must reproduce exactly."""
    return [{k: v for k, v in r.items() if not k.startswith(_SKIP_PREFIXES) and "/bucket_" not in k}
            for r in records]


def run_reference_case(out_dir: Path, case: str, **extra: Any) -> list[dict[str, Any]]:
    from tokentrust.train.config import resolve
    from tokentrust.train.rundir import read_jsonl
    from tokentrust.train.loop import run_training

    with synthetic_reward():
        run = run_training(resolve(overrides=reference_overrides(out_dir, case, **extra)), quiet=True,
                           evaluate_at_end=False)
    return comparable(read_jsonl(run / "metrics.jsonl"))


def write_reference(tmp: Path) -> None:
    """Regenerate the fixture (only with a trainer whose output is known to be right)."""
    data = {case: run_reference_case(tmp / case, case) for case in REFERENCE_CASES}
    REFERENCE_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
