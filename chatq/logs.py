"""Logging shared by every chatq process: one JSON object per line, to stdout, masked.

    {"ts":"2025-05-04T12:00:00.123Z","level":"INFO","service":"api","logger":"chatq.api",
     "msg":"/v1/chat/completions 200 completed","request_id":"chatcmpl-…","user_id":7,…}

`ts` (UTC), `level`, `service`, `logger` and `msg` are on every line, in that order;
then the record's extras (`request_id`, `user_id` and `model` from the context of the
request being handled, fields passed with `extra=`), then `exc` for a traceback. Colour
codes a library put into a message are removed. The supervisor sends a child's stdout
and stderr to .chatq/logs/<service>.log. See docs/logging.md.

Before any handler sees a record, `MaskingFilter` replaces e-mail addresses, phone
numbers, bearer tokens, API keys, JWTs, passwords, the credentials in URLs (and the
service keys and JWT secret this process knows) in its message, arguments, extras and
traceback. `url_for_log` is the one way a URL is written anywhere else (a printed line).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import logging.config
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType

import msgspec

# --- the request a record belongs to ------------------------------------------------

REQUEST_ID: ContextVar[str | None] = ContextVar("chatq_request_id", default=None)
USER_ID: ContextVar[int | None] = ContextVar("chatq_user_id", default=None)
MODEL: ContextVar[str | None] = ContextVar("chatq_model", default=None)


def bind(request_id: str | None = None, *, user_id: int | None = None, model: str | None = None) -> None:
    """Tag what this task (and the tasks it starts) logs from now on with these fields.

    For a task that handles one request from start to end (an HTTP request, a job);
    a loop that handles one message after another uses `bound`.
    """
    if request_id is not None:
        REQUEST_ID.set(request_id)
    if user_id is not None:
        USER_ID.set(user_id)
    if model is not None:
        MODEL.set(model)


@contextlib.contextmanager
def bound(
    request_id: str | None = None, *, user_id: int | None = None, model: str | None = None
) -> Iterator[None]:
    """`bind` for the duration of a block; the previous values come back after it."""
    tokens = (REQUEST_ID.set(request_id), USER_ID.set(user_id), MODEL.set(model))
    try:
        yield
    finally:
        MODEL.reset(tokens[2])
        USER_ID.reset(tokens[1])
        REQUEST_ID.reset(tokens[0])


class ContextFilter(logging.Filter):
    """Adds the bound request_id, user_id and model to a record (an explicit extra wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None:
            fields = record.__dict__
            fields.setdefault("request_id", request_id)
            user_id = USER_ID.get()
            if user_id is not None:
                fields.setdefault("user_id", user_id)
            model = MODEL.get()
            if model is not None:
                fields.setdefault("model", model)
        return True


# --- masking --------------------------------------------------------------------------

# One pattern per kind, each run only when a cheap substring test says it may match: a
# message with nothing to hide costs a few `in` tests and one digit scan.
# A URL, or a comma-separated list of them (NATS_URL, a libpq multi-host URL): up to the
# first blank or quote.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")  # header.payload.signature
_BEARER = re.compile(r"\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{8,}")
_KEY = re.compile(r"\b(?:cq|sk)-[A-Za-z0-9_-]{16,}")  # chatq keys, OpenAI-style keys
_PASSWORD = re.compile(
    r"""(?i:\b(password|passwd|pwd|secret|api_?key|access_token))"""
    r"""(?:("\s*:\s*")(?:[^"\\]|\\.)*(")"""  # "password": "…"
    r"""|('\s*:\s*')(?:[^'\\]|\\.)*(')"""  # 'password': '…'
    r"""|(\s*[:=]\s*)(?!\[masked\])[^\s,;&}"']+)"""  # password=… / password: …
)
_PASSWORD_HINTS = ("pass", "pwd", "secret", "apikey", "api_key", "access_token")
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d[\d ().-]{6,18}\d|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?![\w.-]|:\d)")
_PHONE_HINT = re.compile(r"\d\d\d\)?[ .-]\d")
_literals: tuple[str, ...] = ()


