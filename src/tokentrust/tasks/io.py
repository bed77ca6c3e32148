"""JSONL reading with line-numbered errors, hub loading, and the default-data-folder lookup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/tokentrust/tasks/io.py -> repo root


def check_rows(items: Iterable[tuple[int, dict | None, str | None]], source: str, required: Sequence[str] = (),
               on_bad_line: str = "raise", validate: Callable[[dict], None] | None = None) -> tuple[list[dict], int]:
    """Validate (line number, row or None, parse error) items; returns (rows, skipped).

    A malformed item (a parse error, a non-object, or `validate(row)` raising ValueError) raises
    ``ValueError("SOURCE:LINE: ...")`` or, with ``on_bad_line="skip"``, is skipped and counted. A
    missing `required` field always raises (a wrong file must not be silently skipped into
    nothing), and so does a source with no rows.
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line must be 'raise' or 'skip', got {on_bad_line!r}")
    rows: list[dict] = []
    skipped = 0
    for lineno, row, err in items:
        if err is None and not isinstance(row, dict):
            err = f"malformed line: expected a JSON object, got {type(row).__name__}"
        if err is None:
            for field in required:
                if field not in row:
                    raise ValueError(f"{source}:{lineno}: missing field {field!r} (row has {sorted(row)[:8]})")
            if validate is not None:
                try:
                    validate(row)
                except ValueError as e:
                    err = str(e)
        if err is not None:
            if on_bad_line == "skip":
                skipped += 1
                continue
            raise ValueError(f"{source}:{lineno}: {err}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{source}: no rows (empty dataset{f'; {skipped} malformed lines skipped' if skipped else ''})")
    return rows, skipped


def _parse_lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except ValueError as e:
                yield lineno, None, f"malformed JSONL line: {e}"


def read_jsonl(path: str | Path, required: Sequence[str] = (), on_bad_line: str = "raise",
               validate: Callable[[dict], None] | None = None) -> tuple[list[dict], int]:
    """Rows of a JSONL file and the number of skipped malformed lines (blank lines are ignored).

    Errors name the file and line: ``ValueError("PATH:LINE: ...")``; see `check_rows`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return check_rows(_parse_lines(path), str(path), required, on_bad_line, validate)


def find_data_dir(name: str) -> Path | None:
    """The first existing ``../shared/data/NAME`` relative to the working directory or the repo root."""
    for base in (Path.cwd(), REPO_ROOT):
        cand = (base / ".." / "shared" / "data" / name).resolve()
        if cand.is_dir():
            return cand
    return None


def load_hub_split(hub_id: str, config: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split through `datasets` (imported lazily; optional dependency)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"no local data found for {hub_id!r} split {split!r} and the `datasets` package is not installed: "
            f"pass data_dir=FOLDER holding {split}.jsonl, or `pip install datasets` (extra 'hub')"
        ) from None
    args = (hub_id, config) if config else (hub_id,)
    return [dict(r) for r in datasets.load_dataset(*args, split=split)]


def load_rows(name: str, split: str, data_dir: str | Path | None, hub_id: str, hub_config: str | None,
              required: Sequence[str], on_bad_line: str,
              validate: Callable[[dict], None] | None = None) -> tuple[list[dict], int, str]:
    """Rows of `split` from `data_dir`/SPLIT.jsonl, else the default local folder, else the hub.

    Returns (rows, skipped, source). An explicit `data_dir` never falls back to the hub.
    """
    folder = Path(data_dir) if data_dir is not None else find_data_dir(name)
    if folder is not None:
        path = folder / f"{split}.jsonl"
        if path.is_file() or data_dir is not None:
            rows, skipped = read_jsonl(path, required, on_bad_line, validate)
            return rows, skipped, str(path)
    source = f"{hub_id}[{split}]"
    hub_rows = load_hub_split(hub_id, hub_config, split)
    rows, skipped = check_rows(((i + 1, r, None) for i, r in enumerate(hub_rows)), source, required,
                               on_bad_line, validate)
    return rows, skipped, source
