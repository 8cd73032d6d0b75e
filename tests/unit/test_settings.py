"""Settings: read once, fail at start on a missing or unsafe value."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.app import create_app
from chatq.errors import ConfigError
from chatq.settings import load


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"CHATQ_HOME": str(tmp_path), **values}


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("CHATQ_PORT", "eighty", "CHATQ_PORT"),
        ("CHATQ_QUEUE_MAX", "0", "CHATQ_QUEUE_MAX"),
        ("INFERENCE_ENGINE", "magic", "INFERENCE_ENGINE"),
        ("CHATQ_DEV", "maybe", "CHATQ_DEV"),
        ("CHATQ_API_KEYS", "short", "20 characters"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, name: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(env(tmp_path, **{name: value}))


def test_heartbeat_must_be_shorter_than_the_watchdog(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAM_HEARTBEAT_S"):
        load(env(tmp_path, STREAM_WATCHDOG_S="1", STREAM_HEARTBEAT_S="2"))


def test_the_api_refuses_to_start_without_keys_outside_development_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no API keys"):
        create_app(load(env(tmp_path)))
    create_app(load(env(tmp_path, CHATQ_DEV="1")))  # explicitly asked for: allowed


def test_keys_come_from_the_keys_file_too(tmp_path: Path) -> None:
    (tmp_path / "api_keys").write_text("cq-from-file-0123456789abcdef\n")
    settings = load(env(tmp_path, CHATQ_API_KEYS="cq-from-env-0123456789abcdef"))
    assert settings.api_keys == {"cq-from-file-0123456789abcdef", "cq-from-env-0123456789abcdef"}


def test_defaults_are_the_embedded_single_machine_setup(tmp_path: Path) -> None:
    settings = load(env(tmp_path))
    assert settings.engine == "vllm"  # the synthetic engine is never the default
    assert settings.models == ("SmolLM2-135M-Instruct",)
    assert settings.dev_mode is False
    assert settings.host == "127.0.0.1"
