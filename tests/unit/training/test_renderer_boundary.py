"""The boundary-consistency lever (issue #17): the `nuclei_boundary` segmenter scheme, the renderer's boundary target
and loss, `train.consistency` as a list of terms, and the renderer-he-nuclei-boundary recipe run for real on the
fixture data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.core import mask_ops  # noqa: E402
from tests.unit.training.test_training_pipeline import FIXTURE_DATA, tiny_config  # noqa: E402
from training.data.augment import paired_augment  # noqa: E402
from training.data.datasets import MaskToImageDataset, _item_rng  # noqa: E402
from training.data.instance_targets import BOUNDARY, INTERIOR, three_class_target  # noqa: E402
from training.data.scoring_data import (  # noqa: E402
    SegmenterBatchSampler, load_scheme_records, segmentation_scheme)
from training.data.shared_layout import load_records, load_sample  # noqa: E402
from training.losses import boundary_consistency_loss, nucleus_area_loss  # noqa: E402
from training.train import load_config  # noqa: E402
from training.trainers import get_trainer  # noqa: E402
from training.trainers.pix2pixhd_trainer import boundary_target  # noqa: E402
from tests.unit.training.renderer_recipes import train_fixture_segmenter, train_tiny_renderer  # noqa: E402

pytestmark = pytest.mark.torch
CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs"

# two touching 3 x 3 nuclei (ids 1, 2) and a lone pixel nucleus (3) in a 5 x 8 tile
TOUCHING = np.array([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 1, 1, 1, 2, 2, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 3],
], np.uint16)
TOUCHING_TARGET = np.array([  # inner rims; the touching columns 3 and 4 are boundary on both sides
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 2, 2, 2, 2, 2, 2, 0],
    [0, 2, 1, 2, 2, 1, 2, 0],
    [0, 2, 2, 2, 2, 2, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 2],
], np.uint8)


# ----------------------------------------------------------------------------------------------- targets
def test_three_class_target_marks_the_inner_rim_of_each_instance() -> None:
    np.testing.assert_array_equal(three_class_target(TOUCHING), TOUCHING_TARGET)


def test_nuclei_boundary_scheme_target_is_three_class_target_of_the_fixture_instance_maps() -> None:
    scheme = segmentation_scheme("nuclei_boundary")
    assert scheme.class_names == ("background", "interior", "boundary") and not scheme.partial_foreground
    records = load_scheme_records(FIXTURE_DATA, scheme)
    assert {r.dataset for r in records} == {"consep", "monuseg"}
    for record in records:
        sample = load_sample(record)
        target = scheme.derive(record.dataset, sample)
        np.testing.assert_array_equal(target, three_class_target(sample.instances))
        assert set(np.unique(target)) == {0, INTERIOR, BOUNDARY}, record.image_path

    _, targets, partial = SegmenterBatchSampler(records, scheme, batch_size=4, crop=64, seed=0).batch(0)
    assert targets.shape == (4, 64, 64) and set(np.unique(targets)) <= {0, 1, 2} and not partial.any()


def test_boundary_target_from_the_edge_channel_is_three_class_target() -> None:
    class_map = np.where(TOUCHING > 0, 5, 0).astype(np.uint8)  # untyped nuclei: renderer class 5
    label = mask_ops.build_generator_input(class_map, 6, None, mask_ops.instance_edges(TOUCHING))
    label_t = torch.from_numpy(label)[None]
    target = boundary_target(label_t[:, :6].argmax(1), label_t[:, -1])
    np.testing.assert_array_equal(target[0].numpy(), TOUCHING_TARGET)


@pytest.mark.parametrize("dataset", ["consep", "monuseg"])
def test_boundary_target_of_renderer_items_equals_three_class_target_of_the_crop(dataset: str) -> None:
    """What the trainer sees: the dataset's item (crop, flip, rot90, class remap, noise, edges) gives the same
    target as three_class_target of the identically augmented instance map."""
    records = load_records(FIXTURE_DATA, dataset)
    remap = {1: 5} if dataset == "monuseg" else {}
    items = MaskToImageDataset(records, crop=64, num_classes=6, class_remap=remap, noise_spacing=15.0,
                               use_edges=True, seed=3, length=2 * len(records))
    for index in range(len(items)):
        label = items[index]["label"][None]
        target = boundary_target(label[:, :6].argmax(1), label[:, -1])[0].numpy()
        sample = load_sample(records[index % len(records)])
        rng, _ = _item_rng(3, 0, index)
        *_, instances = paired_augment([sample.image, sample.class_map, sample.instances], 64, rng)
        np.testing.assert_array_equal(target, three_class_target(instances))


# ----------------------------------------------------------------------------------------------- loss
def test_boundary_loss_is_the_boundary_weighted_mean_cross_entropy() -> None:
    # 3 pixels with class probabilities p; targets background, interior, boundary
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.4, 0.4]])
    logits = torch.log(p).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[0, 1, 2]]])
    expected = (-math.log(0.7) - math.log(0.6) - 2 * math.log(0.4)) / (1 + 1 + 2)
    assert math.isclose(boundary_consistency_loss(logits, target).item(), expected, rel_tol=1e-6)
    plain = (-math.log(0.7) - math.log(0.6) - math.log(0.4)) / 3
    assert math.isclose(boundary_consistency_loss(logits, target, boundary_weight=1.0).item(), plain, rel_tol=1e-6)
    with pytest.raises(ValueError, match="3-class"):
        boundary_consistency_loss(torch.zeros(1, 5, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))


def test_boundary_loss_gradient_raises_the_boundary_logit_on_boundary_pixels() -> None:
    logits = torch.zeros(1, 3, 1, 2, requires_grad=True)
    boundary_consistency_loss(logits, torch.tensor([[[1, 2]]])).backward()
    grad = logits.grad[0, :, 0]
    assert grad[1, 0] < 0 and grad[2, 1] < 0, "raising the target logit lowers the loss"
    assert abs(grad[2, 1]) > abs(grad[1, 0]), "a boundary pixel pulls twice as hard"


# ----------------------------------------------------------------------------------------------- configs
def test_boundary_config_is_v3_plus_a_boundary_term() -> None:
    v3 = load_config(CONFIGS / "renderer-he-nuclei-v3.yaml")
    candidate = load_config(CONFIGS / "renderer-he-nuclei-boundary.yaml")
    assert candidate["data"] == v3["data"] and candidate["generator"] == v3["generator"]
    assert candidate["train"]["init_from"] == "renderer-he-nuclei-v3"
    assert candidate["train"]["lr"] == 1.0e-4 and candidate["train"]["steps"] == 30000
    type_term, boundary_term = candidate["train"]["consistency"]
    assert {k: v for k, v in type_term.items() if k != "kind"} == v3["train"]["consistency"]
    assert boundary_term["kind"] == "boundary" and boundary_term["segmenter_run"] == "segmenter-he-nuclei-boundary"
    assert boundary_term["boundary_weight"] == 2.0 and boundary_term["weight"] > 0
    assert not any("(v3)" in section for section in candidate["export"]["card"].get("extra_sections", {}))
    segmenter = load_config(CONFIGS / "segmenter-he-nuclei-boundary.yaml")
    consistency = load_config(CONFIGS / "segmenter-he-nuclei-consistency.yaml")
    assert segmenter["data"]["scheme"] == "nuclei_boundary" and segmenter["data"]["held_back"] == "benchmark"
    assert {k: v for k, v in segmenter["data"].items() if k != "scheme"} == \
        {k: v for k, v in consistency["data"].items() if k != "scheme"}



def test_v6_is_the_boundary_recipe_from_the_shipped_v3_weights() -> None:
    """v6 repeats v5's recipe from model_store (its run cache gone); its ship rule is in its header, before training."""
    boundary = load_config(CONFIGS / "renderer-he-nuclei-boundary.yaml")
    v6 = load_config(CONFIGS / "renderer-he-nuclei-v6.yaml")
    assert "init_from" not in v6["train"], "never a cached run: always the shipped weights"
    assert v6["train"]["init_from_store"] == {"model": "renderer-he-nuclei", "version": 3,
                                              "discriminator_warmup_steps": 500}
    assert v6["train"]["consistency"] == boundary["train"]["consistency"]
    assert {k: v for k, v in v6.items() if k != "train"} == {k: v for k, v in boundary.items() if k != "train"}
    assert_ship_rule_stated("v6")


