"""A NATS cluster of three, with chatq's users, loses the JOBS stream's leader under load:
no accepted chat is lost, new chats are admitted again after a short pause, and the
server rejoins."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import psycopg
from nats.js import JetStreamContext

import schemas
from broker import names, topology
from broker.connect import server_urls
from stack import nats_auth
from stack.servers import NatsServer, cluster_url, nats_cluster
from tests.helpers import accounts_stack, auth, eventually, no_rate_limits, sse_events

MODEL = "clustered"
CLIENTS = 4
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "keep talking"}],
    "stream": True,
    "max_tokens": 6,
    "temperature": 0,
}
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Outcome:
    """One chat request as its client saw it."""

    sent_at: float
    status: int
    request_id: str | None
    # When the 200 arrived: the request was accepted and its stream started.
    admitted_at: float | None
    # completed, errored (an SSE error event), refused (an error body before any stream)
    # or broken (neither: a dropped connection, a stream that just stops).
    end: str
    detail: str = ""


async def chat(client: httpx.AsyncClient, url: str) -> Outcome:
    sent = time.monotonic()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=BODY, headers=auth()) as resp:
            rid = resp.headers.get("x-request-id")
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                try:
                    error = httpx.Response(resp.status_code, content=body).json()["error"]
                    if error["code"] and error["message"]:
                        return Outcome(sent, resp.status_code, rid, None, "refused", error["code"])
                except (ValueError, KeyError, TypeError):
                    pass
                return Outcome(sent, resp.status_code, rid, None, "broken", body[:200])
            admitted = time.monotonic()
            events = list(sse_events([line async for line in resp.aiter_lines()]))
    except httpx.HTTPError as exc:
        return Outcome(sent, 0, None, None, "broken", repr(exc))
    if any(e.event == "error" for e in events):
        error = next(e for e in events if e.event == "error").json()["error"]
        return Outcome(sent, 200, rid, admitted, "errored", error["code"])
    finished = any(
        choice.get("finish_reason")
        for e in events
        if e.data != "[DONE]"
        for choice in e.json().get("choices") or []
    )
    if events and events[-1].data == "[DONE]" and finished:
        return Outcome(sent, 200, rid, admitted, "completed")
    return Outcome(sent, 200, rid, admitted, "broken", f"ended with {events[-3:]!r}")


async def declared(url: str) -> None:
    """Wait for the cluster's JetStream (a meta leader), then declare chatq's streams at R3."""
    nc = await nats.connect(server_urls(url))
    try:

        async def declare() -> bool:
            try:
                await topology.ensure_streams(nc.jetstream(timeout=2), jobs_max_msgs=1000, replicas=3)
            except Exception:  # noqa: BLE001 - no meta leader yet: a timeout or "unavailable"
                return False
            return True

        await eventually("the cluster's JetStream", declare, 30, interval=0.5)
    finally:
        await nc.close()


async def replicas_current(js: JetStreamContext, stream: str) -> bool:
    """The stream has a leader and two replicas, both current."""
    try:
        cluster = (await js.stream_info(stream)).cluster
    except Exception:  # noqa: BLE001 - mid-election
        return False
    peers = cluster.replicas or [] if cluster else []
    return bool(
        cluster and cluster.leader and len(peers) == 2 and all(p.current and not p.offline for p in peers)
    )


async def lead(nc: nats.NATS, stream: str, server: str) -> None:
    """Make `server` the stream's leader (a stepdown that names the preferred one)."""
    js = nc.jetstream(timeout=2)

    async def leads() -> bool:
        try:
            cluster = (await js.stream_info(stream)).cluster
            if cluster is not None and cluster.leader == server:
                return True
            request = json.dumps({"placement": {"preferred": server}}).encode()
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=2)
        except Exception:  # noqa: BLE001 - mid-election: ask again
            pass
        return False

    await eventually(f"{server} leading {stream}", leads, 20, interval=0.5)


