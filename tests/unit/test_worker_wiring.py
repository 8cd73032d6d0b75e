"""The worker's wiring: the worker the settings build, and cancels reaching it through FastStream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faststream.nats import TestNatsBroker

import schemas
from broker import names
from catalog.profiles import Profile, load_profiles
from chatq.settings import Settings, load
from schemas.messages import SwitchReply
from tests.unit.test_worker_cancel import FakeBus, FakeMsg, job
from workers.inference.app import build_app, make_engine, make_worker, worker_profile
from workers.inference.synthetic import SyntheticEngine
from workers.inference.worker import InferenceWorker, WorkerConfig

PROFILES = """
[[profile]]
id = "alpha"
name = "Alpha"
aliases = ["first"]
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }

[[profile]]
id = "beta"
name = "Beta"
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }
"""


def settings_for(tmp_path: Path) -> Settings:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    return load(
        {
            "CHATQ_HOME": str(tmp_path),
            "INFERENCE_ENGINE": "synthetic",
            "PROFILES_FILE": str(profiles),
            "MODEL_PROFILE": "first",
            "WORKER_ID": "w-7",
            "JOBS_ACK_WAIT_S": "12",
            "STREAM_HEARTBEAT_S": "0.5",
            "CHUNK_MAX_TOKENS": "5",
            "CHUNK_MAX_DELAY_MS": "40",
            "SWITCH_GRACE_S": "7",
        }
    )


def too_big(profile: Profile, loaded: bool) -> str | None:
    return "beta does not fit" if profile.id == "beta" else None


async def test_the_worker_is_built_from_the_settings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    profiles = load_profiles(settings.profiles_file)
    profile = worker_profile(settings, profiles)
    assert profile is not None and profile.id == "alpha"
    engine = make_engine(settings, profile)
    bus: Any = FakeBus()
    worker = make_worker(settings, bus, engine, profile, profiles, gpus=3, fits=too_big)
    assert worker.config == WorkerConfig(
        worker_id="w-7",
        ack_wait_s=12.0,
        heartbeat_s=0.5,
        chunk_max_tokens=5,
        chunk_max_delay_s=0.04,
        switch_grace_s=7.0,
        gpus=3,
    )
    assert worker.bus is bus and worker.engine is engine and worker.jobs.bus is bus
    assert worker.model == "alpha" and worker.profile is profile and worker.profiles is profiles
    # The switch uses the fit check it was given, and builds engines from the settings.
    assert worker.request_switch("beta") == SwitchReply(False, "does_not_fit", "beta does not fit")
    assert worker._engine_factory is not None
    beta = worker._engine_factory(profiles.resolve("beta"))
    assert isinstance(beta, SyntheticEngine) and beta.model == "beta"


async def test_cancel_messages_reach_the_workers_job(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine = SyntheticEngine(model="m", tokens_per_s=10, ttft_s=0, slots=2)
    app, broker = build_app(settings, engine)
    bus: Any = FakeBus()
    profiles = load_profiles(settings.profiles_file)
    worker = make_worker(settings, bus, engine, None, profiles, gpus=0, fits=too_big)
    state: dict[str, object] = app.context.get("chatq_state")
    state["worker"] = worker  # as the app's start-up hook does
    assert isinstance(state["worker"], InferenceWorker)
    msg: Any = FakeMsg(job("req-1", max_tokens=1000))
    worker.jobs.start(msg)
    async with TestNatsBroker(broker) as test_broker:
        cancel = schemas.Cancel(request_id="req-1", reason="client_disconnected")
        await test_broker.publish(schemas.encode(cancel), names.cancel_subject("req-1"))
        assert await worker.jobs.wait_idle(5)
        # A malformed cancel is ignored, not fatal.
        await test_broker.publish(b"\x00garbage", names.cancel_subject("req-2"))
    (event,) = bus.events
    assert isinstance(event, schemas.Cancelled) and event.reason == "client_disconnected"
    assert msg.calls.count("ack") == 1
