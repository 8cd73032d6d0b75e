"""deploy/nats/nats.conf (compose's NATS) is broker/permissions.py's table, and the real
nats-server reads it: passwords from its environment, the permissions in force."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import pytest

from broker import names, permissions
from broker.connect import NatsLogin, connect
from stack.servers import NatsServer
from tests.helpers import ROOT

CONF = ROOT / "deploy" / "nats" / "nats.conf"


def test_the_committed_config_is_the_permission_table() -> None:
    assert CONF.read_text() == permissions.environment_config(), (
        "deploy/nats/nats.conf is stale: python -m broker.permissions > deploy/nats/nats.conf"
    )


async def test_nats_server_reads_it_with_the_passwords_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in permissions.SERVICES:
        monkeypatch.setenv(permissions.password_variable(service), f"pw-of-{service}-0123456789")
    server = NatsServer(tmp_path / "nats", config=CONF).start(tmp_path / "nats.log")
    try:
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await nats.connect(server.address, allow_reconnect=False, connect_timeout=5)
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        login = NatsLogin("chatq-api", "pw-of-api-0123456789")
        nc = await nats.connect(server.address, error_cb=on_error, **login.client_options(server.address))
        await nc.subscribe(names.STREAM_ALL)  # the API's
        await nc.subscribe(names.EVENTS_ALL)  # not the API's
        await nc.flush()
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.02)
        said = [str(e).lower() for e in errors]
        assert len(said) == 1 and "permissions violation" in said[0] and names.EVENTS_ALL in said[0], said
        await nc.close()
        admin = await connect(server.address, "test", NatsLogin("chatq-admin", "pw-of-admin-0123456789"))
        await admin.close()
    finally:
        server.stop()