async def terminal_events(js: JetStreamContext) -> dict[str, set[str]]:
    """request id → the kinds of its terminal events in the EVENTS stream."""
    found: dict[str, set[str]] = {}
    sub = await js.subscribe(names.EVENTS_ALL, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception:  # noqa: BLE001 - nats TimeoutError: read them all
                return found
            event = schemas.decode_event(msg.data)
            kind = str(type(event).__struct_config__.tag)
            if kind in TERMINAL:
                found.setdefault(event.request_id, set()).add(kind)
    finally:
        await sub.unsubscribe()


async def persisted(dsn: str, ids: list[str]) -> dict[str, str]:
    """request id → its status in the database, for those of `ids` the database has."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT request_id, status FROM requests WHERE request_id = ANY(%s)", (ids,))
        return {str(rid): str(status) for rid, status in await cur.fetchall()}


def longest_gap(times: list[float], since: float) -> float:
    """The longest time without an admission from the last one before `since` on."""
    times = sorted(times)
    before = [t for t in times if t <= since]
    after = [t for t in times if t > since]
    points = before[-1:] + after
    return max((b - a for a, b in itertools.pairwise(points)), default=float("inf"))


def timeline(outcomes: list[Outcome], killed: float) -> str:
    """What the clients got, second by second around the kill (sent at; 0 is the kill)."""
    by_second: dict[int, dict[str, int]] = {}
    for o in outcomes:
        what = "ok" if o.end == "completed" else f"{o.status} {o.detail}"
        second = by_second.setdefault(int((o.sent_at - killed) // 1), {})
        second[what] = second.get(what, 0) + 1
    return "\n".join(f"  {s:+4d} s: {dict(sorted(w.items()))}" for s, w in sorted(by_second.items()))


def test_chats_go_on_when_the_jobs_streams_leader_is_lost(tmp_path: Path) -> None:
    # The cluster asks for chatq's users, as an operator's would: each chatq process logs
    # in as its service (NATS_USERS_FILE); the test's own connections as chatq-admin.
    passwords = nats_auth.ensure_passwords(tmp_path / "operator")
    config = nats_auth.write_config(tmp_path / "operator", passwords)
    servers = nats_cluster(tmp_path / "nats", config=config)
    for server in servers:
        server.login = nats_auth.admin_login(passwords)
        server.start(tmp_path / f"{server.name}.log")
    url = cluster_url(servers)
    try:
        asyncio.run(declared(url))
        with accounts_stack(
            tmp_path,
            MODEL,
            nats_url=",".join(server.address for server in servers),
            NATS_USERS_FILE=str(tmp_path / "operator" / nats_auth.USERS_FILE),
            CHATQ_MODELS=MODEL,
            NATS_STREAM_REPLICAS="3",
            SYNTH_TOKENS_PER_S="60",
            SYNTH_TTFT_MS="20",
            # A stream whose relay lost its NATS connection mid-way ends within 5 s; a
            # request that never heard from a worker gives up after 20 s.
            STREAM_WATCHDOG_S="5",
            CHATQ_REQUEST_TIMEOUT_S="20",
            **no_rate_limits("user", "admin"),
        ) as stack:
            outcomes, times, leader = asyncio.run(
                load_through_a_leader_loss(stack.url, url, servers, tmp_path)
            )
            ids = [o.request_id for o in outcomes if o.admitted_at is not None and o.request_id]
            events, stored = asyncio.run(records(url, stack.dsn, ids))
    finally:
        for server in servers:
            server.stop()

    count = {
        end: sum(o.end == end for o in outcomes) for end in ("completed", "errored", "refused", "broken")
    }
    lost = [rid for rid in ids if not events.get(rid) and stored.get(rid) not in TERMINAL]
    unpersisted = [rid for rid in ids if stored.get(rid) not in TERMINAL]
    gap_kill = longest_gap([o.admitted_at for o in outcomes if o.admitted_at], times["killed"])
    gap_restart = longest_gap([o.admitted_at for o in outcomes if o.admitted_at], times["restarted"])
    print(
        f"\nNATS cluster, JOBS leader {leader} killed: sent {len(outcomes)}, accepted {len(ids)}, "
        f"completed {count['completed']}, errored {count['errored']}, refused before a stream "
        f"{count['refused']}, broken {count['broken']}, lost {len(lost)}, not in the database "
        f"{len(unpersisted)}; longest gap between admissions from the kill {gap_kill:.2f} s, from "
        f"the restart {gap_restart:.2f} s; the test saw a new leader after "
        f"{times['new_leader'] - times['killed']:.2f} s, "
        f"rejoined (R3 current) {times['rejoined'] - times['restarted']:.2f} s after the restart"
    )
    print(timeline(outcomes, times["killed"]))
    assert lost == [], lost
    assert count["broken"] == 0, [o for o in outcomes if o.end == "broken"][:5]
    assert count["completed"] + count["errored"] == len(ids)
    assert gap_kill < 30 and gap_restart < 30


async def load_through_a_leader_loss(
    api: str, url: str, servers: list[NatsServer], root: Path
) -> tuple[list[Outcome], dict[str, float], str]:
    """CLIENTS clients chat in a loop while the JOBS leader is killed, comes back and rejoins."""
    outcomes: list[Outcome] = []
    times: dict[str, float] = {}
    stop = asyncio.Event()

    def admitted_since(t: float) -> int:
        return sum(1 for o in outcomes if o.admitted_at is not None and o.admitted_at > t)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            outcome = await chat(client, api)
            outcomes.append(outcome)
            if outcome.admitted_at is None:
                await asyncio.sleep(0.1)

    nc = await nats.connect(server_urls(url))
    js = nc.jetstream(timeout=2)
    timeout = httpx.Timeout(60, connect=5)
    async with httpx.AsyncClient(timeout=timeout) as client:
        clients = [asyncio.create_task(client_loop(client)) for _ in range(CLIENTS)]
        try:
            await eventually("chats before the kill", lambda: admitted_since(0) >= 20, 30)
            cluster = (await js.stream_info(names.JOBS_STREAM)).cluster
            assert cluster is not None and cluster.leader
            leader = cluster.leader
            victim = next(s for s in servers if s.name == leader)
            # The EVENTS stream's leader on the same server: both streams lose theirs.
            await lead(nc, names.EVENTS_STREAM, leader)
            assert victim.proc is not None
            victim.proc.kill()
            times["killed"] = time.monotonic()
            victim.stop()  # reaps it, closes its log

            async def new_leader() -> bool:
                try:
                    info = await js.stream_info(names.JOBS_STREAM)
                except Exception:  # noqa: BLE001 - mid-election
                    return False
                return bool(info.cluster and info.cluster.leader and info.cluster.leader != leader)

            await eventually("a new JOBS leader", new_leader, 30, interval=0.05)
            times["new_leader"] = time.monotonic()
            await eventually("chats after the kill", lambda: admitted_since(times["killed"]) >= 10, 40)
            await asyncio.to_thread(victim.start, root / f"{victim.name}.log")
            times["restarted"] = time.monotonic()

            async def rejoined() -> bool:
                return all([await replicas_current(js, s) for s in (names.JOBS_STREAM, names.EVENTS_STREAM)])

            await eventually("the restarted server current again", rejoined, 40, interval=0.2)
            times["rejoined"] = time.monotonic()
            await eventually("chats after the restart", lambda: admitted_since(times["restarted"]) >= 10, 40)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await nc.close()
    return outcomes, times, leader


async def records(url: str, dsn: str, ids: list[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Each accepted request's terminal events, and its status once the database has it."""
    nc = await nats.connect(server_urls(url))
    try:
        events = await terminal_events(nc.jetstream())
    finally:
        await nc.close()

    async def all_stored() -> dict[str, str] | None:
        stored = await persisted(dsn, ids)
        return stored if all(stored.get(rid) in TERMINAL for rid in ids) else None

    try:
        stored = await eventually("every accepted request in the database", all_stored, 20, interval=0.5)
    except TimeoutError:
        stored = await persisted(dsn, ids)
    return events, stored
