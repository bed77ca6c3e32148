"""The run directory's files: atomic JSON / text writes, the whole-line JSONL writer and the readers
of JSONL files (`read_jsonl` for the writer's own files, `read_jsonl_tolerant` and `load_metrics`
for analysis). Trackers and the progress display are in `tokentrust.train.tracking`."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; None marks "not a number this step"
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file, ignoring a trailing partial line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def truncate_jsonl(path: Path, keep: callable) -> None:
    """Rewrite ``path`` atomically keeping the complete records for which ``keep(record)`` holds."""
    records = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class JsonlWriter:
    """Appends one JSON object per line; each line is written whole and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True, default=str) + "\n"
        os.write(self._fd, line.encode())  # one write() of one line: a crash leaves at most a partial tail
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def iter_run_dirs(root: Path) -> Iterator[Path]:
    for p in sorted(Path(root).rglob("config.json")):
        yield p.parent


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a JSONL file, skipping lines that are not complete JSON objects.

    A crash can leave a trailing partial line, and a resumed writer may then append to it, so an
    unparsable line anywhere is skipped (with a warning if it is not the last line).
    """
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    bad = 0
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # the last element has no trailing newline: a partial write
                bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return out


def load_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Step records of a run (RUN_DIR or RUN_DIR/metrics.jsonl), sorted by step.

    After a resume the same step can be logged twice; the later record wins.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    for i, rec in enumerate(read_jsonl_tolerant(p)):
        by_step[rec.get("step", f"_row{i}")] = rec
    numeric = [k for k in by_step if isinstance(k, (int, float))]
    other = [k for k in by_step if not isinstance(k, (int, float))]
    return [by_step[k] for k in sorted(numeric)] + [by_step[k] for k in other]
