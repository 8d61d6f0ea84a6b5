"""ServerConfig: defaults, HISTOSYNTH_* parsing, overrides, and errors that name the variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.core.config import ConfigError, ServerConfig, describe_settings, load_settings, setting


def test_defaults_bind_loopback_only() -> None:
    config = ServerConfig.from_env(environ={})
    assert config == ServerConfig()
    assert config.host == "127.0.0.1"
    assert config.devices == ("cpu",)
    assert config.log_format == "json"


def test_reads_every_variable() -> None:
    environ = {
        "HISTOSYNTH_MODEL_STORE": "/srv/models",
        "HISTOSYNTH_DEVICES": "cuda:0, cuda:1,cpu",
        "HISTOSYNTH_INSTANCES_PER_DEVICE": "2",
        "HISTOSYNTH_MAX_BATCH_SIZE": "16",
        "HISTOSYNTH_MAX_QUEUE_DELAY_MS": "2.5",
        "HISTOSYNTH_MAX_QUEUE_SIZE": "64",
        "HISTOSYNTH_HOST": "0.0.0.0",
        "HISTOSYNTH_PORT": "6000",
        "HISTOSYNTH_METRICS_PORT": "off",
        "HISTOSYNTH_MAX_MESSAGE_BYTES": "1048576",
        "HISTOSYNTH_INTRA_OP_THREADS": "2",
        "HISTOSYNTH_DRAIN_GRACE_S": "30",
        "HISTOSYNTH_LOG_LEVEL": "debug",
        "HISTOSYNTH_LOG_FORMAT": "TEXT",
        "UNRELATED": "ignored",
    }
    config = ServerConfig.from_env(environ=environ)
    assert config == ServerConfig(
        model_store=Path("/srv/models"),
        devices=("cuda:0", "cuda:1", "cpu"),
        instances_per_device=2,
        max_batch_size=16,
        max_queue_delay_ms=2.5,
        max_queue_size=64,
        host="0.0.0.0",
        port=6000,
        metrics_port=None,
        max_message_bytes=1048576,
        intra_op_threads=2,
        drain_grace_s=30.0,
        log_level="DEBUG",
        log_format="text",
    )
    assert config.runtime_options().intra_op_threads == 2


def test_overrides_win_and_may_be_typed_or_text() -> None:
    config = ServerConfig.from_env(
        environ={"HISTOSYNTH_PORT": "6000", "HISTOSYNTH_MAX_BATCH_SIZE": "16"},
        overrides={"port": 0, "max_batch_size": "4", "devices": ["cpu"]},
    )
    assert (config.port, config.max_batch_size, config.devices) == (0, 4, ("cpu",))


def test_custom_prefix() -> None:
    assert ServerConfig.from_env(prefix="RENDER_", environ={"RENDER_PORT": "7000"}).port == 7000


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("HISTOSYNTH_PORT", "http", "expected an integer"),
        ("HISTOSYNTH_PORT", "70000", "must be a TCP port"),
        ("HISTOSYNTH_METRICS_PORT", "-2", "must be a TCP port"),
        ("HISTOSYNTH_MAX_BATCH_SIZE", "0", "must be >= 1"),
        ("HISTOSYNTH_MAX_QUEUE_DELAY_MS", "soon", "expected a number"),
        ("HISTOSYNTH_DRAIN_GRACE_S", "-2", "must be >= 0.0"),
        ("HISTOSYNTH_DEVICES", "cuda:0,gpu1", "unknown device 'gpu1'"),
        ("HISTOSYNTH_DEVICES", "cpu,cpu", "lists a device twice"),
        ("HISTOSYNTH_DEVICES", " , ", "needs at least one device"),
        ("HISTOSYNTH_LOG_LEVEL", "loud", "expected one of DEBUG, INFO"),
        ("HISTOSYNTH_LOG_FORMAT", "xml", "expected one of json, text"),
        ("HISTOSYNTH_HOST", "  ", "must not be empty"),
    ],
)
def test_bad_value_names_variable_and_value(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ServerConfig.from_env(environ={variable: value})
    message = str(raised.value)
    assert message.startswith(f"{variable}={value!r}")
    assert problem in message


def test_unknown_override_lists_valid_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['prot'\]; valid: \['model_store'"):
        ServerConfig.from_env(environ={}, overrides={"prot": 1})


def test_bad_typed_override_names_it() -> None:
    with pytest.raises(ConfigError, match=r"override port=True: expected an integer"):
        ServerConfig.from_env(environ={}, overrides={"port": True})


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"max_queue_size=0: must be >= 1"):
        ServerConfig(max_queue_size=0)


def test_every_field_is_documented() -> None:
    rows = describe_settings(ServerConfig)
    assert [variable for variable, _, _ in rows][:2] == ["HISTOSYNTH_MODEL_STORE", "HISTOSYNTH_DEVICES"]
    assert all(doc for _, _, doc in rows)
    assert ("HISTOSYNTH_DEVICES", "cpu", rows[1][2]) == rows[1]


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """A service's own settings reuse the same loader."""

    tile_overlap: int = setting(32, "Pixels of overlap between tiles.", lambda value: None if value >= 0 else "must be >= 0")
    stain: str = setting("he", "Stain to render.")
    use_noise: bool = setting(True, "Add the noise channel.")


def test_load_settings_works_for_service_settings() -> None:
    settings = load_settings(
        RenderSettings, environ={"HISTOSYNTH_TILE_OVERLAP": "16", "HISTOSYNTH_USE_NOISE": "no"}
    )
    assert settings == RenderSettings(tile_overlap=16, stain="he", use_noise=False)
    with pytest.raises(ConfigError, match=r"HISTOSYNTH_TILE_OVERLAP='-1': must be >= 0"):
        load_settings(RenderSettings, environ={"HISTOSYNTH_TILE_OVERLAP": "-1"})
    with pytest.raises(ConfigError, match=r"HISTOSYNTH_USE_NOISE='maybe': expected a boolean"):
        load_settings(RenderSettings, environ={"HISTOSYNTH_USE_NOISE": "maybe"})
