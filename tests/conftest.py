"""Shared fixtures: a real nats-server per test session, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.servers import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream-enabled nats-server for the whole session."""
    store = tmp_path_factory.mktemp("nats")
    server = NatsServer(store).start(store / "nats.log")
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, for tests that fill or inspect the queue."""
    server = NatsServer(tmp_path / "nats").start(tmp_path / "nats.log")
    yield server
    server.stop()
