"""Settings: read once, fail at start on a missing or unsafe value."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from api.app import create_app
from chatq.env import RANGES
from chatq.errors import ConfigError
from chatq.settings import load
from tests.helpers import run_python

ROOT = Path(__file__).resolve().parent.parent.parent


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
        ("FORWARDED_ALLOW_IPS", "10.0.0.1, proxy.local", "FORWARDED_ALLOW_IPS"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, name: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(env(tmp_path, **{name: value}))


def test_heartbeat_must_be_shorter_than_the_watchdog(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAM_HEARTBEAT_S"):
        load(env(tmp_path, STREAM_WATCHDOG_S="1", STREAM_HEARTBEAT_S="2"))


GOOD_SECRET = "Vf3kQ9zLr2Xw8NcT5bHy1JmP7sDg4AeU"


@pytest.mark.parametrize(
    ("secret", "needle"),
    [
        (None, "JWT_SECRET is not set"),
        ("Vf3kQ9zLr2Xw8NcT", "shorter than 32"),
        ("changeme-changeme-changeme-changeme", "placeholder"),
        ("my-super-secret-jwt-key-for-production", "placeholder"),
        ("a" * 40, "placeholder"),
    ],
)
def test_the_api_refuses_an_unset_short_or_placeholder_jwt_secret(
    tmp_path: Path, secret: str | None, needle: str
) -> None:
    values = {"CHATQ_API_KEYS": "cq-from-env-0123456789abcdef"}
    if secret is not None:
        values["JWT_SECRET"] = secret
    with pytest.raises(ConfigError, match=needle):
        create_app(load(env(tmp_path, **values)))


def test_the_jwt_secret_comes_from_the_state_folder_too(tmp_path: Path) -> None:
    (tmp_path / "jwt_secret").write_text(GOOD_SECRET + "\n")
    settings = load(env(tmp_path, CHATQ_API_KEYS="cq-from-env-0123456789abcdef"))
    assert settings.jwt_secret == GOOD_SECRET
    create_app(settings)


def test_the_api_refuses_to_start_when_nobody_could_sign_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nobody could sign in"):
        create_app(load(env(tmp_path, JWT_SECRET=GOOD_SECRET)))
    create_app(load(env(tmp_path, JWT_SECRET=GOOD_SECRET, DATABASE_URL="postgresql://h/db")))


def test_development_mode_is_only_when_asked_for(tmp_path: Path) -> None:
    assert load(env(tmp_path)).dev_mode is False
    create_app(load(env(tmp_path, DEVELOPMENT_MODE="true")))  # explicitly asked for: allowed
    assert load(env(tmp_path, CHATQ_DEV="1")).dev_mode is True  # the older name still works


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
    assert settings.forwarded_allow_ips == ("127.0.0.1",)  # uvicorn's default: loopback only


def test_trusted_proxies_are_addresses_networks_any_or_none(tmp_path: Path) -> None:
    given = load(env(tmp_path, FORWARDED_ALLOW_IPS="10.0.0.5, 192.168.0.0/16,::1"))
    assert given.forwarded_allow_ips == ("10.0.0.5", "192.168.0.0/16", "::1")
    assert load(env(tmp_path, FORWARDED_ALLOW_IPS="*")).forwarded_allow_ips == ("*",)
    assert load(env(tmp_path, FORWARDED_ALLOW_IPS="")).forwarded_allow_ips == ()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VLLM_GPU_MEMORY_UTILIZATION", "abc", "must be a number from 0.01 to 1, got 'abc'"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "7", "must be a number from 0.01 to 1, got '7'"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "nan", "must be a number from 0.01 to 1, got 'nan'"),
        ("CHATQ_PORT", "70000", "must be a whole number from 1 to 65535, got '70000'"),
        ("CHATQ_QUEUE_MAX", "2.5", "must be a whole number of at least 1, got '2.5'"),
        ("STREAM_WATCHDOG_S", "inf", "must be a number from 0.1 to 3600, got 'inf'"),
        ("RATE_LIMIT_USER_RPM", "-1", "must be a whole number of at least 0, got '-1'"),
    ],
)
def test_a_malformed_number_names_the_setting_and_its_range(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(env(tmp_path, **{name: value}))
    assert str(raised.value) == f"{name} {message}"


def test_every_numeric_setting_has_a_range_and_the_ends_are_accepted(tmp_path: Path) -> None:
    for name, allowed in RANGES.items():
        for end in (allowed.low, allowed.high):
            if end is not None:
                text = str(int(end)) if allowed.whole else str(end)
                load(env(tmp_path, **{name: text, "STREAM_WATCHDOG_S": "3600"}))
    assert load(env(tmp_path, VLLM_GPU_MEMORY_UTILIZATION="0.8")).vllm_gpu_memory_utilization == 0.8


def test_every_numeric_setting_is_in_the_configuration_doc() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", doc))
    assert not {n for n in RANGES if not n.startswith("RATE_LIMIT_")} - documented


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "stack.cli", "status"],
        ["-m", "api"],
        ["-m", "workers.inference"],
        ["-m", "workers.persistence"],
        ["-m", "workers.telemetry"],
    ],
)
def test_a_process_started_with_a_bad_number_prints_one_line(tmp_path: Path, command: list[str]) -> None:
    """What `./start` (stack.cli) and each process say: the setting and its range, no traceback."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CHATQ_", "LOG_"))}
    environ |= {
        "CHATQ_HOME": str(tmp_path),
        "VLLM_GPU_MEMORY_UTILIZATION": "7",
        "DATABASE_URL": "postgresql://h/db",
    }
    done = run_python(*command, env=environ)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and '"exc"' not in output, output
    lines = [line for line in output.splitlines() if "VLLM_GPU_MEMORY_UTILIZATION" in line]
    assert len(lines) == 1, output
    assert "VLLM_GPU_MEMORY_UTILIZATION must be a number from 0.01 to 1, got '7'" in lines[0]
