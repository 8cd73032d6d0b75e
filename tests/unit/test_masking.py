"""Masking: no secret or personal detail of any kind reaches a log line, from any logger.

Each kind goes through every logger a chatq process has (chatq's own, FastStream's,
Litestar's, uvicorn's, asyncio's, vLLM's as its dictConfig sets it up), as the message,
as an argument, as an extra field and inside a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatq import logs

ROOT = Path(__file__).resolve().parent.parent.parent

# kind → (a text holding it, what must not be in the line)
SECRETS: dict[str, tuple[str, str]] = {
    "email": ("write to alice.smith+chat@example.co.uk today", "alice.smith+chat@example.co.uk"),
    "phone (international)": ("call +49 151 2345 6789 now", "2345 6789"),
    "phone (national)": ("call (555) 123-4567 or 555.987.6543", "123-4567"),
    "bearer token": ("Authorization: Bearer abcDEF123456.ghiJKL-789", "abcDEF123456"),
    "chatq key": ("key cq-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 used", "cq-AbCdEfGhIjKlMnOpQrSt"),
    "service key": ("configured service-key-0123456789abcdef here", "service-key-0123456789abcdef"),
    "jwt": (
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI3In0.Zm9vYmFyYmF6cXV4 expired",
        "eyJzdWIiOiI3In0",
    ),
    "password=": ("login password=hunter2&next=1", "hunter2"),
    "json password": ('{"username": "alice", "password": "open sesame"}', "open sesame"),
    "dsn password": ("postgresql://chatq:s3cr3tpw@db:5432/chatq", "s3cr3tpw"),
    "url password only": ("redis://:r3dispw0rd@cache:6379/0", "r3dispw0rd"),
    "url token": ("nats://s3cr3tnatstoken@nats:4222", "s3cr3tnatstoken"),
    "url list": ("nats://n1:4222,nats://ops:l1stpw@n2:4222,t0kenInL1st@n3:4222", "l1stpw"),
    "url list token": ("nats://n1:4222,nats://ops:l1stpw@n2:4222,t0kenInL1st@n3:4222", "t0kenInL1st"),
    "url query": ("postgresql://db/chatq?sslpassword=k3ypw&sslmode=require", "k3ypw"),
}
LOGGERS = [
    "chatq.api",
    "chatq.worker",
    "chatq.persistence",
    "broker.bus",
    "faststream",
    "faststream.access.nats",
    "litestar",
    "uvicorn.error",
    "asyncio",
    "vllm.v1.engine.core",
    "some.library",
]


@pytest.fixture
def output(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """chatq's logging set up as a process would, its stdout captured."""
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CHATQ_API_KEYS", "service-key-0123456789abcdef")
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    # Filters other libraries put on these loggers in this pytest process (litellm, imported
    # by the e2e tests, redacts Authorization on uvicorn's) would hide what chatq's do.
    for name in LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    logs.setup_logging("test")
    # What vLLM does with VLLM_LOGGING_CONFIG_PATH, in this process.
    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as f:
        logging.config.dictConfig(json.load(f))
    yield stream
    logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    # setup_logging sets these for the processes it starts; this one is pytest.
    os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
    os.environ.pop("CHATQ_LOG_SERVICE", None)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("kind", list(SECRETS))
def test_no_logger_writes_a_secret(output: io.StringIO, kind: str) -> None:
    text, secret = SECRETS[kind]
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.warning(text)
        log.warning("got %s", text)
        log.warning("with an extra", extra={"prompt": text})
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed")
    written = output.getvalue()
    assert secret not in written, written
    records = lines(output)
    # Every logger wrote all four lines, in JSON, and something stands where the secret was.
    assert {r["logger"] for r in records} == set(LOGGERS)
    assert len(records) == 4 * len(LOGGERS)
    for record in records:
        carrier = {"failed": "exc", "with an extra": "prompt"}.get(str(record["msg"]), "msg")
        assert "[" in str(record[carrier]), record


def test_what_is_not_secret_is_left_alone(output: io.StringIO) -> None:
    text = (
        "chatcmpl-0123456789abcdef0123456789abcdef conversation 980ab260-1234-5678-9abc-def012345678 "
        "at 2025-05-04 12:00:00.123, 10+5 tokens in 1714830000 ms on 127.0.0.1:8080, "
        "password worker started"
    )
    logging.getLogger("chatq.api").info(text)
    assert lines(output)[0]["msg"] == text


def test_a_line_has_the_stable_keys_first_then_the_request(output: io.StringIO) -> None:
    with logs.bound("chatcmpl-1", user_id=7, model="m"):
        logging.getLogger("chatq.worker").info("inside")
    logging.getLogger("chatq.worker").info("outside")
    inside, outside = lines(output)
    assert list(inside)[:5] == ["ts", "level", "service", "logger", "msg"]
    assert (inside["request_id"], inside["user_id"], inside["model"]) == ("chatcmpl-1", 7, "m")
    assert inside["service"] == "test" and inside["level"] == "INFO"
    assert "request_id" not in outside


def test_vllm_engine_processes_write_the_same_lines(tmp_path: Path) -> None:
    """vLLM configures logging in the worker and in its engine-core process: both JSON, masked."""
    script = textwrap.dedent(
        """
        import multiprocessing, sys
        from chatq.logs import setup_logging

        def engine_core():
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging, init_logger
            configure_logging(LoggingConfig())
            init_logger("vllm.v1.engine.core").info("core for %s", "bob@example.com")

        if __name__ == "__main__":
            setup_logging("worker")
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging, init_logger
            configure_logging(LoggingConfig())
            init_logger("vllm.entrypoints").info("main for %s", "alice@example.com")
            child = multiprocessing.get_context("spawn").Process(target=engine_core)
            child.start()
            child.join()
            sys.exit(child.exitcode)
        """
    )
    (tmp_path / "engine.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOGGING", "LOG_LEVEL"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "engine.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    assert "\x1b[" not in done.stdout
    by_msg = {r["msg"]: r for r in records}
    assert by_msg["main for [email]"]["service"] == "worker"
    assert by_msg["core for [email]"]["service"] == "worker"
    assert "@example.com" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("postgresql://chatq:pw@db:5432/chatq", "postgresql://chatq:[masked]@db:5432/chatq"),
        ("redis://:pw@cache:6379/0", "redis://:[masked]@cache:6379/0"),
        ("nats://TOKEN@nats:4222", "nats://[masked]@nats:4222"),
        ("rediss://user:p%40ss@cache", "rediss://user:[masked]@cache"),
        ("redis://cache:6379/0?password=pw&db=1", "redis://cache:6379/0?password=[masked]&db=1"),
        ("postgresql:///chatq?host=/run&password=pw", "postgresql:///chatq?host=/run&password=[masked]"),
        (
            "nats://a:pw1@n1:4222, nats://TOKEN@n2:4222,n3:4222,TOKEN2@n4",
            "nats://a:[masked]@n1:4222, nats://[masked]@n2:4222,n3:4222,[masked]@n4",
        ),
        ("postgresql://u:pw@h1:5432,h2:5433/chatq", "postgresql://u:[masked]@h1:5432,h2:5433/chatq"),
        ("unix:///run/redis.sock?db=0", "unix:///run/redis.sock?db=0"),
    ],
)
def test_url_for_log_masks_every_credential_form(url: str, logged: str) -> None:
    assert logs.url_for_log(url) == logged
    # The same, wherever a URL turns up in a line (the filter's own pass).
    assert logs.mask(f"connecting to {url} now") == f"connecting to {logged} now"
