"""Counts of verifier checks that ended without a verdict: a timeout or a worker crash.

Such a check scores 0, like a wrong answer, so without a count a slow or broken verifier looks like
a weak policy. The bounded verifiers (math-verify's and reasoning-gym's subprocess workers) report
each failure here; ``count_failures()`` collects those of the checks one thread runs inside a block
(the trainer's collector wraps the scoring of each batch in one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Kind = Literal["timeouts", "errors"]


@dataclass(eq=False)  # identity, not value: two open counters with equal counts are different counters
class VerifierFailures:
    """Failed checks: ``timeouts`` (the deadline or the worker's own timer fired), ``errors`` (the
    worker died, answered garbage or could not be started, or the check raised)."""

    timeouts: int = 0
    errors: int = 0


_local = threading.local()


def _open() -> list[VerifierFailures]:
    if not hasattr(_local, "open"):
        _local.open = []
    return _local.open


@contextmanager
def count_failures() -> Iterator[VerifierFailures]:
    """Count the failures of the checks this thread runs inside the block (blocks may nest)."""
    counts = VerifierFailures()
    _open().append(counts)
    try:
        yield counts
    finally:
        _open().remove(counts)


def record_failure(kind: Kind, owner: object | None = None) -> None:
    """Add one failure of ``kind`` to every counter open in this thread, and to ``owner``'s own
    ``timeouts`` / ``errors`` attribute when given (a verifier's lifetime totals)."""
    for counts in [*_open(), *([] if owner is None else [owner])]:
        setattr(counts, kind, getattr(counts, kind) + 1)
