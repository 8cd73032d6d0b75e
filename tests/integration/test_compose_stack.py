"""The parts of compose.yaml that run without Docker, against a real stack (NATS, PostgreSQL,
Redis, API, synthetic worker, persistence): deploy/nginx/ as the real nginx runs it, and the
services' health checks (python -m stack.healthcheck).

nginx runs as an unprivileged user from a temporary prefix on loopback ports, with a
self-signed certificate made here; the site file is deploy/nginx/chatq.conf with only its
`listen` lines moved to those ports, and the upstream (deploy/nginx/upstream.conf) pointed
at the stack's API. Without nginx (./test installs Debian's as root) the nginx tests are
skipped with the reason, except under CI=true, where they must run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chatq.settings import load
from stack import processes
from stack.healthcheck import CHECKS
from stack.processes import Process
from stack.servers import free_port, wait_for_port
from tests.helpers import (
    AccountsStack,
    accounts_stack,
    auth,
    create_account,
    find_event,
    nats_login_env,
    spawn,
    sse_events,
    wait_until,
)
from tests.pipeline import chat_body, expected_text, worker_disconnect_aborts

MODEL = "nginx-model"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
TOKENS_PER_S = 20.0
LOGIN_FAILURES = 3
NOBODY = 65534


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    root = tmp_path_factory.mktemp("stack")
    env = {"SYNTH_TOKENS_PER_S": str(TOKENS_PER_S), "LOGIN_MAX_FAILURES": str(LOGIN_FAILURES)}
    with accounts_stack(root, MODEL, **env) as s:
        yield s


def _worker(stack: AccountsStack) -> Process:
    return next(proc for proc in stack.procs if proc.name == "worker")


def _api_port(stack: AccountsStack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


# --- the health checks ------------------------------------------------------------------


def test_the_health_checks_pass_against_running_services(stack: AccountsStack) -> None:
    api = load({**stack.env, "CHATQ_PORT": str(_api_port(stack))})
    worker = load({**stack.env, **_worker(stack).env})
    assert CHECKS["api"](api)
    assert CHECKS["inference"](worker)
    # The stack runs no telemetry worker: one of its own, stopped with the stack.
    telemetry_env = {**stack.env, "TELEMETRY_PORT": str(free_port())}
    stack.procs.append(spawn("telemetry", "workers.telemetry", telemetry_env, stack.logdir))
    wait_until("telemetry serves its metrics", lambda: CHECKS["telemetry"](load(telemetry_env)), 30)
    # A pull request is renewed every second: the check may land between two, as Docker's
    # retries allow.
    # Run in the persistence container: its NATS user and password.
    persistence = load(nats_login_env(stack.env, "workers.persistence"))
    wait_until("persistence's consumer holds a pull open", lambda: CHECKS["persistence"](persistence), 10)


def test_the_health_checks_fail_where_nothing_runs(stack: AccountsStack, tmp_path: Path) -> None:
    nowhere = load(
        {
            "CHATQ_HOME": str(tmp_path),
            "CHATQ_PORT": str(free_port()),
            "TELEMETRY_PORT": str(free_port()),
            "WORKER_METRICS_PORT": str(free_port()),
            "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        }
    )
    assert not any(check(nowhere) for check in CHECKS.values())


# --- nginx --------------------------------------------------------------------------------


def _nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        reason = "nginx is not installed (./test installs Debian's nginx when it runs as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the nginx tests must run under CI: {reason}")
        pytest.skip(reason)
    return found


def _unprivileged() -> list[str]:
    """What runs a command as nobody when the tests run as root (nginx itself is not root)."""
    return (
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []
    )


@dataclass
class Nginx:
    prefix: Path
    https: int
    http: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https}"

    @property
    def cert(self) -> Path:
        return self.prefix / "conf" / "tls" / "cert.pem"

    @property
    def tls(self) -> ssl.SSLContext:
        """A client context that trusts the self-signed certificate."""
        return ssl.create_default_context(cafile=self.cert)

    def command(self, *args: str) -> list[str]:
        return [
            *_unprivileged(),
            _nginx(),
            "-p",
            f"{self.prefix}/",
            "-c",
            "conf/nginx.conf",
            "-e",
            "stderr",
            *args,
        ]


def _write_prefix(api_port: int) -> Nginx:
    """A prefix holding nginx.conf around deploy/nginx/'s files and a self-signed pair."""
    prefix = Path(tempfile.mkdtemp(prefix="chatq-nginx-"))
    site = Nginx(prefix, free_port(), free_port())
    conf = prefix / "conf"
    (conf / "tls").mkdir(parents=True)
    for folder in ("logs", "tmp"):
        (prefix / folder).mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(conf / "tls" / "key.pem"), "-out", str(site.cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    chatq = (DEPLOY / "chatq.conf").read_text()
    chatq, https = re.subn(
        r"^(\s*)listen 443 ssl;", rf"\1listen 127.0.0.1:{site.https} ssl;", chatq, flags=re.M
    )
    chatq, http = re.subn(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{site.http};", chatq, flags=re.M)
    assert (https, http) == (1, 1), "chatq.conf's listen lines changed: update this test"
    (conf / "chatq.conf").write_text(chatq)
    upstream, found = re.subn(
        r"server api:\d+;", f"server 127.0.0.1:{api_port};", (DEPLOY / "upstream.conf").read_text()
    )
    assert found == 1
    (conf / "upstream.conf").write_text(upstream)
    temp = "\n".join(
        f"    {kind}_temp_path tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (conf / "nginx.conf").write_text(
        f"""daemon off;
pid logs/nginx.pid;
error_log stderr info;
worker_processes 1;
events {{ worker_connections 128; }}
http {{
    access_log logs/access.log;
    # The API's streams carry X-Accel-Buffering: no, which turns nginx's buffering off by
    # itself; ignored here, the streams test chatq.conf's own proxy_buffering.
    proxy_ignore_headers X-Accel-Buffering;
{temp}
    include upstream.conf;
    include chatq.conf;
}}
"""
    )
    if os.geteuid() == 0:
        for path in (prefix, *prefix.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
    return site


@pytest.fixture(scope="module")
def nginx(stack: AccountsStack) -> Iterator[Nginx]:
    _nginx()
    site = _write_prefix(_api_port(stack))
    proc = processes.spawn("nginx", site.command(), {}, stack.logdir)
    try:
        wait_for_port("127.0.0.1", site.https, 10, proc.proc)
        yield site
    finally:
        proc.stop()
        shutil.rmtree(site.prefix, ignore_errors=True)


def test_nginx_accepts_the_site_config(nginx: Nginx) -> None:
    done = subprocess.run(nginx.command("-t"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr
    assert "[warn]" not in done.stderr and "[emerg]" not in done.stderr, done.stderr


def test_plain_http_redirects_to_https_and_answers_the_health_check(nginx: Nginx) -> None:
    plain = f"http://127.0.0.1:{nginx.http}"
    moved = httpx.get(plain + "/v1/models", timeout=10)
    assert moved.status_code == 301 and moved.headers["location"].startswith("https://")
    assert httpx.get(plain + "/nginx-health", timeout=10).text == "ok\n"


def test_the_api_answers_through_tls(nginx: Nginx) -> None:
    health = httpx.get(nginx.url + "/health", verify=nginx.tls, timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert "max-age" in health.headers["strict-transport-security"]


def test_a_client_cannot_name_its_own_address_through_nginx(nginx: Nginx, stack: AccountsStack) -> None:
    """Logins are throttled per user and client address, the address X-Forwarded-For names
    when nginx (loopback, trusted) sends it: nginx sends the peer's, whatever the client
    wrote there, so a new made-up address each time does not reset the count."""

    def attempt(password: str, claimed: str) -> int:
        body = {"username": "behind-nginx", "password": password}
        headers = {"X-Forwarded-For": claimed}
        return httpx.post(
            nginx.url + "/api/auth/login", json=body, headers=headers, verify=nginx.tls
        ).status_code

    account = create_account(stack.url, "behind-nginx")
    failures = [attempt("wrong", f"203.0.113.{i}") for i in range(LOGIN_FAILURES)]
    assert failures == [401] * LOGIN_FAILURES
    assert attempt(account.password, "198.51.100.7") == 429


def test_a_stream_through_nginx_arrives_token_by_token(nginx: Nginx) -> None:
    tokens = 12
    reads: list[tuple[float, bytes]] = []
    with httpx.stream(
        "POST",
        nginx.url + "/v1/chat/completions",
        json=chat_body("through the proxy", model=MODEL, max_tokens=tokens),
        headers=auth(),
        verify=nginx.tls,
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for data in resp.iter_raw():
            reads.append((time.monotonic(), data))
    body = b"".join(data for _, data in reads).decode()
    events = [e.json() for e in sse_events(iter(body.splitlines())) if e.data != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    assert text == expected_text("through the proxy", tokens)
    # Buffered, the whole answer would come in one read at the end; streamed, the content
    # comes over the ~0.6 s the engine takes, in many reads before the last.
    with_content = [at for at, data in reads if b'"content"' in data]
    assert len(with_content) > tokens // 2, [data for _, data in reads]
    assert reads[-1][0] - with_content[0] > 0.5 * tokens / TOKENS_PER_S


def test_a_client_leaving_nginx_stops_the_engine(nginx: Nginx, stack: AccountsStack) -> None:
    port = int(_worker(stack).env["WORKER_METRICS_PORT"])
    before = worker_disconnect_aborts(port)
    with httpx.stream(
        "POST",
        nginx.url + "/v1/chat/completions",
        json=chat_body("a very long answer", model=MODEL, max_tokens=2000),
        headers=auth(),
        verify=nginx.tls,
        timeout=30,
    ) as resp:
        first = next(sse_events(resp.iter_lines()))
        request_id = first.json()["id"]
        # Leave mid-stream: closing the response drops the connection to nginx.
    wait_until("the worker aborts the engine request", lambda: worker_disconnect_aborts(port) > before, 10)
    cancelled = asyncio.run(find_event(stack.nats_url, request_id, "cancelled"))
    assert cancelled.reason == "client_disconnected"
    # The engine stopped: far fewer than the 2000 tokens asked for (100 s of work).
    assert 0 < cancelled.usage.completion_tokens < 5 * TOKENS_PER_S


def test_a_client_giving_up_on_a_whole_answer_stops_the_engine(nginx: Nginx, stack: AccountsStack) -> None:
    """Not streamed, nothing is written to the client until the end: nginx must notice the
    client leaving by itself and close the API's connection."""
    port = int(_worker(stack).env["WORKER_METRICS_PORT"])
    before = worker_disconnect_aborts(port)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            nginx.url + "/v1/chat/completions",
            json=chat_body("patience", model=MODEL, max_tokens=2000, stream=False),
            headers=auth(),
            verify=nginx.tls,
            timeout=httpx.Timeout(10, read=1.0),
        )
    wait_until("the worker aborts the engine request", lambda: worker_disconnect_aborts(port) > before, 10)
