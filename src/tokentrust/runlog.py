"""Run-directory I/O: whole-line JSONL metrics, atomic JSON files, optional TensorBoard."""

from __future__ import annotations

import json
import math
import os
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


class TensorBoard:
    """Scalars to TensorBoard when it is installed; silently off otherwise."""

    def __init__(self, log_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir))
            except Exception:  # tensorboard not installed
                self.writer = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def iter_run_dirs(root: Path) -> Iterator[Path]:
    for p in sorted(Path(root).rglob("config.json")):
        yield p.parent
