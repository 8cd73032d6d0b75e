"""The worker's metrics port answers /ready from the worker's state (Kubernetes' readiness probe)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.unit.test_worker_cancel import FakeBus
from workers.inference import metrics
from workers.inference.health import serve
from workers.inference.synthetic import SyntheticEngine
from workers.inference.worker import InferenceWorker, WorkerConfig


class FakeKV:
    def __init__(self) -> None:
        self.puts: list[str] = []

    async def put(self, key: str, value: bytes) -> None:
        self.puts.append(key)

    async def delete(self, key: str) -> None:
        pass


def test_ready_follows_the_state_and_the_metrics_stay_on_every_other_path() -> None:
    current = ["loading"]
    httpd = serve(0, "127.0.0.1", lambda: current[0])
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        metrics.TOKENS.labels(model="health-test").inc(0)
        loading = httpx.get(url + "/ready", timeout=5)
        assert (loading.status_code, loading.text) == (503, "loading\n")
        assert httpx.get(url + "/live", timeout=5).status_code == 200
        current[0] = "ready"
        ready = httpx.get(url + "/ready", timeout=5)
        assert (ready.status_code, ready.text) == (200, "ready\n")
        current[0] = "draining"
        draining = httpx.get(url + "/ready", timeout=5)
        assert (draining.status_code, draining.text) == (503, "draining\n")
        live = httpx.get(url + "/live", timeout=5)
        assert (live.status_code, live.text) == (200, "draining\n")
        for path in ("/metrics", "/"):
            page = httpx.get(url + path, timeout=5)
            assert page.status_code == 200
            assert 'chatq_worker_output_tokens_total{model="health-test"}' in page.text
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_the_worker_state_is_loading_then_ready_then_draining() -> None:
    engine = SyntheticEngine(model="m", tokens_per_s=1000, ttft_s=0, slots=2)
    config = WorkerConfig("w", ack_wait_s=30, heartbeat_s=1, chunk_max_tokens=4, chunk_max_delay_s=0.01)
    worker = InferenceWorker(FakeBus(), engine, config)  # type: ignore[arg-type]
    kv: Any = FakeKV()
    worker._kv = kv
    assert worker.state == "loading"
    await worker.announce("ready")
    assert worker.state == "ready"
    await worker.drain(0)
    assert worker.state == "draining"
    assert kv.puts == ["w", "w"]