def assert_ship_rule_stated(version: str) -> None:
    """A candidate's config states its ship rule in the header, committed before it is trained."""
    header = (CONFIGS / f"renderer-he-nuclei-{version}.yaml").read_text().split("extends:")[0]
    assert f"Ship rule for {version}" in header and "nothing ships" in header

def test_consistency_list_builds_both_terms_and_the_mapping_form_still_builds_one(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    train_fixture_segmenter(runs, "segmenter-he-nuclei-consistency")
    train_fixture_segmenter(runs, "segmenter-he-nuclei-boundary")
    trainer_class = get_trainer("pix2pixhd")

    config = tiny_config("renderer-he-nuclei-boundary")
    trainer = trainer_class(config, runs / "candidate", FIXTURE_DATA)
    type_term, boundary_term = trainer.consistency
    assert (type_term.kind, type_term.weight) == ("type", 5.0)
    assert type_term.options["allowed"] == config["train"]["consistency"][0]["allowed_classes"]
    assert boundary_term.kind == "boundary" and boundary_term.options == {"boundary_weight": 2.0}
    assert boundary_term.weight == config["train"]["consistency"][1]["weight"]
    assert boundary_term.segmenter.config.num_classes == 3
    assert not any(p.requires_grad for term in trainer.consistency for p in term.segmenter.parameters())

    v3 = tiny_config("renderer-he-nuclei-v3")
    (term,) = trainer_class(v3, runs / "v3", FIXTURE_DATA).consistency
    assert term.kind == "type" and term.weight == 5.0

    # a boundary term on the type segmenter, or two terms of one kind, are refused
    wrong = tiny_config("renderer-he-nuclei-boundary")
    wrong["train"]["consistency"][1]["segmenter_run"] = "segmenter-he-nuclei-consistency"
    with pytest.raises(ValueError, match="nuclei_boundary"):
        trainer_class(wrong, runs / "wrong", FIXTURE_DATA)
    twice = tiny_config("renderer-he-nuclei-boundary")
    twice["train"]["consistency"][1] = dict(twice["train"]["consistency"][0])
    with pytest.raises(ValueError, match="one term per kind"):
        trainer_class(twice, runs / "twice", FIXTURE_DATA)

    # a segmenter run that has not finished its schedule is refused (it would freeze a half-trained loss)
    checkpoint = runs / "segmenter-he-nuclei-boundary" / "latest.pt"
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    payload["step"] = payload["total_steps"] - 1
    torch.save(payload, checkpoint)
    with pytest.raises(RuntimeError, match="let that run finish"):
        trainer_class(config, runs / "early", FIXTURE_DATA)


def test_boundary_recipe_warm_starts_and_trains_two_steps_with_both_terms(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    train_fixture_segmenter(runs, "segmenter-he-nuclei-consistency")
    train_fixture_segmenter(runs, "segmenter-he-nuclei-boundary")
    # the run the candidate starts from (a tiny renderer under v3's run name)
    train_tiny_renderer(tmp_path, "renderer-he-nuclei", runs, "renderer-he-nuclei-v3")
    records = train_tiny_renderer(tmp_path, "renderer-he-nuclei-boundary", runs, "renderer-he-nuclei-boundary")
    assert {"event": "warm_started", "from": str(runs / "renderer-he-nuclei-v3" / "latest.pt")} in records
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["g_seg"]) and math.isfinite(r["g_boundary"]) and r["g_boundary"] > 0 for r in steps)
    out = runs / "renderer-he-nuclei-boundary"
    assert torch.load(out / "latest.pt", map_location="cpu", weights_only=False)["step"] == 2


