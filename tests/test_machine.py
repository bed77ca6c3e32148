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
