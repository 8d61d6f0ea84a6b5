"""bench.bench_diffusion --quick end to end (fixture denoiser): the JSON has every run and field."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_diffusion import main


def test_quick_benchmark_writes_all_runs(tmp_path: Path) -> None:
    output = tmp_path / "diffusion.json"
    main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["model"].startswith("FIXTURE") and report["steps"] == 3
    runs = {(run["step_batching"], run["scenario"]): run for run in report["runs"]}
    assert len(runs) == 6 and {mode for mode, _ in runs} == {True, False}
    for (_, scenario), run in runs.items():
        mixed = scenario.startswith("mixed")
        assert run["images"] == (2 + 7 if mixed else run["clients"] * (2 if run["clients"] == 1 else 1))
        assert (run["short_latency_p50_ms"] is not None) == mixed
        assert run["images_per_s"] > 0 and run["latency_p95_ms"] >= run["latency_p50_ms"] > 0
        assert run["steps_per_s"] > 0 and run["mean_rows_per_call"] >= 1
    assert runs[(True, "8 client(s), DDIM 3 steps")]["max_rows_per_call"] > 2  # 8 clients share denoiser calls
    assert set(report["denoiser_call_ms_by_rows"]) == {"1", "2", "8", "16"}
    assert "load_average_at_start" in report["machine"] and "load_average_at_end" in report["machine"]