def test_nucleus_area_loss_is_the_relative_area_error_and_grows_drawn_nuclei() -> None:
    class_map = torch.zeros(1, 16, 16, dtype=torch.long)
    class_map[0, 4:12, 4:12] = 5  # 64 nucleus pixels
    exact = torch.full((1, 3, 16, 16), -20.0)
    exact[:, 0] = 20.0
    exact[0, 1, 4:12, 4:12], exact[0, 0, 4:12, 4:12] = 20.0, -20.0  # the segmenter sees exactly the mask
    assert nucleus_area_loss(exact, class_map).item() == pytest.approx(0.0, abs=1e-6)
    half = exact.clone()
    half[0, 1, 4:12, 8:12], half[0, 0, 4:12, 8:12] = -20.0, 20.0  # half the nucleus drawn
    assert nucleus_area_loss(half, class_map).item() == pytest.approx(32 / (64 + 64), abs=1e-4)
    logits = torch.zeros(1, 3, 16, 16, requires_grad=True)  # sees 2/3 nucleus everywhere: far too much area
    nucleus_area_loss(logits, class_map).backward()
    assert (logits.grad[0, 0] < 0).all()  # descending the loss raises "background" everywhere


def test_v7_is_v6_plus_a_size_term_with_its_rule_stated() -> None:
    v6 = load_config(CONFIGS / "renderer-he-nuclei-v6.yaml")
    v7 = load_config(CONFIGS / "renderer-he-nuclei-v7.yaml")
    assert v7["train"]["consistency"][:2] == v6["train"]["consistency"]
    assert v7["train"]["consistency"][2] == {"kind": "size", "segmenter_run": "segmenter-he-nuclei-boundary",
                                             "weight": 2.0}
    assert {k: v for k, v in v7["train"].items() if k != "consistency"} == {
        k: v for k, v in v6["train"].items() if k != "consistency"}
    assert_ship_rule_stated("v7")


def test_size_term_builds_on_a_nuclei_segmenter_and_trains(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    train_fixture_segmenter(runs, "segmenter-he-nuclei-consistency")
    train_fixture_segmenter(runs, "segmenter-he-nuclei-boundary")
    config = tiny_config("renderer-he-nuclei-v7")
    config["train"].pop("init_from_store")  # a random tiny G: this test is about the terms, not the warm start
    trainer = get_trainer("pix2pixhd")(config, runs / "v7", FIXTURE_DATA)
    assert [term.kind for term in trainer.consistency] == ["type", "boundary", "size"]
    _, boundary, size = trainer.consistency
    assert boundary.segmenter is size.segmenter  # one run, one frozen segmenter
    forwards: list[int] = []
    boundary.segmenter.register_forward_hook(lambda *_: forwards.append(1))
    batch = next(trainer._loader(trainer.train_set))
    losses = trainer.train_step(batch)
    assert math.isfinite(losses["g_size"]) and losses["g_size"] >= 0
    assert math.isfinite(losses["g_boundary"]) and len(forwards) == 1  # run once for both terms

