"""Logging set-up shared by every chatq process: one plain line per record, to stdout.

    2025-05-04 12:00:00.123 INFO api chatq.api: message

timestamp (local time), level, service, logger, message; never colours. The supervisor
sends a child's stdout and stderr to .chatq/logs/<service>.log.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Loggers FastStream gives a coloured handler of its own unless they already have a
# StreamHandler on sys.stdout: the app logger, and the per-message logger of a NatsBroker
# created without a logger of its own.
_FASTSTREAM_APP = "faststream"
_FASTSTREAM_ACCESS = "faststream.access.nats"
# Loggers a library gives a handler and format of its own (Litestar, when an app is
# built): theirs are dropped and their records go to the root logger, in our format.
_ADOPTED = ("litestar",)


class PlainFormatter(logging.Formatter):
    """The chatq line; colour codes a library put into a message are removed."""

    def __init__(self, service: str) -> None:
        super().__init__(
            fmt=f"%(asctime)s.%(msecs)03d %(levelname)s {service} %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


def setup_logging(service: str) -> None:
    """Configure the root logger; LOG_LEVEL picks the level.

    Idempotent: call it again after building something that configures logging itself
    (a Litestar app does, in its constructor) to put chatq's format back.
    """
    level = logging.getLevelName(os.environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO")
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(PlainFormatter(service))
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
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(handler.formatter)
    access.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    access_logger = logging.getLogger(_FASTSTREAM_ACCESS)
    access_logger.handlers = [access]
    access_logger.propagate = False