def _password(match: re.Match[str]) -> str:
    """Keep the key and its quoting, hide the value."""
    separator = match.group(2) or match.group(4) or match.group(6)
    return match.group(1) + separator + "[masked]" + (match.group(3) or match.group(5) or "")


# Query parameters whose value is a credential (libpq's password and sslpassword,
# redis-py's password, a token or key some client takes in the URL).
_SECRET_PARAM = re.compile(r"(?i)(pass|pwd|secret|token|key)")


def url_for_log(url: str) -> str:
    """The URL (or comma-separated URLs) as it may be logged: every credential masked.

    `user:pw@` keeps the user (`user:[masked]@`), `:pw@` becomes `:[masked]@`, and a
    lone `token@` (a NATS token, a Redis password-only form) becomes `[masked]@`; a
    query parameter that names a password, secret, token or key keeps only its name.
    Where a URL ends is read as urllib reads it (what the clients chatq uses accept).
    """
    return ",".join(_one_url(part) for part in url.split(","))


def _one_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:[masked]@{host}" if colon else f"[masked]@{host}"
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_, fragment = query.partition("#")
        params = []
        for param in query.split("&"):
            name, eq, _ = param.partition("=")
            params.append(f"{name}=[masked]" if eq and _SECRET_PARAM.search(name) else param)
        tail = f"{path}?{'&'.join(params)}{hash_}{fragment}"
    return f"{scheme}{sep}{authority}{tail}"


def _url(match: re.Match[str]) -> str:
    return url_for_log(match.group(0))


def mask(text: str) -> str:
    """The text with every secret and personal detail chatq knows of replaced."""
    for literal in _literals:
        if literal in text:
            text = text.replace(literal, "[secret]")
    if "://" in text:
        text = _URL.sub(_url, text)
    if "@" in text:
        text = _EMAIL.sub("[email]", text)
    if "eyJ" in text:
        text = _JWT.sub("[jwt]", text)
    if "earer" in text:
        text = _BEARER.sub("Bearer [token]", text)
    if "cq-" in text or "sk-" in text:
        text = _KEY.sub("[key]", text)
    lower = text.lower()
    if any(hint in lower for hint in _PASSWORD_HINTS):
        text = _PASSWORD.sub(_password, text)
    if "+" in text or _PHONE_HINT.search(text) is not None:
        text = _PHONE.sub("[phone]", text)
    return text


def mask_literals(values: Iterable[str]) -> None:
    """Also hide these exact strings (service keys, the JWT secret) wherever they appear."""
    global _literals
    _literals = tuple(sorted({v for v in (*_literals, *values) if len(v) >= 8}, key=len, reverse=True))


# Attributes every LogRecord has: anything else on a record is an extra.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    # vLLM's record factory adds this to every record of the process.
    "vllm_process_name",
}
# Extras chatq itself makes (never a user's text): not scanned.
_OURS = frozenset({"request_id", "endpoint", "outcome"})
_exc_formatter = logging.Formatter()


class MaskingFilter(logging.Filter):
    """Masks a record's message (rendered with its arguments), string extras and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_chatq_masked", False):
            return True  # a second handler of the same record
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string still gets logged, masked
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = mask(message)
        record.args = None
        fields = record.__dict__
        for name, value in fields.items():
            if name not in _STANDARD and name not in _OURS and isinstance(value, str):
                fields[name] = mask(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = _exc_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        fields["_chatq_masked"] = True
        return True


# --- the line -------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, service, logger, msg, then extras and exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if "\x1b" in message:
            message = _ANSI.sub("", message)
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": message,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name[0] != "_":
                line[name] = value
        process = record.__dict__.get("vllm_process_name")
        if process and process != "MainProcess":
            line["process"] = process
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = _ANSI.sub("", record.exc_text)
        if record.stack_info:
            line["stack"] = record.stack_info
        return _encoder.encode(line).decode()


def json_handler(service: str | None = None, level: int | str = logging.NOTSET) -> logging.Handler:
    """A stdout handler that writes chatq's masked JSON lines (also used by vLLM's dictConfig)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service or os.environ.get("CHATQ_LOG_SERVICE", "chatq")))
    handler.addFilter(MaskingFilter())
    handler.addFilter(ContextFilter())
    handler.setLevel(level)
    return handler


