"""The manifest's split record (training/export/__main__.py::split_record)."""

from __future__ import annotations

from training.data.benchmark_split import BENCHMARK_HELD_BACK
from training.export.__main__ import split_record


def test_split_record_keeps_the_groups_per_split_beside_each_sources_held_back_tiles() -> None:
    # Regression: a walrus in the held-back comprehension once rebound `groups`, so the manifest recorded
    # the last source's held-back list in place of {train, val, test} and the downstream benchmark crashed.
    groups = {"train": ["monuseg:a", "consep:b"], "val": ["monuseg:c"], "test": []}
    data = {"split_fractions": [0.8, 0.1, 0.1],
            "sources": [{"dataset": "consep", "held_back": "benchmark"},
                        {"dataset": "monuseg", "held_back": "benchmark", "split_fractions": [0.9, 0.1, 0.0]}]}
    record = split_record(data, 0, groups)
    assert record["groups"] == groups
    assert record["held_back"] == {name: list(BENCHMARK_HELD_BACK[name]) for name in ("consep", "monuseg")}
    assert record["fractions"] == {"consep": [0.8, 0.1, 0.1], "monuseg": [0.9, 0.1, 0.0]}


def test_split_record_without_sources_uses_the_shared_fractions() -> None:
    record = split_record({"split_fractions": [0.8, 0.1, 0.1], "datasets": ["consep"]}, 3, {"train": ["x"]})
    assert record == {"fractions": [0.8, 0.1, 0.1], "seed": 3, "unit": "patient where recorded, else source tile",
                      "held_back": {}, "groups": {"train": ["x"]}}
