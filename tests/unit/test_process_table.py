"""The process table as data: what ./start runs, in which order, and what each row is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatq.errors import ConfigError
from chatq.settings import load
from stack.process_table import API, PERSISTENCE, PROCESS_TABLE, scaled_table
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


def test_one_of_each_is_the_plain_table(tmp_path: Path) -> None:
    assert scaled_table(load({"CHATQ_HOME": str(tmp_path)})) == PROCESS_TABLE


def test_each_worker_gets_its_id_port_profile_and_gpu(tmp_path: Path) -> None:
    s = load(
        {
            "CHATQ_HOME": str(tmp_path),
            "WORKER_PROFILES": "smollm2-135m,qwen2.5-0.5b",
            "API_WORKERS": "3",
            "WORKER_METRICS_PORT": "9201",
        }
    )
    table = scaled_table(s, gpus=2)
    assert [spec.name for spec in table] == [
        "worker-1", "worker-2", "api-1", "api-2", "api-3", "persistence", "telemetry",
    ]  # fmt: skip
    workers = [dict(spec.env) for spec in table[:2]]
    assert [w["MODEL_PROFILE"] for w in workers] == ["smollm2-135m", "qwen2.5-0.5b"]
    assert [w["WORKER_METRICS_PORT"] for w in workers] == ["9201", "9211"]
    assert [w["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"]
    assert len({w["WORKER_ID"] for w in workers}) == 2
    assert all(spec.env["CHATQ_REUSE_PORT"] == "1" for spec in table[2:5])
    # Fewer GPUs than workers: CUDA chooses (vLLM's own placement), no pinning.
    assert all("CUDA_VISIBLE_DEVICES" not in spec.env for spec in scaled_table(s, gpus=1))


def test_a_profile_list_that_does_not_match_the_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one per worker"):
        load({"CHATQ_HOME": str(tmp_path), "WORKER_PROFILES": "a,b", "INFERENCE_WORKERS": "3"})
    with pytest.raises(ConfigError, match="API_WORKERS must be a whole number from 1 to 64"):
        load({"CHATQ_HOME": str(tmp_path), "API_WORKERS": "0"})