# --- set-up ---------------------------------------------------------------------------

# Loggers FastStream gives a coloured handler of its own unless they already have a
# StreamHandler on sys.stdout: the app logger, and the per-message logger of a NatsBroker
# created without a logger of its own.
_FASTSTREAM_APP = "faststream"
_FASTSTREAM_ACCESS = "faststream.access.nats"
# Loggers a library gives a handler and format of its own (Litestar, when an app is
# built): theirs are dropped and their records go to the root logger, in our format.
_ADOPTED = ("litestar",)


def log_level() -> int:
    """LOG_LEVEL as a logging level (INFO when unset or unknown)."""
    level = logging.getLevelName(os.environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO")
    return level if isinstance(level, int) else logging.INFO


def _known_secrets() -> list[str]:
    """The service keys and JWT secret this machine's settings name (to mask them verbatim)."""
    found = [k.strip() for k in os.environ.get("CHATQ_API_KEYS", "").split(",")]
    found.append(os.environ.get("JWT_SECRET", ""))
    found.append(os.environ.get("NATS_PASSWORD", ""))
    home = os.environ.get("CHATQ_HOME") or str(Path(__file__).resolve().parent.parent / ".chatq")
    for name in ("api_keys", "jwt_secret"):
        with contextlib.suppress(OSError):
            found.extend(line.strip() for line in (Path(home) / name).read_text().splitlines())
    return [s for s in found if s]


def setup_logging(service: str) -> None:
    """Configure the root logger; LOG_LEVEL picks the level.

    Idempotent: call it again after building something that configures logging itself
    (a Litestar app does, in its constructor) to put chatq's format back.
    """
    level = log_level()
    mask_literals(_known_secrets())
    os.environ["CHATQ_LOG_SERVICE"] = service
    handler = json_handler(service)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _ADOPTED:
        adopted = logging.getLogger(name)
        adopted.handlers = []
        adopted.propagate = True
    # FastStream's own loggers do not propagate: give them our handler, so their lines
    # look like ours (and FastStream adds none of its own). Its two lines per message
    # ("Received", "Processed") only with LOG_LEVEL=DEBUG; its warnings and errors always.
    app_logger = logging.getLogger(_FASTSTREAM_APP)
    app_logger.handlers = [handler]
    app_logger.propagate = False
    access = json_handler(service, logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    access_logger = logging.getLogger(_FASTSTREAM_ACCESS)
    access_logger.handlers = [access]
    access_logger.propagate = False
    _configure_vllm(service)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An exception that ends the process is a JSON line too."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("chatq").critical("uncaught exception", exc_info=(kind, exc, tb))


# --- vLLM -----------------------------------------------------------------------------

_vllm_config: str | None = None


def vllm_logging_config(service: str) -> dict[str, object]:
    """The dictConfig vLLM applies in each of its processes: chatq's handler for everything.

    vLLM configures logging itself (its own coloured format on the `vllm` logger) in the
    worker and again in each engine-core process it starts, which never runs
    setup_logging. VLLM_LOGGING_CONFIG_PATH replaces that configuration with this one.
    """
    vllm_level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"chatq": {"()": "chatq.logs.json_handler", "service": service}},
        "root": {"handlers": ["chatq"], "level": logging.getLevelName(log_level())},
        "loggers": {"vllm": {"handlers": [], "level": vllm_level, "propagate": True}},
    }


def _configure_vllm(service: str) -> None:
    """Point VLLM_LOGGING_CONFIG_PATH at chatq's configuration (unless it is set already)."""
    global _vllm_config
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") not in (None, _vllm_config):
        return  # the operator's own vLLM logging configuration
    if _vllm_config is None:
        # Private to this process (mode 0600, a fresh name): dictConfig can name callables.
        fd, path = tempfile.mkstemp(prefix="chatq-vllm-logging-", suffix=".json")
        owner = os.getpid()

        def remove() -> None:
            if os.getpid() == owner:
                with contextlib.suppress(OSError):
                    os.unlink(path)

        atexit.register(remove)
        os.close(fd)
        _vllm_config = path
    Path(_vllm_config).write_text(json.dumps(vllm_logging_config(service)))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = _vllm_config
