"""compose.yaml, the Dockerfile and .env.sample against the code they run.

No Docker engine runs here: what these check is that every name the files hold (modules,
settings, ports, variables, mounted files, locked packages) is one the code and the repo
have, so a rename on either side fails a test instead of a deployment.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import permissions
from chatq.settings import load
from stack.healthcheck import CHECKS
from stack.process_table import PORT_SETTINGS, PROCESS_TABLE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
SERVICES: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE_TEXT)["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_sample() -> dict[str, str]:
    """.env.sample's settings, as compose reads a .env file."""
    lines = (ROOT / ".env.sample").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` with its ${...} replaced as compose would, given `env`."""

    def one(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        given = env.get(name)
        if kind in (":-", ":?"):
            return given or (default if kind == ":-" else "")
        return given if given is not None else (default or "")

    return VARIABLE.sub(one, value)


def chatq_services() -> dict[str, dict[str, Any]]:
    """The services that run chatq's own image."""
    return {name: s for name, s in SERVICES.items() if s["image"].startswith("chatq:")}


def module_of(service: dict[str, Any]) -> str:
    command = service["command"]
    assert command[:2] == ["python", "-m"] and len(command) == 3, command
    return str(command[2])


class _Recorder(Mapping[str, str]):
    """An empty environment that remembers every name asked of it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _packages() -> list[Path]:
    """chatq's packages, as pyproject.toml lists them for the wheel."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return [ROOT / pattern.rstrip("*") for pattern in found["include"]]


def _literal_reads(tree: ast.AST) -> Iterator[str]:
    """The names read as os.environ.get("X"), os.environ["X"] or os.getenv("X")."""

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for node in ast.walk(tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if (node.func.attr == "get" and is_environ(node.func.value)) or node.func.attr == "getenv":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and is_environ(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            yield key.value


def names_chatq_reads(home: Path) -> set[str]:
    """Every variable chatq.settings.load asks for (recorded as it reads an empty
    environment, so names it builds, like RATE_LIMIT_<ROLE>_RPM, count), and the few its
    packages read straight from os.environ (LOG_LEVEL in chatq/logs.py)."""
    recorder = _Recorder({"CHATQ_HOME": str(home)})
    load(recorder)
    direct = {
        name
        for package in _packages()
        for path in package.rglob("*.py")
        for name in _literal_reads(ast.parse(path.read_text(), str(path)))
    }
    return recorder.asked | direct


def test_names_chatq_reads_are_found_both_ways(tmp_path: Path) -> None:
    """The finder itself: a name load() builds and a name only logs.py reads."""
    names = names_chatq_reads(tmp_path)
    assert {"RATE_LIMIT_ADMIN_TPM", "VLLM_TOOL_CALL_PARSER", "LOG_LEVEL", "CHATQ_WEB_DIST"} <= names
    assert "NOT_A_CHATQ_SETTING" not in names


def test_every_service_restarts_and_has_a_health_check() -> None:
    for name, service in SERVICES.items():
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name}: no health check"


def test_every_image_is_pinned_to_a_version() -> None:
    env = env_sample()
    for name, service in SERVICES.items():
        image = interpolate(service["image"], env)
        repo, _, tag = image.rpartition(":")
        assert repo and re.match(r"v?\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"
    postgres = SERVICES["postgres"]["image"].split(":")[1]
    assert int(postgres.split(".")[0]) >= 16
    for base in re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE):
        assert re.search(r":\d+\.\d+\.\d+", base), f"Dockerfile: {base} is not pinned"


def test_every_chatq_service_runs_a_module_that_exists() -> None:
    for name, service in chatq_services().items():
        module = module_of(service)
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{name}: no module {module}"
        if spec.submodule_search_locations is not None:  # a package: python -m runs __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{name}: {module}"


def test_every_chatq_service_checks_itself() -> None:
    for name, service in chatq_services().items():
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "stack.healthcheck", name]
        assert name in CHECKS
    assert f'CMD ["python", "-m", "stack.healthcheck", "{next(iter(CHECKS))}"]' in DOCKERFILE


def test_chatq_services_are_given_only_settings_chatq_reads(tmp_path: Path) -> None:
    reads = names_chatq_reads(tmp_path)
    for name, service in chatq_services().items():
        unknown = set(service["environment"]) - reads
        assert not unknown, f"{name}: chatq reads no {sorted(unknown)}"
    image_env = set(re.findall(r"\b(CHATQ_\w+)=", DOCKERFILE))
    assert image_env and image_env <= reads, image_env - reads


def _port(service: dict[str, Any], tmp_path: Path) -> int | None:
    """The port the service's process listens on: its setting in compose, else the default."""
    spec = next(spec for spec in PROCESS_TABLE if spec.module == module_of(service))
    if spec.port_env is None:
        return None
    given = service["environment"].get(spec.port_env)
    default = getattr(load({"CHATQ_HOME": str(tmp_path)}), PORT_SETTINGS[spec.port_env])
    return int(given) if given else int(default)


def test_ports_are_the_ones_the_processes_listen_on(tmp_path: Path) -> None:
    ports = {name: _port(service, tmp_path) for name, service in chatq_services().items()}
    for name, service in chatq_services().items():
        assert service.get("expose", []) == ([] if ports[name] is None else [str(ports[name])]), name
        assert "ports" not in service or name == "api", f"{name} publishes a host port"
    assert "ports" not in SERVICES["api"], "the API is reached through nginx"
    prometheus = (ROOT / "deploy/prometheus.yml").read_text()
    assert f'"api:{ports["api"]}"' in prometheus and f'"telemetry:{ports["telemetry"]}"' in prometheus
    assert re.search(rf'names: \["inference"\]\s+type: A\s+port: {ports["inference"]}\b', prometheus)
    upstream = (ROOT / "deploy/nginx/upstream.conf").read_text()
    assert re.search(rf"server api:{ports['api']};", upstream)


def test_inference_scales_with_no_fixed_name_or_host_port() -> None:
    inference = SERVICES["inference"]
    assert "container_name" not in inference and "ports" not in inference
    (gpus,) = inference["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"] and gpus["device_ids"]
    # Telemetry reads every GPU through NVML and computes nothing.
    (nvml,) = SERVICES["telemetry"]["deploy"]["resources"]["reservations"]["devices"]
    assert nvml["count"] == "all" and set(nvml["capabilities"]) == {"gpu", "utility"}
    assert not any("container_name" in service for service in SERVICES.values())


def test_env_sample_holds_every_variable_compose_uses_and_no_other() -> None:
    used = {match.group(1) for match in VARIABLE.finditer(COMPOSE_TEXT)}
    assert used == set(env_sample())


def test_no_secret_has_a_default() -> None:
    nats = [f"NATS_{service.upper()}_PASSWORD" for service in permissions.SERVICES]
    for secret in ("JWT_SECRET", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", *nats):
        forms = {m.group(2) for m in VARIABLE.finditer(COMPOSE_TEXT) if m.group(1) == secret}
        assert forms == {":?"}, secret
        assert env_sample()[secret] == ""


def test_every_mounted_file_is_in_the_repo() -> None:
    env = env_sample()
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = interpolate(volume, env).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


@pytest.mark.parametrize(
    "engine", sorted({s["build"]["args"]["ENGINE"] for s in SERVICES.values() if "build" in s})
)
def test_the_image_lock_holds_every_dependency(engine: str) -> None:
    """deploy/requirements/<ENGINE>.txt pins every package pyproject.toml names (run
    scripts/lock-images.sh after changing them)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    if engine != "light":
        wanted += project["optional-dependencies"][engine]
    locked = (ROOT / "deploy/requirements" / f"{engine}.txt").read_text().lower()
    for requirement in wanted:
        package = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert re.search(rf"^{re.escape(package)}==\S+ \\$", locked, re.MULTILINE), f"{engine}: {package}"
    assert "--hash=sha256:" in locked


def test_the_image_installs_only_what_is_locked_and_runs_unprivileged() -> None:
    assert re.search(r"pip install --require-hashes --no-deps -r \S+\$ENGINE\.txt", DOCKERFILE)
    assert "pip install --no-deps --no-build-isolation ." in DOCKERFILE
    assert re.search(r"^USER (?!root\b)\w+", DOCKERFILE, re.MULTILINE)
