"""The operator's view on a running stack: /api/admin/workers and /status, ./status, and
every metric the Grafana dashboard queries.

One stack for the module (NATS, PostgreSQL, Redis, API, synthetic worker, persistence,
telemetry writing a snapshot every 0.5 s); two models are configured and only one is
served, so the other's queue holds jobs nobody takes.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

import schemas
from broker.bus import Bus
from stack.servers import free_port, wait_for_port
from tests.helpers import (
    ROOT,
    AccountsStack,
    Proc,
    accounts_stack,
    auth,
    create_account,
    login,
    run_python,
    spawn,
    start_worker,
)
from tests.metrics import metric_value

MODEL = "op-model"
UNSERVED = "op-unserved"
DASHBOARD = ROOT / "deploy" / "grafana" / "chatq-dashboard.json"


class Operated:
    def __init__(self, stack: AccountsStack, telemetry: Proc, telemetry_port: int, worker_port: int) -> None:
        self.stack = stack
        self.telemetry = telemetry
        self.telemetry_port = telemetry_port
        self.worker_port = worker_port

    def start_telemetry(self) -> None:
        self.telemetry = spawn("telemetry", "workers.telemetry", self.telemetry.env, self.stack.logdir)
        wait_for_port("127.0.0.1", self.telemetry_port, 30, self.telemetry.proc)


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operated]:
    root = tmp_path_factory.mktemp("operator")
    telemetry_port = free_port()
    with accounts_stack(root, MODEL, CHATQ_MODELS=f"{MODEL},{UNSERVED}", TELEMETRY_INTERVAL_S="0.5") as stack:
        env = {**stack.env, "TELEMETRY_PORT": str(telemetry_port)}
        telemetry = spawn("telemetry", "workers.telemetry", env, stack.logdir)
        stack.procs.append(telemetry)
        wait_for_port("127.0.0.1", telemetry_port, 30, telemetry.proc)
        operated = Operated(stack, telemetry, telemetry_port, _worker_port(stack))
        try:
            yield operated
        finally:
            operated.telemetry.stop()


def _worker_port(stack: AccountsStack) -> int:
    """The synthetic worker's metrics port, from its environment as accounts_stack started it."""
    worker = next(p for p in stack.procs if p.name == "worker")
    return int(worker.env["WORKER_METRICS_PORT"])


def _status(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/api/admin/status", headers=auth(), timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen within {timeout} s")


