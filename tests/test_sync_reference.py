"""The synchronous trainer (rollout.staleness = 0) reproduces the metrics the trainer wrote before
it was split into collector / learner / loop, value for value.

tests/data/sync_reference_metrics.json was written by the pre-split trainer (see
``trainer_fixtures.write_reference``); regenerate it only from a trainer whose output is known to be
right:  PYTHONPATH=src python tests/test_sync_reference.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from trainer_fixtures import REFERENCE_CASES, REFERENCE_FILE, run_reference_case, write_reference


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_synchronous_trainer_reproduces_reference_metrics(tmp_path, case, one_thread):
    expected = json.loads(REFERENCE_FILE.read_text())[case]
    got = run_reference_case(tmp_path / case, case)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert any(r["loss/total"] != 0 for r in expected), "the reference must come from updates that move the policy"
    for want, have in zip(expected, got):
        diffs = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
        assert not diffs, (want["step"], diffs)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_reference(Path(tmp))
    print(f"wrote {REFERENCE_FILE}")
