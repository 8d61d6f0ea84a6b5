"""training/evaluate.py on the fixture data sample with the tiny real ONNX models (no torch).

The store holds renderer-test / segmenter-test / histology-encoder (tests/fixtures/scoring_models.py) and
mask-refiner (tests/fixtures/service_models.py); their manifests get the provenance config the trainers
record, so the held-back split is recomputed exactly as for the shipped models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from services.core.model_store import ModelStore
from tests.fixtures.scoring_models import write_scoring_store
from tests.fixtures.service_models import REFINER_NAME, RENDERER_NAME, write_refiner
from training import evaluate
from training.data.shared_layout import load_records, split_records

pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")  # FID of a dozen crops

FIXTURE_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "data"
FRACTIONS = [0.5, 0.0, 0.5]
RENDERER_DATA = {
    "crop": 64,
    "split_fractions": FRACTIONS,
    "split_seed": 0,
    "sources": [
        {"dataset": "monuseg"},  # nucleus (1) -> renderer-test "nucleus" (1)
        {"dataset": "consep", "class_remap": {"2": 1, "3": 1, "4": 2}},  # 5 CoNSeP classes -> 3 test classes
    ],
}
REFINER_DATA = {"datasets": ["glas"], "split_fractions": FRACTIONS, "split_seed": 0, "crop": 64, "stain": "he",
                "open_size": 5, "close_size": 10}
OLD_CARD = "# card\n\nintro\n\n## Scores\n\nnone yet\n\n## Limitations\n\nkept as is\n"


def _set_provenance(store: Path, name: str, data: dict, test_groups: list[str] | None = None) -> None:
    path = store / name / "1" / "manifest.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["provenance"]["config"] = {"name": name, "data": data}
    if test_groups is not None:
        raw["provenance"]["split"] = {"groups": {"test": test_groups}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    (path.parent / "MODEL_CARD.md").write_text(OLD_CARD)


def _test_groups(dataset: str) -> list[str]:
    return sorted({r.group for r in split_records(load_records(FIXTURE_DATA, dataset), tuple(FRACTIONS), 0)["test"]})


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = write_scoring_store(tmp_path / "model_store")
    write_refiner(root)
    _set_provenance(root, RENDERER_NAME, RENDERER_DATA, _test_groups("monuseg") + _test_groups("consep"))
    _set_provenance(root, REFINER_NAME, REFINER_DATA, _test_groups("glas"))
    return root


def test_cli_evaluates_and_updates_the_store(store: Path, tmp_path: Path) -> None:
    model_bytes = {name: (store / name / "1" / "model.onnx").read_bytes() for name in (RENDERER_NAME, REFINER_NAME)}
    results_dir = tmp_path / "results"
    argv = ["--model", RENDERER_NAME, "--model", REFINER_NAME, "--store", str(store), "--data-root",
            str(FIXTURE_DATA), "--results-dir", str(results_dir), "--max-images", "12"]
    assert evaluate.main(argv) == 0

    rendered = json.loads((results_dir / f"{RENDERER_NAME}.json").read_text())
    assert rendered["data"]["crops"] == 12 and rendered["data"]["crop"] == 64
    assert rendered["data"]["split"]["test_groups"] == sorted(_test_groups("monuseg") + _test_groups("consep"))
    assert rendered["encoder"]["name"] == "histology-encoder" and len(rendered["encoder"]["sha256"]) == 64
    assert rendered["segmenter"]["name"] == "segmenter-test"
    for key in ("synthetic_vs_real", "synthetic_half_vs_real_half", "real_half_vs_real_half"):
        scores = rendered["scores"][key]
        assert math.isfinite(scores["fid"]) and scores["fid"] >= 0
        assert math.isfinite(scores["kid_mean"]) and scores["kid_std"] >= 0
        assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
    assert rendered["scores"]["synthetic_vs_real"]["real_count"] == 12
    assert rendered["scores"]["real_half_vs_real_half"]["real_count"] == 6
    assert 0 <= rendered["consistency"]["synthetic_mean_miou"] <= 1
    assert 0 <= rendered["consistency"]["real_mean_miou"] <= 1

    refined = json.loads((results_dir / f"{REFINER_NAME}.json").read_text())
    for key in ("refined_vs_real_fine", "coarse_vs_real_fine"):
        shape = refined["scores"][key]
        assert 0 <= shape["mean_ks"] <= 1 and 0 <= shape["mean_js"] <= 1 and shape["real_objects"] > 0
        assert shape["compared_classes"] == [1] and shape["include_border_objects"] is True

    reloaded = ModelStore(store)
    for name in (RENDERER_NAME, REFINER_NAME):
        manifest = reloaded.get(name)
        reloaded.verify_checksum(manifest)  # model.onnx untouched, manifest still valid
        assert (store / name / "1" / "model.onnx").read_bytes() == model_bytes[name]
        card = (store / name / "1" / "MODEL_CARD.md").read_text()
        assert "none yet" not in card and card.count("## Scores") == 1 and "## Limitations\n\nkept as is" in card
    assert reloaded.get(RENDERER_NAME).metrics["eval_fid"] == pytest.approx(
        rendered["scores"]["synthetic_vs_real"]["fid"], rel=1e-3)
    assert {"eval_mean_ks_refined", "eval_mean_js_refined"} <= set(reloaded.get(REFINER_NAME).metrics)


def test_crops_are_reproducible_and_paired(store: Path) -> None:
    manifest = ModelStore(store).get(RENDERER_NAME)
    held = evaluate.held_back(manifest, FIXTURE_DATA)
    first = evaluate.sample_crops(held, 6, seed=3, class_map_of=lambda source, sample: source.class_map(sample))
    again = evaluate.sample_crops(held, 6, seed=3, class_map_of=lambda source, sample: source.class_map(sample))
    assert first.origins == again.origins and np.array_equal(first.images, again.images)
    assert first.images.shape == (6, 64, 64, 3) and first.class_maps.max() <= 2
    assert first.instances is not None and first.instances.shape == (6, 64, 64)


def test_recorded_split_mismatch_is_an_error(store: Path) -> None:
    _set_provenance(store, RENDERER_NAME, RENDERER_DATA, ["monuseg:not-a-patient"])
    with pytest.raises(ValueError, match="differ from the recorded"):
        evaluate.held_back(ModelStore(store).get(RENDERER_NAME), FIXTURE_DATA)


def test_held_back_split_follows_each_sources_fractions_and_benchmark_groups(store: Path) -> None:
    # renderer-he-nuclei v2's recipe: per-source fractions with no test share, benchmark tiles forced out of training.
    data = {**RENDERER_DATA, "sources": [
        {"dataset": "monuseg", "held_back": "benchmark", "split_fractions": [0.9, 0.1, 0.0]},
        {"dataset": "consep", "class_remap": {"2": 1, "3": 1, "4": 2}, "held_back": ["consep:does-not-exist"],
         "split_fractions": [0.9, 0.1, 0.0]}]}
    _set_provenance(store, RENDERER_NAME, data, ["monuseg:TCGA-NH-A8F7"])
    held = evaluate.held_back(ModelStore(store).get(RENDERER_NAME), FIXTURE_DATA)
    assert held.groups == ["monuseg:TCGA-NH-A8F7"]  # the fixture's only benchmark patient; consep has no test tile
    assert held.records[1] == ()
    # The report and card name the fractions each source was split by, not the unused shared ones.
    assert held.split_description() == {"monuseg": [0.9, 0.1, 0.0], "consep": [0.9, 0.1, 0.0]}
    shared = evaluate.held_back(ModelStore(store).get(REFINER_NAME), FIXTURE_DATA)
    assert shared.split_description() == list(FRACTIONS)


def test_scores_section_replaces_only_its_section() -> None:
    card = evaluate.replace_scores_section(OLD_CARD, "## Scores\n\nnew\n")
    assert card == "# card\n\nintro\n\n## Scores\n\nnew\n\n## Limitations\n\nkept as is\n"
    assert evaluate.replace_scores_section("# card\n", "## Scores\n\nnew\n") == "# card\n\n## Scores\n\nnew\n"
