"""The worker's FastStream wiring, with FastStream's in-memory TestNatsBroker."""

from __future__ import annotations

from pathlib import Path

from faststream.nats import TestNatsBroker

import schemas
from broker import names
from chatq.settings import load
from workers.inference.app import build_app
from workers.inference.synthetic import SyntheticEngine


async def test_cancel_messages_reach_the_cancel_handler(tmp_path: Path) -> None:
    settings = load({"CHATQ_HOME": str(tmp_path), "INFERENCE_ENGINE": "synthetic"})
    engine = SyntheticEngine(model="m", tokens_per_s=10, ttft_s=0, slots=2)
    _, broker = build_app(settings, engine)
    async with TestNatsBroker(broker) as test_broker:
        cancel = schemas.Cancel(request_id="req-1", reason="client_disconnected")
        await test_broker.publish(schemas.encode(cancel), names.cancel_subject("req-1"))
        handler = broker.subscribers[0]
        handler.calls[0].handler.mock.assert_called_once()  # type: ignore[attr-defined]
        # A malformed cancel is ignored, not fatal.
        await test_broker.publish(b"\x00garbage", names.cancel_subject("req-2"))
