"""The process table as data: what ./start runs, in which order, and what each row is given."""

from __future__ import annotations

from pathlib import Path

from chatq.settings import load
from stack.process_table import API, PERSISTENCE, PROCESS_TABLE
from stack.supervisor import Supervisor


def supervisor(tmp_path: Path) -> Supervisor:
    sup = Supervisor(load({"CHATQ_HOME": str(tmp_path), "CHATQ_PORT": "8123"}), env={"LOG_LEVEL": "INFO"})
    sup.database_url, sup.redis_url = "postgresql://db", "redis://cache"
    return sup


def test_start_runs_the_worker_first_and_stops_the_api_first() -> None:
    assert [spec.name for spec in PROCESS_TABLE] == ["worker", "api", "persistence", "telemetry"]
    stop_order = sorted(PROCESS_TABLE, key=lambda spec: spec.stop_rank)
    assert [spec.name for spec in stop_order] == ["api", "worker", "persistence", "telemetry"]


def test_a_row_gets_the_urls_of_the_servers_it_needs_and_no_other(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    api, persistence = sup._child_env(API), sup._child_env(PERSISTENCE)
    assert (api["DATABASE_URL"], api["REDIS_URL"]) == ("postgresql://db", "redis://cache")
    assert persistence["DATABASE_URL"] == "postgresql://db" and "REDIS_URL" not in persistence
    assert api["CHATQ_HOME"] == str(tmp_path) and api["LOG_LEVEL"] == "INFO"


def test_a_row_port_comes_from_its_own_env_else_from_the_settings(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    assert sup.port(API) == 8123
    assert sup.port(API.with_env(CHATQ_PORT="9001")) == 9001
    assert sup.port(PERSISTENCE) == 0
