"""./start --inference-workers 2 --api-workers 2 on one machine (issue #13): the launcher's
own table (stack.process_table.scaled_table) with the real servers and the synthetic engine.

Two workers share the model's queue, two API processes share one port, and the work
spreads over both of each; an API process that dies leaves the other serving.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from chatq.settings import load
from stack.cli import main as cli_main
from stack.process_table import WORKER_PORT_STEP, scaled_table
from stack.servers import free_port
from stack.supervisor import Supervisor, launched, workers_ready
from tests.helpers import ROOT, auth, base_env, wait_until
from tests.metrics import metric_value

MODEL = "scale-model"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    root = tmp_path_factory.mktemp("scale")
    env = base_env(
        f"nats://127.0.0.1:{free_port()}",
        root / "home",
        INFERENCE_ENGINE="synthetic",
        MODEL_NAME=MODEL,
        CHATQ_MODELS=MODEL,
        SYNTH_TOKENS_PER_S="200",
        SYNTH_TTFT_MS="20",
        WORKER_SLOTS="2",
        INFERENCE_WORKERS="2",
        API_WORKERS="2",
        CHATQ_PORT=str(free_port()),
        WORKER_METRICS_PORT=str(free_port()),
        TELEMETRY_PORT=str(free_port()),
    )
    table = scaled_table(load({**os.environ, **env}))
    with launched(
        root / "home", env, table, ready=workers_ready(2), logdir=root / "logs", cwd=ROOT, timeout=120
    ) as sup:
        yield sup


def test_the_table_has_two_workers_and_two_api_processes_on_one_port(stack: Supervisor) -> None:
    assert list(stack.children) == ["worker-1", "worker-2", "api-1", "api-2", "persistence", "telemetry"]
    assert len(set(stack.api_urls)) == 1  # one port
    ports = [stack.port(stack.children[f"worker-{i}"].spec) for i in (1, 2)]
    assert ports[1] == ports[0] + WORKER_PORT_STEP
    health = httpx.get(stack.api_urls[0] + "/health").json()
    assert health["services"]["workers"]["ready"] == 2, health


def _chat(url: str, n: int) -> None:
    # A new connection each: the kernel picks the API process per connection.
    with httpx.Client(headers={**auth(), "Connection": "close"}) as client:
        resp = client.post(
            url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 4},
            timeout=30,
        )
    assert resp.status_code == 200, resp.text


def _served_by_worker(stack: Supervisor, name: str) -> float:
    port = stack.port(stack.children[name].spec)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return metric_value(text, "chatq_worker_jobs_total", model=MODEL, outcome="completed")


def _request_lines(stack: Supervisor, name: str) -> int:
    log = stack.logdir / f"{name}.log"
    return sum('"status_code"' in line for line in log.read_text(errors="replace").splitlines())


def test_requests_spread_over_both_apis_and_both_workers(stack: Supervisor) -> None:
    import concurrent.futures

    url = stack.api_urls[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: _chat(url, n), range(40)))
    served = {name: _served_by_worker(stack, name) for name in ("worker-1", "worker-2")}
    assert sum(served.values()) >= 40 and all(served.values()), served
    lines = {name: _request_lines(stack, name) for name in ("api-1", "api-2")}
    assert sum(lines.values()) >= 40 and all(lines.values()), lines


def test_an_api_process_that_dies_leaves_the_other_serving(stack: Supervisor) -> None:
    """Not tended here (launch() never restarts): the survivor alone takes the port."""
    victim = stack.process("api-2")
    os.kill(victim.pid, signal.SIGKILL)
    wait_until("api-2 gone", lambda: victim.proc.poll() is not None, 10)
    for n in range(10):
        _chat(stack.api_urls[0], n)
    assert httpx.get(stack.api_urls[0] + "/health").json()["services"]["workers"]["ready"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--inference-workers", "0"], "at least 1"),
        (["--api-workers", "x"], "is not a whole number"),
    ],
)
def test_start_refuses_a_count_below_one(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["start", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
