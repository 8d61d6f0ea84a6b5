"""Model store discovery: --model-store, else HISTOSYNTH_MODEL_STORE, else ./model_store, else the per-user dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.store_location import ModelStoreNotFoundError, default_store_paths, locate_model_store


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A working directory and a HOME, both without a store; tests create what they need."""
    paths = {"cwd": tmp_path / "work", "home": tmp_path / "home", "flag": tmp_path / "flag", "env": tmp_path / "env"}
    for path in paths.values():
        path.mkdir()
    return paths


def test_flag_wins_over_variable_and_defaults(places: dict[str, Path]) -> None:
    (places["cwd"] / "model_store").mkdir()
    environ = {"HISTOSYNTH_MODEL_STORE": str(places["env"]), "HOME": str(places["home"])}
    assert locate_model_store(places["flag"], environ, places["cwd"]) == places["flag"]
    assert locate_model_store(None, environ, places["cwd"]) == places["env"]
    assert locate_model_store("", {"HOME": str(places["home"])}, places["cwd"]) == places["cwd"] / "model_store"


def test_per_user_default_after_working_directory(places: dict[str, Path]) -> None:
    environ = {"HOME": str(places["home"])}
    user_store = places["home"] / ".local" / "share" / "histosynth" / "model_store"
    assert default_store_paths(places["cwd"], environ) == (places["cwd"] / "model_store", user_store)
    user_store.mkdir(parents=True)
    assert locate_model_store(None, environ, places["cwd"]) == user_store
    xdg = places["home"] / "xdg"
    assert default_store_paths(places["cwd"], {**environ, "XDG_DATA_HOME": str(xdg)})[1] == (
        xdg / "histosynth" / "model_store")


def test_nothing_found_names_flag_variable_and_every_path(places: dict[str, Path]) -> None:
    with pytest.raises(ModelStoreNotFoundError) as raised:
        locate_model_store(None, {"HOME": str(places["home"])}, places["cwd"])
    message = str(raised.value)
    assert "\n" not in message
    assert "--model-store" in message and "HISTOSYNTH_MODEL_STORE" in message
    for path in default_store_paths(places["cwd"], {"HOME": str(places["home"])}):
        assert str(path) in message


@pytest.mark.parametrize("source", ["flag", "env"])
def test_explicit_choice_never_falls_back(places: dict[str, Path], source: str) -> None:
    """A typo in --model-store / the variable must not silently serve ./model_store instead."""
    (places["cwd"] / "model_store").mkdir()
    wrong = places["home"] / "typo"
    flag, environ = (wrong, {}) if source == "flag" else (None, {"HISTOSYNTH_MODEL_STORE": str(wrong)})
    with pytest.raises(ModelStoreNotFoundError, match=r"typo .*does not exist.*--model-store.*HISTOSYNTH_MODEL_STORE"):
        locate_model_store(flag, {**environ, "HOME": str(places["home"])}, places["cwd"])
    a_file = places["home"] / "file"
    a_file.write_text("")
    with pytest.raises(ModelStoreNotFoundError, match="is not a directory"):
        locate_model_store(a_file, {"HOME": str(places["home"])}, places["cwd"])
