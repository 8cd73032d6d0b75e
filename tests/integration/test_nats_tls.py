"""chatq on an outside NATS server that asks for TLS and chatq's users (issue #14).

A real nats-server with a `tls {}` block (a certificate from a CA made here) and the users
of broker/permissions.py; the launcher started with `CHATQ_EMBEDDED_NATS=0`,
`NATS_URL=tls://…`, `NATS_USERS_FILE` and `NATS_TLS_CA_FILE` naming the CA. A chat goes
through every service; the server's own connection list shows each process on TLS as its
service's user; a client that does not speak TLS, or does not trust the CA, gets nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import permissions
from chatq.errors import ConfigError
from stack import nats_auth
from stack.servers import NatsServer
from tests.helpers import AccountsStack, accounts_stack, auth, no_rate_limits, sse_events, wait_until

MODEL = "nats-tls-model"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for 127.0.0.1 and localhost: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("chatq test CA"))
        .issuer_name(_name("chatq test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("nats"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class TlsNats:
    def __init__(self, server: NatsServer, ca: Path, users_file: Path, passwords: dict[str, str]) -> None:
        self.server, self.ca, self.users_file, self.passwords = server, ca, users_file, passwords

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.server.port}"

    def connections(self) -> list[dict[str, object]]:
        """The server's own list of its client connections, with who and how."""
        monitor = f"http://127.0.0.1:{self.server.monitor_port}/connz?auth=1&limit=1024"
        with urllib.request.urlopen(monitor, timeout=5) as resp:
            found: list[dict[str, object]] = json.load(resp)["connections"]
        return found


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNats]:
    root = tmp_path_factory.mktemp("natstls")
    ca, cert, key = make_certificates(root / "tls")
    # The operator's users file, in the format ./start makes for its own server.
    passwords = nats_auth.ensure_passwords(root / "operator")
    config = nats_auth.write_config(root / "operator", passwords)
    tls = {"cert_file": str(cert), "key_file": str(key), "timeout": 5}
    config.write_text(config.read_text() + f"\ntls: {json.dumps(tls)}\n")
    server = NatsServer(root / "nats", config=config).start(root / "nats.log")
    try:
        yield TlsNats(server, ca, root / "operator" / nats_auth.USERS_FILE, passwords)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tls_nats: TlsNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("natstls-stack"),
        MODEL,
        nats_url=tls_nats.url,
        NATS_USERS_FILE=str(tls_nats.users_file),
        NATS_TLS_CA_FILE=str(tls_nats.ca),
        CHATQ_MODELS=MODEL,
        **no_rate_limits("user"),
    ) as stack:
        yield stack


def test_a_chat_goes_through_every_service_over_tls(stack: AccountsStack) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "over tls"}],
        "stream": True,
        "max_tokens": 5,
    }
    with httpx.Client(base_url=stack.urls[0], timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body, headers=auth()) as resp:
            assert resp.status_code == 200
            rid = resp.headers["x-request-id"]
            events = list(sse_events(resp.iter_lines()))
    assert events[-1].data == "[DONE]"
    text = "".join(
        choice["delta"].get("content") or "" for e in events[:-1] for choice in e.json().get("choices") or []
    )
    assert text
    # Persistence, over TLS as well, stores it.

    def stored() -> bool:
        with psycopg.connect(stack.dsn) as conn:
            row = conn.execute("SELECT status FROM requests WHERE request_id = %s", (rid,)).fetchone()
        return row is not None and row[0] == "completed"

    wait_until("the request stored as completed", stored, timeout=30)


def test_every_process_is_on_tls_as_its_own_services_user(stack: AccountsStack, tls_nats: TlsNats) -> None:
    test_a_chat_goes_through_every_service_over_tls(stack)  # every process has connected
    connections = tls_nats.connections()
    by_name: dict[str, set[str]] = {}
    for conn in connections:
        assert conn.get("tls_version"), conn  # not one connection in the clear
        by_name.setdefault(str(conn.get("name", "")), set()).add(str(conn.get("authorized_user")))
    users = {user for seen in by_name.values() for user in seen}
    for service in ("api", "inference", "persistence"):
        assert permissions.user_name(service) in users, (service, by_name)
    assert permissions.user_name("admin") not in users  # the launcher's own connection was closed


def test_a_client_in_the_clear_is_refused(tls_nats: TlsNats) -> None:
    """Spoken to in the clear, with a right login, the server asks for TLS and takes nothing."""
    user = permissions.user_name("integration")
    connect = {"user": user, "pass": tls_nats.passwords[user], "verbose": False, "pedantic": False}
    with socket.create_connection(("127.0.0.1", tls_nats.server.port), timeout=5) as sock:
        info = json.loads(sock.recv(4096).decode().removeprefix("INFO ").strip())
        assert info["tls_required"] is True
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nSUB chat.events.> 1\r\nPING\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"PONG" not in answer, answer  # closed (or an -ERR) instead of a session


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_nats: TlsNats) -> None:
    user = permissions.user_name("integration")
    untrusting = ssl.create_default_context()  # the system's CAs, not the test CA
    with pytest.raises((ssl.SSLCertVerificationError, nats.errors.Error, OSError)):
        await nats.connect(
            tls_nats.url,
            user=user,
            password=tls_nats.passwords[user],
            tls=untrusting,
            allow_reconnect=False,
            connect_timeout=3,
        )


async def test_the_integration_user_reads_events_over_tls(stack: AccountsStack, tls_nats: TlsNats) -> None:
    user = permissions.user_name("integration")
    context = ssl.create_default_context(cafile=str(tls_nats.ca))
    nc = await nats.connect(
        tls_nats.url,
        user=user,
        password=tls_nats.passwords[user],
        tls=context,
        inbox_prefix=permissions.inbox_prefix(user),
        allow_reconnect=False,
    )
    try:
        sub = await nc.subscribe("chat.events.>")
        await nc.flush()
        await asyncio.to_thread(test_a_chat_goes_through_every_service_over_tls, stack)
        msg = await sub.next_msg(timeout=10)
        assert msg.subject.startswith("chat.events.")
    finally:
        await nc.close()


def test_a_users_file_missing_a_service_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("chatq-api secret\nchatq-admin other\n")
    with pytest.raises(ConfigError, match=r"no password for .*chatq-inference"):
        nats_auth.outside_passwords(path)
    with pytest.raises(ConfigError, match="NATS_USERS_FILE"):
        nats_auth.outside_passwords(tmp_path / "absent")


async def test_a_server_whose_certificate_is_not_trusted_is_a_setting_to_fix(tls_nats: TlsNats) -> None:
    """Without NATS_TLS_CA_FILE the test CA is unknown: ConfigError at once, not a retry forever."""
    from broker.connect import NatsLogin, connect

    user = permissions.user_name("integration")
    with pytest.raises(ConfigError, match=r"not trusted.*NATS_TLS_CA_FILE"):
        await asyncio.wait_for(
            connect(tls_nats.url, "untrusting", NatsLogin(user, tls_nats.passwords[user])), 10
        )
