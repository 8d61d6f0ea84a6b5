"""Experiment reports name the CPU type: bf16 segmenter numbers are reproducible per CPU type, not across types."""

from __future__ import annotations

from pathlib import Path

from training.experiments.report import cpu_identity, machine


def test_cpu_model_and_bf16_instruction_sets_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx512f avx512_bf16 "
        "amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n"
    )
    assert cpu_identity(cpuinfo) == {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
                                     "bf16_isa": ["amx_bf16", "amx_tile", "avx512_bf16"]}


def test_an_unreadable_cpuinfo_is_unknown_not_an_error(tmp_path: Path) -> None:
    assert cpu_identity(tmp_path / "missing") == {"cpu_model": "unknown", "bf16_isa": []}
    assert {"platform", "cpus", "cpu_model", "bf16_isa"} <= set(machine())
