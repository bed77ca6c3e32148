"""Every run directory records the machine (CPU model, vector ISA) that started and resumed it."""

from __future__ import annotations

import json

from conftest import tiny_overrides
from tokentrust.train.config import resolve
from tokentrust.train.machine import parse_cpuinfo, simd_note
from tokentrust.train.loop import run_training

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\nModel\t: Raspberry Pi 5\n"


def test_parse_cpuinfo_reads_the_first_processor():
    model, flags = parse_cpuinfo(X86)
    assert model == "AMD EPYC 9B14"
    assert {"avx2", "avx512f", "avx512_bf16"} <= flags and "fpu" in flags
    model, flags = parse_cpuinfo(ARM)
    assert model == "Raspberry Pi 5" and "asimd" in flags


def test_run_directory_records_machine_at_start_and_resume(tmp_path, one_thread):
    cfg = resolve(overrides=tiny_overrides(tmp_path / "run", max_steps=1))
    run_training(cfg, quiet=True, evaluate_at_end=False)
    rec = json.loads((tmp_path / "run" / "machine.json").read_text())
    assert rec["started"]["cpu"]["model"] and rec["started"]["simd_note"] == simd_note()
    assert rec["started"]["torch_threads"] == 1 and rec["resumed"] == []
    run_training(cfg.model_copy(update={"max_steps": 2}), resume=True, quiet=True, evaluate_at_end=False)
    rec2 = json.loads((tmp_path / "run" / "machine.json").read_text())
    assert rec2["started"] == rec["started"] and len(rec2["resumed"]) == 1


def test_code_version_names_the_commit_and_whether_tracked_files_differ(tmp_path):
    """code_version reads the commit of the checkout a source file lives in (compared with a commit
    made here) and flags an edited tracked file; outside a git checkout it is None."""
    import subprocess

    from tokentrust.train.machine import code_version

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").strip()
    assert code_version(str(src)) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("not code")
    assert code_version(str(src))["dirty"] is False
    src.write_text("x = 2\n")
    assert code_version(str(src)) == {"commit": head, "dirty": True}
    outside = tmp_path.parent / f"{tmp_path.name}-plain" / "mod.py"
    outside.parent.mkdir()
    outside.write_text("")
    assert code_version(str(outside)) is None