async def _queue_jobs(nats_url: str, model: str, count: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        bus = Bus(nc)
        for i in range(count):
            await bus.publish_job(
                schemas.Job(
                    request_id=f"op-waiting-{i}",
                    model=model,
                    messages=[schemas.ChatMessage("user", "x")],
                    sampling=schemas.Sampling(),
                    created=time.time(),
                    deadline=time.time() + 600,
                )
            )
    finally:
        await nc.close()


def _chat(url: str, content: str = "hi") -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        headers=auth(),
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": content}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def test_an_admin_sees_workers_queues_and_how_old_the_snapshot_is(operated: Operated) -> None:
    url = operated.stack.url
    asyncio.run(_queue_jobs(operated.stack.nats_url, UNSERVED, 2))

    def waiting() -> dict[str, Any] | None:
        status = _status(url)
        for q in status["queues"]:
            if q["model"] == UNSERVED and q["priority"] == "interactive" and q["depth"] == 2:
                return status if (q.get("oldest_age_s") or 0) > 0 else None
        return None

    status = _wait_for("two jobs waiting for the unserved model", waiting)
    priorities = {(q["model"], q["priority"]) for q in status["queues"]}
    assert {(m, p) for m in (MODEL, UNSERVED) for p in ("interactive", "background")} <= priorities
    assert status["services"]["nats"] == "ok"
    telemetry = status["services"]["telemetry"]
    assert telemetry["status"] == "ok" and telemetry["interval_s"] == 0.5
    assert 0 <= telemetry["snapshot_age_s"] < 10
    # The configured model nobody serves makes the service degraded, and the answer says why.
    assert status["status"] == "degraded"
    assert any(UNSERVED in reason for reason in status["reasons"]), status["reasons"]
    [worker] = status["workers"]
    assert (worker["id"], worker["model"], worker["engine"], worker["state"]) == (
        "worker",
        MODEL,
        "synthetic",
        "ready",
    )
    assert worker["free_slots"] == worker["slots"] > 0

    workers = httpx.get(url + "/api/admin/workers", headers=auth(), timeout=10).json()["workers"]
    assert [w["id"] for w in workers] == ["worker"]
    assert {"id", "host", "model", "state", "slots", "free_slots", "engine_version", "last_seen"} <= set(
        workers[0]
    )
    assert time.time() - workers[0]["last_seen"] < 10
    assert workers[0]["host"] == socket.gethostname()
    assert workers[0]["engine_version"] == "synthetic"


def test_users_who_are_not_admins_get_403(operated: Operated) -> None:
    url = operated.stack.url
    account = create_account(url, "op-user")
    user = login(url, account.username, account.password)
    for path in ("/api/admin/workers", "/api/admin/status"):
        response = httpx.get(url + path, headers=user, timeout=10)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
        assert httpx.get(url + path, timeout=10).status_code == 401
    # Nor may they switch a worker's model.
    switch = httpx.post(
        url + "/api/admin/workers/worker/model", json={"profile": "x"}, headers=user, timeout=10
    )
    assert switch.status_code == 403 and switch.json()["error"]["code"] == "forbidden"


def _cli_status(operated: Operated, *args: str) -> subprocess.CompletedProcess[str]:
    port = operated.stack.url.rsplit(":", 1)[1]
    env = {**operated.stack.env, "CHATQ_PORT": port, "CHATQ_HOME": str(operated.stack.logdir / "cli-home")}
    return run_python("-m", "stack.cli", "status", *args, env=env, timeout=60)


def test_status_command_prints_the_same_as_a_table_and_as_json(operated: Operated) -> None:
    result = _cli_status(operated, "--json")
    # Degraded (the unserved model): exit code 1, the JSON all the same.
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "degraded"
    assert [w["id"] for w in data["workers"]] == ["worker"]
    assert {q["model"] for q in data["queues"]} >= {MODEL, UNSERVED}

    table = _cli_status(operated)
    lines = table.stdout.splitlines()
    assert any(line.startswith("status: degraded") for line in lines), table.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    assert lines[header + 1].split()[0] == "worker"
    assert any(line.split()[:2] == [UNSERVED, "interactive"] for line in lines), table.stdout


def _promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, ranges stripped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        following = expr[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or aggregation
        if word in {"and", "or", "unless", "bool", "offset", "inf", "nan"}:
            continue
        names.add(word)
    return names


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= _promql_metric_names(target["expr"])
    return names


def _exposed(text: str) -> set[str]:
    """Every series name a /metrics page offers, also of metrics with no samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_every_metric_the_dashboard_queries_exists(operated: Operated) -> None:
    url = operated.stack.url
    for i in range(3):
        _chat(url, f"question {i}")
    queried = _dashboard_metrics()
    assert len(queried) > 20 and "chatq_ttft_seconds_bucket" in queried

    def scrape() -> tuple[str, str, str]:
        return (
            httpx.get(url + "/metrics", timeout=10).text,
            httpx.get(f"http://127.0.0.1:{operated.worker_port}/metrics", timeout=10).text,
            httpx.get(f"http://127.0.0.1:{operated.telemetry_port}/metrics", timeout=10).text,
        )

    api, worker, telemetry = scrape()
    exposed = _exposed(api) | _exposed(worker) | _exposed(telemetry)
    assert sorted(queried - exposed) == []
    print(_cli_status(operated).stdout)  # for a reader of -s output
    # And the requests just made are in them: tokens in and out, latency, HTTP statuses.
    samples = {
        s.name: s.value
        for text in (api, worker)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("model") in (MODEL, None)
    }
    assert samples.get("chatq_ttft_seconds_count", 0) >= 3
    assert samples.get("chatq_worker_prompt_tokens_total", 0) > 0
    assert samples.get("chatq_worker_output_tokens_total", 0) > 0
    completions = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
    assert metric_value(api, "chatq_http_requests_total", **completions) > 0


def test_a_worker_whose_heartbeat_stops_leaves_the_list(operated: Operated) -> None:
    url = operated.stack.url
    doomed, _ = start_worker(operated.stack.env, operated.stack.logdir, name="doomed")
    try:

        def listed() -> bool:
            workers = httpx.get(url + "/api/admin/workers", headers=auth(), timeout=10).json()["workers"]
            return any(w["id"] == "doomed" and w["state"] == "ready" for w in workers)

        _wait_for("the second worker in the list", listed, timeout=60)
        doomed.kill()  # SIGKILL: no goodbye, the heartbeats just stop
        _wait_for("the killed worker gone from the list", lambda: not listed(), timeout=20)
        assert [w["id"] for w in _status(url)["workers"]] == ["worker"]
    finally:
        doomed.kill()


def test_telemetry_down_makes_status_degraded_not_an_error(operated: Operated) -> None:
    url = operated.stack.url
    operated.telemetry.kill()
    try:

        def stale() -> dict[str, Any] | None:
            status = _status(url)
            return status if status["services"]["telemetry"]["status"] == "stale" else None

        status = _wait_for("the snapshot going stale", stale)
        assert status["status"] == "degraded"
        assert any("telemetry" in reason for reason in status["reasons"]), status["reasons"]
        # The live parts still answer: the worker, NATS.
        assert [w["id"] for w in status["workers"]] == ["worker"]
        assert status["services"]["nats"] == "ok"
    finally:
        operated.start_telemetry()
    _wait_for("a fresh snapshot", lambda: _status(url)["services"]["telemetry"]["status"] == "ok")


def test_the_dashboard_parser_reads_names_not_functions() -> None:
    names = _promql_metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(chatq_ttft_seconds_bucket{model=~"$model"}'
        "[$__rate_interval]))) / time() - max(chatq_telemetry_last_scrape_timestamp_seconds)"
    )
    assert names == {"chatq_ttft_seconds_bucket", "chatq_telemetry_last_scrape_timestamp_seconds"}


def test_the_dashboard_is_valid_json_for_grafana() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(
        t["datasource"]["uid"] == "chatq-prometheus"
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    )
    provisioned = (
        ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    ).read_text()
    assert "uid: chatq-prometheus" in provisioned
