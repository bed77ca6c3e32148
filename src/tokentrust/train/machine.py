"""What a run ran on: CPU model and instruction sets, cores, threads, GPU, library versions.

Float32 results depend on the SIMD width (AVX2 vs AVX-512 sum in another order), so a seed fixes a
run only on the same kind of machine; every run directory records this (``machine.json``) and the
report lists the machines its runs came from.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from typing import Any

# Instruction-set flags that change float results or speed (from /proc/cpuinfo on Linux).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, feature flags) of the first processor in /proc/cpuinfo text (x86 or ARM)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"model": name, "isa": [flags among ISA_FLAGS], "cores": n} of this machine's CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = None, set()
    model = model or platform.processor() or platform.machine()
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count() or 1}


def has_bf16_cpu() -> bool:
    """Whether the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    isa = set(cpu_info()["isa"])
    return bool(isa & {"avx512_bf16", "amx_bf16"})


def machine_info() -> dict[str, Any]:
    """The machine record written into every run directory."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
                            "python": sys.version.split()[0], "torch": torch.__version__,
                            "platform": platform.platform(), "simd_note": simd_note(), "code": code_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def code_version(src: str | None = None) -> dict[str, Any] | None:
    """The git commit of the tokentrust source a run imports, and whether its tracked files differ
    from that commit (a study's runs must share one); None outside a git checkout or without git."""
    import subprocess
    from pathlib import Path

    where = Path(src or __file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def simd_note() -> str:
    """The widest vector ISA, the one that decides float32 summation order on a CPU run."""
    isa = set(cpu_info()["isa"])
    return "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else "neon" if isa & {"neon", "asimd"} else "other"


def machine_summary() -> str:
    """One line: 'AMD EPYC (avx2, 2 cores), torch 2.13.0, 1 thread(s)'."""
    import torch

    c = cpu_info()
    return (f"{c['model']} ({simd_note()}, {c['cores']} cores), torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def record_machine(run_dir, resumed: bool = False) -> dict[str, Any]:
    """Write RUN_DIR/machine.json: the machine that started the run, and every one that resumed it."""
    import json
    from pathlib import Path

    from tokentrust.train.rundir import atomic_write_json

    path = Path(run_dir) / "machine.json"
    record = {"started": machine_info(), "resumed": []}
    if resumed and path.is_file():
        try:
            record = json.loads(path.read_text())
            record.setdefault("resumed", []).append(machine_info())
        except (OSError, ValueError):
            record = {"started": None, "resumed": [machine_info()]}
    atomic_write_json(path, record)
    return record
