"""Tokens per user per hour, read from chatq's events: how an integration follows chat.events.>.

    NATS_USER=chatq-integration NATS_PASSWORD=... \
    .venv/bin/python -m examples.tokens_per_user [--nats-url nats://127.0.0.1:4222]
        [--since all | 24h | 90m | 2026-11-24T10:00Z] [--every 10]

It reads the JetStream EVENTS stream through an ephemeral consumer of its own, without
acks, that the server deletes 30 s after this program stops: chatq's own durable consumer
(`persistence`) and every other reader go on exactly as before (on a limits-retention
stream, consumers never take messages from each other). Without --since it
starts at the next event; --since replays what the stream still holds (7 days).

A row sums the prompt and completion tokens of the requests that ended in an hour (UTC):
completed ones, and cancelled ones with the tokens generated before the cancel (billed
too). The user is chatq's account id (`id:7`), else the OpenAI `user` field the client
sent, else `-` (a service key). Every request counts once: JetStream drops a repeated
publish of an event within its duplicate window, and this program skips a request id it
has already counted, so an event published again later is not counted twice. It prints
the table every --every seconds and once more on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

import schemas
from broker import names
from broker.connect import NatsLogin, connect

log = logging.getLogger("tokens_per_user")

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
BATCH = 256
# The server deletes our consumer this long after we stopped asking it for events.
INACTIVE_S = 30.0


@dataclass
class Row:
    """One user's requests that ended in one hour."""

    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def user_of(event: schemas.Completed | schemas.Cancelled) -> str:
    """Who a request is counted for: chatq's account id, else the client's `user` field."""
    if event.meta.user_id is not None:
        return f"id:{event.meta.user_id}"
    return event.user or "-"


class Tally:
    """Tokens per (hour, user), each request counted once."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, str], Row] = {}
        # Request ids already counted (a few dozen bytes each; an example keeps them all).
        self._counted: set[str] = set()

    def add(self, event: schemas.Event) -> bool:
        """Count a request's last event; False for other kinds and for a request counted already."""
        match event:
            case schemas.Completed() | schemas.Cancelled():
                pass
            case _:
                return False
        if event.request_id in self._counted:
            return False
        self._counted.add(event.request_id)
        hour = int(event.time // 3600) * 3600
        row = self.rows.setdefault((hour, user_of(event)), Row())
        row.requests += 1
        row.cancelled += isinstance(event, schemas.Cancelled)
        row.prompt_tokens += event.usage.prompt_tokens
        row.completion_tokens += event.usage.completion_tokens
        return True

    def table(self) -> str:
        """The rows, oldest hour first, as a plain text table."""
        lines: list[tuple[str, ...]] = [
            ("hour (UTC)", "user", "requests", "cancelled", "prompt", "completion", "total")
        ]
        for (hour, user), row in sorted(self.rows.items()):
            counts = (row.requests, row.cancelled, row.prompt_tokens, row.completion_tokens)
            lines.append(
                (
                    dt.datetime.fromtimestamp(hour, dt.UTC).strftime("%Y-%m-%d %H:00"),
                    user,
                    *(str(n) for n in (*counts, row.total_tokens)),
                )
            )
        widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]

        def fmt(line: tuple[str, ...]) -> str:
            # Hour and user flush left, the numbers flush right.
            cells = zip(line, widths, strict=True)
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells))

        return "\n".join(fmt(line) for line in lines)


def start_at(since: str | None, now: dt.datetime | None = None) -> ConsumerConfig:
    """Where the consumer starts: the next event (None), all of them ("all"), or a time."""
    if since is None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    if since == "all":
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    now = now or dt.datetime.now(dt.UTC)
    if match := _RELATIVE.match(since):
        start = now - dt.timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    else:
        try:
            start = dt.datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(
                f"--since {since!r}: give 'all', an age such as 90m, 24h or 7d, or an ISO time"
            ) from None
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.UTC)
        if start > now:
            raise ValueError(f"--since {since!r} is in the future")
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)


def consumer_config(start: ConsumerConfig) -> ConsumerConfig:
    """An ephemeral consumer's settings: no name kept, no acks, gone soon after we stop."""
    return ConsumerConfig(
        deliver_policy=start.deliver_policy,
        opt_start_time=start.opt_start_time,
        opt_start_seq=start.opt_start_seq,
        ack_policy=AckPolicy.NONE,  # nothing to redeliver: we read, we never take
        inactive_threshold=INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
    )


async def read_events(
    js: JetStreamContext, tally: Tally, *, since: str | None, until_caught_up: bool = False
) -> None:
    """Count every event from `since` on; with until_caught_up, return once none is left to read."""
    start = start_at(since)
    while True:
        # A pull consumer: nothing arrives that we did not ask for, and if the consumer
        # is lost we make a new one from the next sequence ourselves.
        sub = await js.pull_subscribe(
            names.EVENTS_ALL, stream=names.EVENTS_STREAM, config=consumer_config(start)
        )
        try:
            while True:
                try:
                    batch = await sub.fetch(BATCH, timeout=1.0)
                except (NatsTimeout, TimeoutError):
                    if until_caught_up:
                        return  # nothing (more) in the stream from `since` on
                    await sub.consumer_info()  # quiet, or our consumer is gone: NotFoundError
                    continue
                for msg in batch:
                    try:
                        tally.add(schemas.decode_event(msg.data))
                    except msgspec.DecodeError as exc:
                        # A kind of event newer than this program, or a message it cannot read.
                        log.warning("skipping the message on %s: %s", msg.subject, exc)
                    # Where to pick up again if the consumer is lost (a NATS restart).
                    start = ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=msg.metadata.sequence.stream + 1,
                    )
                if until_caught_up and batch and batch[-1].metadata.num_pending == 0:
                    return
        except NotFoundError:
            log.warning("our consumer is gone (NATS restarted?); reading on from where we were")
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def run(nats_url: str, since: str | None, every: float) -> None:
    """Follow the events and print the table every `every` seconds and on SIGINT or SIGTERM."""
    start_at(since)  # a bad --since fails before connecting
    # NATS_USER and NATS_PASSWORD (or a user in the URL): chatq's embedded server asks for a
    # login; the `chatq-integration` user reads the events (docs/integrations.md).
    login = NatsLogin(os.environ.get("NATS_USER"), os.environ.get("NATS_PASSWORD"))
    nc = await connect(nats_url, "tokens-per-user", login)
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.create_task(read_events(nc.jetstream(), tally, since=since))
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            await asyncio.wait({reader, stopping}, timeout=every, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # the reader failed: say why
            print(tally.table(), end="\n\n", flush=True)
    finally:
        for task in (reader, stopping):
            task.cancel()
        await asyncio.gather(reader, stopping, return_exceptions=True)
        await nc.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument(
        "--since", default=None, help="replay from: all, an age (90m, 24h, 7d) or an ISO time; default: now"
    )
    parser.add_argument("--every", type=float, default=10.0, help="seconds between tables (10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        start_at(args.since)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(run(args.nats_url, args.since, args.every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
