"""The synchronous trainer (rollout.staleness = 0) reproduces the metrics the trainer wrote before
it was split into collector / learner / loop, value for value.

tests/data/sync_reference_metrics.json was written by the pre-split trainer (see
``trainer_fixtures.write_reference``) on an AVX-512 machine; regenerate it only from a trainer whose
output is known to be right:  PYTHONPATH=src python tests/test_sync_reference.py

Integers (steps, counts) and discrete outcomes must match exactly; floats within a tolerance set by
float32 rounding. Another SIMD width (AVX2 vs AVX-512) changes the summation order inside matmuls and
reductions, so every float32 result may move by a few ulps (eps = 1.2e-7) and the three AdamW steps
carry that forward. Measured on an AVX2 AMD EPYC against this AVX-512 fixture: largest relative
difference 1.4e-5 (loss/total, a sum of two terms of opposite sign), 6e-6 for the other losses, <= 7e-7
for ratios and grad norms. ``RTOL`` = 2e-4 leaves a 14x margin over that and is still far below
any real change of the computation (a different loss or sampled token moves these values by > 1e-2).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

from trainer_fixtures import REFERENCE_CASES, REFERENCE_FILE, run_reference_case, write_reference

RTOL, ATOL = 2e-4, 1e-8


def record_differences(want: dict, have: dict, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Keys whose values differ: exactly for ints, strings and bools, within rtol/atol for floats."""
    diffs = {}
    for k, v in want.items():
        h = have.get(k)
        if isinstance(v, float) and isinstance(h, (int, float)) and not isinstance(h, bool):
            if not math.isclose(v, h, rel_tol=rtol, abs_tol=atol):
                diffs[k] = (v, h)
        elif h != v or type(h) is not type(v):
            diffs[k] = (v, h)
    return diffs


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_synchronous_trainer_reproduces_reference_metrics(tmp_path, case, one_thread):
    expected = json.loads(REFERENCE_FILE.read_text())[case]
    got = run_reference_case(tmp_path / case, case)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert any(r["loss/total"] != 0 for r in expected), "the reference must come from updates that move the policy"
    for want, have in zip(expected, got):
        diffs = record_differences(want, have)
        assert not diffs, (want["step"], diffs)


def test_record_differences_tolerates_rounding_but_not_changes():
    base = {"step": 1, "loss/total": -6.482831668108702e-4, "train/optimizer_steps": 4, "actor/entropy": 0.41}
    rounded = dict(base, **{"loss/total": -6.482850294560194e-4})  # the AVX2 value: 2.9e-6 relative
    assert record_differences(base, rounded) == {}
    assert set(record_differences(base, dict(base, **{"loss/total": -6.5e-4}))) == {"loss/total"}  # 0.3%
    assert set(record_differences(base, dict(base, **{"train/optimizer_steps": 5}))) == {"train/optimizer_steps"}
    assert set(record_differences(base, dict(base, step=1.0))) == {"step"}  # an int must stay an int
    assert set(record_differences(base, {k: v for k, v in base.items() if k != "actor/entropy"})) == {"actor/entropy"}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_reference(Path(tmp))
    print(f"wrote {REFERENCE_FILE}")
