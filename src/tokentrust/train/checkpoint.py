"""Checkpoints: weights as safetensors, optimizer via torch.save(weights_only-loadable), state as JSON.

A checkpoint directory is written under a temporary name and renamed into place, then the
``LATEST`` pointer is replaced atomically, so a crash mid-write never yields the checkpoint
that a resume picks up.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokentrust.train.rundir import atomic_write_json, atomic_write_text


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or tampered with."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Python/numpy RNG states as plain lists/tensors so torch.load(weights_only=True) accepts them."""
    py = state["python"]
    np_state = state["numpy"]
    out = {"torch": state["torch"], "python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    py = state["python"]
    np_state = state["numpy"]
    out = {"torch": state["torch"], "python": (py[0], tuple(py[1]), py[2]),
           "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:])}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: all of them, or only the trainable ones (LoRA adapters)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    all_params = {n for n, _ in model.named_parameters()}
    state = model.state_dict()
    if trainable != all_params:
        state = {k: v for k, v in state.items() if k in trainable}
    # safetensors refuses shared storage (tied embeddings): clone each tensor.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], extra_tensors: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``ckpt_root/step_XXXXXX`` atomically and point ``LATEST`` at it; prune old ones."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp_{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state_dict(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_to_tensors(rng_state()),
                "extra": extra_tensors or {}}, tmp / "optimizer.pt")
    digests = {name: file_sha256(tmp / name) for name in CHECKSUMMED}
    atomic_write_json(tmp / "trainer_state.json", {"step": step, **trainer_state, "sha256": digests})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(ckpt_root / "LATEST", name + "\n")
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


CHECKSUMMED = ("model.safetensors", "optimizer.pt")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / "LATEST"
    if not pointer.exists():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights (+ optimizer, RNG); returns (trainer_state, extra_tensors). Safe formats only."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        for name, digest in state.get("sha256", {}).items():
            if file_sha256(path / name) != digest:
                raise CheckpointError(f"checkpoint {path}: {name} does not match its recorded sha256; "
                                      "the file is truncated or was modified")
        weights = load_file(str(path / "model.safetensors"))
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete: {e.filename} is missing") from None
    except Exception as e:  # truncated or tampered files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              "it is truncated or was modified") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or (set(weights) != trainable and set(missing) & trainable):
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if restore_rng:
        set_rng_state(_rng_from_tensors(blob["rng"]))
    return state, blob.get("extra", {})
