"""Sink names a remote client sends: what sink_path accepts and how it refuses the rest (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import InvalidInputError
from services.generation.sink import MAX_SINK_COMPONENT_BYTES, sink_path


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("run\n1", "control characters"),
        ("run\r1", "control characters"),
        ("run\t1", "control characters"),
        (".", "'.' path component"),
        ("./", "'.' path component"),
        ("file://", "names no directory"),
        ("file:///", "names no directory"),
        ("a/./b", "'.' path component"),
        ("a/../a", "'..' path component"),
        ("..", "'..' path component"),
        ("x" * 300, f"longer than {MAX_SINK_COMPONENT_BYTES} bytes"),
        ("a/" * 600, "more than the limit"),
        ("file://otherhost/x", "only local paths"),
    ],
)
def test_bad_sink_names_are_refused(tmp_path: Path, uri: str, problem: str) -> None:
    with pytest.raises(InvalidInputError, match="sink_uri") as caught:
        sink_path(uri, tmp_path)
    assert problem in caught.value.message
    assert len(caught.value.message) < 400  # a huge name is never echoed whole


@pytest.mark.parametrize("uri", ["run-1", "runs/2026/run-1", "file:///{root}/run-1", "{root}/run-1"])
def test_good_sink_names_stay_below_the_root(tmp_path: Path, uri: str) -> None:
    resolved = sink_path(uri.format(root=tmp_path), tmp_path)
    assert resolved.is_relative_to(tmp_path.resolve()) and resolved.name == "run-1"
