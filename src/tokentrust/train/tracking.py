"""Trackers (TensorBoard, W&B) that receive a run's scalars and samples, and the progress display."""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from tokentrust.train.rundir import atomic_write_text


class TensorBoard:
    """Scalars (and sample tables as text) to TensorBoard when it is installed; silently off otherwise."""

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
        for k, v in numeric_items(record):
            self.writer.add_scalar(k, v, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if self.writer is not None and rows:
            cols = list(rows[0])
            lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows]
            self.writer.add_text("samples", "\n".join(lines), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Wandb:
    """Weights & Biases: the resolved config, the same slash-named scalars, and sample tables.

    Honours the usual ``WANDB_*`` variables (``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_ENTITY``);
    without ``WANDB_DIR`` the files go to the run directory. The W&B run id is kept in
    ``RUN_DIR/wandb_run_id`` so that ``--resume`` continues the same W&B run.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], *, project: str, name: str | None = None,
                 group: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.trackers has 'wandb' but wandb is not installed: pip install 'tokentrust[tracking]'") from None
        self._wandb = wandb
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(run_dir)}
        self.run = wandb.init(project=project, name=name or str(run_dir), group=group, config=config, id=run_id,
                              resume="allow", **kwargs)

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(dict(numeric_items(record)), step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            cols = list(rows[0])
            table = self._wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def numeric_items(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The finite numbers of a metrics record (strings, booleans and NaN left out)."""
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield k, v


class Trackers:
    """Fans a run's metrics and samples out to the trackers named in ``log.trackers``."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    @classmethod
    def open(cls, names: list[str], run_dir: Path, config: dict[str, Any], *, project: str = "tokentrust",
             run_name: str | None = None, group: str | None = None) -> "Trackers":
        backends: list[Any] = []
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                backends.append(TensorBoard(Path(run_dir) / "tensorboard"))
            elif name == "wandb":
                backends.append(Wandb(Path(run_dir), config, project=project, name=run_name, group=group))
            else:
                raise ValueError(f"log.trackers: unknown tracker {name!r}; available: tensorboard, wandb")
        return cls(backends)

    def log(self, record: dict[str, Any], step: int) -> None:
        for b in self.backends:
            b.log(record, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for b in self.backends:
            b.log_samples(rows, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()


class Progress:
    """Progress of long work: a live tqdm bar on a terminal, plain lines at most every ``every_s``
    seconds otherwise (no carriage returns in log files), nothing when ``quiet``.

    ``TOKENTRUST_PROGRESS=bar|plain|off`` overrides the terminal check (``quiet`` always wins).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, quiet: bool = False,
                 stream: Any = None, every_s: float = 15.0):
        self.stream = stream if stream is not None else sys.stdout
        self.desc, self.unit, self.total, self.n = desc, unit, total, initial
        self.every_s, self.postfix = every_s, ""
        self.t0 = time.monotonic()
        self._last_line = -math.inf
        self._printed: tuple[int, str] | None = None
        mode = os.environ.get("TOKENTRUST_PROGRESS", "").lower()
        if mode not in ("bar", "plain", "off"):
            mode = "bar" if _isatty(self.stream) else "plain"
        self.mode = "off" if quiet else mode
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` (may be 0, to refresh the postfix or the clock)."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()
        elif self.mode == "plain" and time.monotonic() - self._last_line >= self.every_s \
                and (self.n, self.postfix) != self._printed:
            self._line()

    def note(self, message: str) -> None:
        """A line of its own (above the bar on a terminal); silent when quiet."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        elif self.mode == "plain":
            print(message, file=self.stream, flush=True)

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and 0 < self.n < self.total:
            eta = f", ETA {_clock(elapsed / self.n * (self.total - self.n))}"
        tail = f" | {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} [{_clock(elapsed)}{eta}]{tail}", file=self.stream, flush=True)
        self._last_line, self._printed = time.monotonic(), (self.n, self.postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "plain" and self._printed != (self.n, self.postfix):
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
