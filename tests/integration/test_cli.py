"""`histosynth generate` end to end: embedded servers or a --target, valid files, resumable runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from clients.cli import SPECS_DIR, load_spec, main
from services.all_in_one import BackgroundServers
from services.generation.sink import read_label_png
from tests.fixtures.generation_models import write_generation_store
from tests.integration.conftest import server_config

SERVICES = ("refinement", "rendering", "generation")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generation_store(tmp_path_factory.mktemp("cli") / "model_store")


@pytest.fixture(scope="module")
def servers(store: Path) -> Iterator[BackgroundServers]:
    with BackgroundServers(server_config(store), SERVICES, {name: 0 for name in SERVICES}) as running:
        yield running


def small_spec(tmp_path: Path, source: str = "ihc-ki67-bins.yaml", size: int = 128) -> Path:
    data = yaml.safe_load((SPECS_DIR / source).read_text())
    data.update(height=size, width=size)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_example_specs_parse() -> None:
    tissues = {load_spec(path, None).tissue for path in SPECS_DIR.glob("*.yaml")}
    assert tissues == {"glands", "ihc", "nuclei", "nuclei-diffusion"}


def test_generate_writes_valid_files_and_resumes(
    servers: BackgroundServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, out = small_spec(tmp_path), tmp_path / "out"
    target = servers.addresses["generation"]
    args = ["generate", "--spec", str(spec), "--out", str(out), "--target", target, "--no-progress"]
    assert main([*args, "--count", "4"]) == 0
    report = capsys.readouterr().out
    assert "wrote 4 new samples" in report and "samples per stratum: 1-49%: 1, <1%: 2, >=50%: 1" in report
    for index in range(4):
        stem = out / f"{index:06d}"
        image = cv2.imread(f"{stem}_image.png", cv2.IMREAD_UNCHANGED)
        mask, instances = read_label_png(f"{stem}_mask.png"), read_label_png(f"{stem}_instances.png")
        assert image.shape == (128, 128, 3)
        assert mask.dtype == np.uint8 and mask.shape == (128, 128) and mask.max() <= 3
        assert instances.dtype == np.uint16 and instances.shape == (128, 128)
        record = json.loads(Path(f"{stem}.json").read_text())
        assert record["index"] == index and record["provenance"]["models"][0]["name"] == "renderer-ihc"
        assert 0 <= record["scores"]["tps"] <= 1 and record["files"]["mask"] == f"{index:06d}_mask.png"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 4 and summary["total_finished"] == 4
    # Re-run with a larger count: the 4 finished samples are skipped, untouched.
    first_record = (out / "000000.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("00000[0-3]*")}
    assert main([*args, "--count", "6"]) == 0
    assert "wrote 2 new samples to" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["skipped"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("00000[0-3]*")} == mtimes
    # A half-written sample (no JSON) is redone, byte-identical to the original.
    image_before = (out / "000001_image.png").read_bytes()
    (out / "000001.json").unlink()
    assert main([*args, "--count", "6"]) == 0
    assert "wrote 1 new samples" in capsys.readouterr().out
    assert (out / "000001_image.png").read_bytes() == image_before
    assert (out / "000000.json").read_bytes() == first_record
    # Nothing left to do.
    assert main([*args, "--count", "6"]) == 0
    assert "wrote 0 new samples" in capsys.readouterr().out
    # Resuming with another spec into the same directory is refused.
    with pytest.raises(SystemExit, match=r"holds samples of another spec \(differs in \['seed'\]\)"):
        main([*args, "--count", "6", "--seed", "99"])


def test_generate_embedded(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "embedded"
    spec = small_spec(tmp_path, "glands-balanced.yaml", size=64)
    code = main(["generate", "--spec", str(spec), "--count", "3", "--out", str(out),
                 "--model-store", str(store), "--no-progress"])
    assert code == 0
    assert "wrote 3 new samples" in capsys.readouterr().out
    assert len(list(out.glob("[0-9]*.json"))) == 3 and (out / "summary.json").exists()


def test_run_demo_without_models_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["run-demo", "--model-store", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no renderer models found" in capsys.readouterr().err


def test_missing_model_store_is_one_line_naming_flag_and_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run-demo", "--model-store", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "does not exist" in error
    assert "--model-store" in error and "HISTOSYNTH_MODEL_STORE" in error and str(tmp_path / "absent") in error


def test_spec_by_shipped_name(tmp_path: Path) -> None:
    """An installed CLI finds the README's example specs by name from any directory."""
    by_name = load_spec(Path("glands-balanced"), 3)
    assert by_name == load_spec(Path("clients/specs/glands-balanced.yaml"), 3) == load_spec(
        SPECS_DIR / "glands-balanced.yaml", 3)
    with pytest.raises(SystemExit, match="shipped specs, usable by name: .*glands-balanced"):
        load_spec(tmp_path / "nope.yaml", None)


def test_run_demo_with_fixture_models(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["run-demo", "--model-store", str(store), "--out", str(out), "--count", "3", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "demo done: 9 new images" in report
    assert {p.name for p in out.iterdir()} == {"glands-balanced", "ihc-ki67-bins", "nuclei"}
