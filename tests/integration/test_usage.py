"""GET /api/usage and /api/usage.csv: the API as a process, a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import secrets
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from database import accounts, schema
from stack.servers import EmbeddedPostgres, NatsServer
from tests.helpers import API_KEY, base_env, start_api

D1 = dt.datetime(2025, 3, 10, tzinfo=dt.UTC)
D2 = dt.datetime(2025, 3, 11, tzinfo=dt.UTC)
M1, M2 = "model-one", "model-two"
FORMULA = '=HYPERLINK("http://evil.example","x")'


@dataclass(frozen=True)
class Req:
    request_id: str
    user: str | None  # None: a service key's request
    model: str
    status: str
    at: dt.datetime  # finished_at; created_at a little earlier
    prompt: int | None
    completion: int | None
    purpose: str = "chat"
    finished: bool = True
    finish_reason: str | None = None

    @property
    def tokens(self) -> tuple[int, int]:
        return self.prompt or 0, self.completion or 0


REQUESTS = [
    Req("a1", "alice", M1, "completed", D1 + dt.timedelta(hours=10), 10, 20, finish_reason="stop"),
    Req("a2", "alice", M1, "cancelled", D1 + dt.timedelta(hours=11), 5, 3, finish_reason="cancelled"),
    Req("a3", "alice", M2, "failed", D2 + dt.timedelta(hours=9), 7, None),
    Req(
        "a4",
        "alice",
        M1,
        "completed",
        D2 + dt.timedelta(hours=12),
        30,
        8,
        purpose="title",
        finish_reason="stop",
    ),
    # Still running: counted at its created_at, tokens unknown.
    Req("a5", "alice", M2, "accepted", D2 + dt.timedelta(hours=13), None, None, finished=False),
    Req("b1", "bob", M2, "completed", D1 + dt.timedelta(hours=15), 100, 200, finish_reason="length"),
    Req("b2", "bob", M1, "completed", D2 + dt.timedelta(hours=16), 50, 60, finish_reason=FORMULA),
    Req("b3", "bob", M1, "cancelled", D2 + dt.timedelta(hours=23, minutes=59), 40, 0, finish_reason="-1+1"),
    Req("s1", None, M1, "completed", D1 + dt.timedelta(hours=1), 1, 1, finish_reason="stop"),
]


@dataclass
class Env:
    url: str
    dsn: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def env(nats_server: NatsServer) -> Iterator[Env]:
    # Outside pytest's basetemp: a concurrent pytest run may remove or chmod that one while
    # PostgreSQL (its own system user when run as root) still works in it.
    root = Path(tempfile.mkdtemp(prefix="chatq-usage-"))
    pg = EmbeddedPostgres(root / "pg")
    api = None
    try:
        dsn = pg.start()
        asyncio.run(_seed(dsn))
        full = base_env(
            nats_server.url,
            root / "home",
            DATABASE_URL=dsn,
            JWT_SECRET=secrets.token_urlsafe(36),  # 48 characters
            INFERENCE_ENGINE="synthetic",
        )
        api, url = start_api(full, root / "logs")
        tokens = {}
        for name, password in (("alice", "alice-secret"), ("bob", "bob-secret"), ("root", "root-secret")):
            r = httpx.post(f"{url}/api/auth/login", json={"username": name, "password": password}, timeout=30)
            assert r.status_code == 200, (r.status_code, r.text, api.tail())
            tokens[name] = r.json()["access_token"]
        yield Env(url, dsn, tokens)
    finally:
        if api is not None:
            api.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _seed(dsn: str) -> None:
    await schema.migrate_url(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        ids = {
            "alice": (await accounts.create_user(conn, "alice", "alice-secret")).id,
            "bob": (await accounts.create_user(conn, "bob", "bob-secret")).id,
            "root": (await accounts.create_user(conn, "root", "root-secret", role="admin")).id,
        }
        for r in REQUESTS:
            await conn.execute(
                "INSERT INTO requests (request_id, model, status, created_at, finished_at, finish_reason, "
                "ttft_ms, duration_ms, user_id, purpose, prompt_tokens, completion_tokens) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    r.request_id,
                    r.model,
                    r.status,
                    r.at - dt.timedelta(seconds=3),
                    r.at if r.finished else None,
                    r.finish_reason,
                    12.5 if r.finished else None,
                    3000.25 if r.finished else None,
                    None if r.user is None else ids[r.user],
                    r.purpose,
                    r.prompt,
                    r.completion,
                ),
            )


def get(env: Env, who: str, path: str = "/api/usage", **params: Any) -> httpx.Response:
    token = API_KEY if who == "service" else env.tokens[who]
    return httpx.get(env.url + path, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def usage(env: Env, who: str, **params: Any) -> dict[str, Any]:
    r = get(env, who, **params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def totals(reqs: list[Req]) -> dict[str, int]:
    prompt = sum(r.tokens[0] for r in reqs)
    completion = sum(r.tokens[1] for r in reqs)
    return {
        "requests": len(reqs),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def ids(body: dict[str, Any]) -> set[str]:
    return {row["request_id"] for row in body["rows"]}


def of(*names: str) -> list[Req]:
    return [r for r in REQUESTS if r.request_id in names]


ALICE = of("a1", "a2", "a3", "a4", "a5")
BOB = of("b1", "b2", "b3")


def test_a_user_sees_their_own_rows(env: Env) -> None:
    body = usage(env, "alice")
    assert ids(body) == {"a1", "a2", "a3", "a4", "a5"}
    # Cancelled and failed requests count the tokens they used; unknown counts as 0.
    assert (
        body["totals"]
        == totals(ALICE)
        == {
            "requests": 5,
            "prompt_tokens": 52,
            "completion_tokens": 31,
            "total_tokens": 83,
        }
    )
    assert body["group_by"] is None and body["since"] is None and body["until"] is None
    assert body["truncated"] is False
    # The columns a page shows: every key of a row once, with a heading; the request id last.
    names = [c["name"] for c in body["columns"]]
    assert sorted(names) == sorted(body["rows"][0]) and names[-1] == "request_id"
    assert body["columns"][0] == {"name": "created_at", "label": "Started", "kind": "time"}
    assert all(c["label"] and c["kind"] in ("time", "number", "text") for c in body["columns"])
    # Naming themselves is fine; naming someone else is as if there were no such user.
    assert ids(usage(env, "alice", user="alice")) == ids(body)
    r = get(env, "alice", user="bob")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"
    assert ids(usage(env, "bob")) == {"b1", "b2", "b3"}


def test_row_values(env: Env) -> None:
    rows = {row["request_id"]: row for row in usage(env, "alice")["rows"]}
    assert list(rows["a3"]) == [
        "request_id", "created_at", "finished_at", "user", "model", "purpose", "status", "finish_reason",
        "prompt_tokens", "completion_tokens", "total_tokens", "ttft_ms", "latency_ms",
    ]  # fmt: skip
    assert rows["a3"] == {
        "request_id": "a3",
        "created_at": "2025-03-11T08:59:57Z",
        "finished_at": "2025-03-11T09:00:00Z",
        "user": "alice",
        "model": M2,
        "purpose": "chat",
        "status": "failed",
        "finish_reason": None,
        "prompt_tokens": 7,
        "completion_tokens": None,
        "total_tokens": 7,
        "ttft_ms": 12.5,
        "latency_ms": 3000.25,
    }
    assert rows["a4"]["purpose"] == "title"
    assert rows["a5"]["finished_at"] is None and rows["a5"]["total_tokens"] == 0
    # Newest first (a running request at its created_at).
    assert [row["request_id"] for row in usage(env, "alice")["rows"]] == ["a5", "a4", "a3", "a2", "a1"]


def test_an_admin_sees_everyone_and_filters(env: Env) -> None:
    for who in ("root", "service"):  # a service key acts as an admin
        body = usage(env, who)
        assert ids(body) == {r.request_id for r in REQUESTS}
        assert body["totals"] == totals(REQUESTS)
    users = {row["request_id"]: row["user"] for row in usage(env, "root")["rows"]}
    assert users["s1"] is None and users["b1"] == "bob"

    assert ids(usage(env, "root", user="bob")) == {"b1", "b2", "b3"}
    assert usage(env, "root", user="bob")["totals"] == totals(BOB)
    r = get(env, "root", user="nobody")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    m2 = usage(env, "root", model=M2)
    assert ids(m2) == {"a3", "a5", "b1"} and m2["totals"] == totals(of("a3", "a5", "b1"))
    assert ids(usage(env, "root", model=M1, user="alice")) == {"a1", "a2", "a4"}
    assert usage(env, "root", model="no-such-model")["rows"] == []

    # A bare date: since from its start, until through its end.
    day2 = usage(env, "root", since="2025-03-11")
    assert ids(day2) == {"a3", "a4", "a5", "b2", "b3"}
    assert day2["since"] == "2025-03-11T00:00:00Z" and day2["until"] is None
    day1 = usage(env, "root", until="2025-03-10")
    assert ids(day1) == {"a1", "a2", "b1", "s1"} and day1["until"] == "2025-03-11T00:00:00Z"
    assert ids(usage(env, "root", since="2025-03-10", until="2025-03-10")) == ids(day1)
    # Date-times: since inclusive, until exclusive; no zone means UTC; offsets are honoured.
    window = usage(env, "root", since="2025-03-10T10:00:00Z", until="2025-03-11T09:00:00")
    assert ids(window) == {"a1", "a2", "b1"} and window["totals"] == totals(of("a1", "a2", "b1"))
    shifted = usage(env, "root", since="2025-03-10T12:00:00+02:00", until="2025-03-10T13:00:00+02:00")
    assert ids(shifted) == {"a1"}
    # A request still running counts at its created_at.
    assert ids(usage(env, "root", since="2025-03-11T12:59:00Z", until="2025-03-11T13:00:00Z")) == {"a5"}
    # A user's time filter still sees only their rows.
    assert ids(usage(env, "bob", since="2025-03-11")) == {"b2", "b3"}


def test_limit(env: Env) -> None:
    body = usage(env, "root", limit=2)
    assert len(body["rows"]) == 2 and body["truncated"] is True
    assert body["totals"] == totals(REQUESTS)  # totals never stop at the limit
    assert usage(env, "root", limit=10_000)["truncated"] is False


def _expected_groups(reqs: list[Req], key: str) -> list[dict[str, Any]]:
    groups: dict[Any, list[Req]] = defaultdict(list)
    for r in reqs:
        value = {
            "day": lambda r: r.at.date().isoformat(),
            "user": lambda r: r.user,
            "model": lambda r: r.model,
        }[key](r)
        groups[value].append(r)
    out = []
    for value in sorted(groups, key=lambda v: (v is None, v or "")):
        members = groups[value]
        out.append(
            {
                key: value,
                **totals(members),
                "cancelled": sum(r.status == "cancelled" for r in members),
                "failed": sum(r.status == "failed" for r in members),
            }
        )
    return out


@pytest.mark.parametrize("key", ["day", "user", "model"])
def test_group_by(env: Env, key: str) -> None:
    body = usage(env, "root", group_by=key)
    assert body["group_by"] == key
    assert body["rows"] == _expected_groups(REQUESTS, key)
    assert [c["name"] for c in body["columns"]] == list(body["rows"][0])
    assert body["columns"][1] == {"name": "requests", "label": "Requests", "kind": "number"}
    assert body["totals"] == totals(REQUESTS)
    mine = usage(env, "alice", group_by=key)
    assert mine["rows"] == _expected_groups(ALICE, key)
    assert mine["totals"] == totals(ALICE)


def test_group_by_day_sums(env: Env) -> None:
    """The same figures written out, so a mistake in both the code and the helper shows."""
    rows = usage(env, "root", group_by="day")["rows"]
    assert rows == [
        {"day": "2025-03-10", "requests": 4, "prompt_tokens": 116, "completion_tokens": 224,
         "total_tokens": 340, "cancelled": 1, "failed": 0},
        {"day": "2025-03-11", "requests": 5, "prompt_tokens": 127, "completion_tokens": 68,
         "total_tokens": 195, "cancelled": 1, "failed": 1},
    ]  # fmt: skip
    bob = usage(env, "root", group_by="model", user="bob", since="2025-03-11")["rows"]
    assert bob == [
        {"model": M1, "requests": 2, "prompt_tokens": 90, "completion_tokens": 60, "total_tokens": 150,
         "cancelled": 1, "failed": 0},
    ]  # fmt: skip


def _cell(value: Any) -> str:
    """What a JSON value looks like in the CSV."""
    if value is None:
        return ""
    text = str(value)
    return "'" + text if isinstance(value, str) and text[:1] in ("=", "+", "-", "@") else text


def _csv(env: Env, who: str, **params: Any) -> list[list[str]]:
    r = get(env, who, "/api/usage.csv", **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = r.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="chatq-usage-') and disposition.endswith('.csv"')
    assert r.content.endswith(b"\r\n")  # RFC 4180 line ends
    return list(csv.reader(io.StringIO(r.text, newline="")))


@pytest.mark.parametrize(
    ("who", "params"),
    [
        ("root", {}),
        ("alice", {}),
        ("root", {"user": "bob", "since": "2025-03-11"}),
        ("root", {"model": M1, "limit": 3}),
        ("root", {"group_by": "day"}),
        ("bob", {"group_by": "model"}),
        ("root", {"group_by": "user"}),
    ],
)
def test_csv_matches_json(env: Env, who: str, params: dict[str, Any]) -> None:
    body = usage(env, who, **params)
    lines = _csv(env, who, **params)
    assert lines[0] == list(body["rows"][0])  # the header line first: the JSON's keys
    assert lines[1:] == [[_cell(v) for v in row.values()] for row in body["rows"]]
    assert len(lines) - 1 == len(body["rows"]) > 0


def test_csv_neutralises_formulas(env: Env) -> None:
    lines = _csv(env, "root", user="bob")
    column = lines[0].index("finish_reason")
    reasons = {line[0]: line[column] for line in lines[1:]}
    assert reasons["b2"] == "'" + FORMULA  # a spreadsheet shows it as text, never runs it
    assert reasons["b3"] == "'-1+1"
    assert reasons["b1"] == "length"
    # The JSON answer is data, not a spreadsheet: the value as stored.
    rows = {row["request_id"]: row for row in usage(env, "root", user="bob")["rows"]}
    assert rows["b2"]["finish_reason"] == FORMULA
    # Quotes and commas in a value survive the round trip (RFC 4180 quoting).
    raw = get(env, "root", "/api/usage.csv", user="bob").text
    assert '"\'=HYPERLINK(""http://evil.example"",""x"")"' in raw


def test_csv_without_limit_has_every_row(env: Env) -> None:
    assert len(_csv(env, "root")) - 1 == len(REQUESTS)
    assert len(_csv(env, "alice")) - 1 == len(ALICE)
    r = get(env, "alice", "/api/usage.csv", user="bob")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "yesterday"}, "since"),
        ({"since": "2025-13-01"}, "since"),
        ({"until": "2025-03-10T25:00"}, "until"),
        ({"since": "2025-03-11", "until": "2025-03-09"}, "until"),
        ({"group_by": "week"}, "group_by"),
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "many"}, "limit"),
    ],
)
@pytest.mark.parametrize("path", ["/api/usage", "/api/usage.csv"])
def test_bad_parameters(env: Env, params: dict[str, str], param: str, path: str) -> None:
    r = get(env, "alice", path, **params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert param in error["message"]


def test_needs_credentials(env: Env) -> None:
    assert httpx.get(env.url + "/api/usage", timeout=30).status_code == 401
    assert httpx.get(env.url + "/api/usage.csv", timeout=30).status_code == 401


def test_csv_streams_many_batches(env: Env) -> None:
    """More rows than one cursor batch (500): every row arrives once, in the JSON's order."""
    count = 1203

    async def add() -> None:
        async with await psycopg.AsyncConnection.connect(env.dsn, autocommit=True) as conn:
            user = await accounts.create_user(conn, "bulk", "bulk-secret")
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO requests (request_id, model, status, created_at, finished_at, user_id, "
                    "prompt_tokens, completion_tokens) "
                    "VALUES (%s, 'bulk-model', 'completed', %s, %s, %s, %s, %s)",
                    [
                        (
                            f"bulk-{i:05d}",
                            D1 - dt.timedelta(minutes=i),
                            D1 - dt.timedelta(minutes=i),
                            user.id,
                            i,
                            1,
                        )
                        for i in range(count)
                    ],
                )

    async def remove() -> None:
        async with await psycopg.AsyncConnection.connect(env.dsn, autocommit=True) as conn:
            await conn.execute("DELETE FROM requests WHERE model = 'bulk-model'")
            await conn.execute("DELETE FROM users WHERE username = 'bulk'")

    asyncio.run(add())
    try:
        lines = _csv(env, "root", user="bulk")
        body = usage(env, "root", user="bulk", limit=10_000)
        assert len(lines) - 1 == count == len(body["rows"]) == body["totals"]["requests"]
        assert [line[0] for line in lines[1:]] == [f"bulk-{i:05d}" for i in range(count)]
        assert lines[1:] == [[_cell(v) for v in row.values()] for row in body["rows"]]
        column = lines[0].index("prompt_tokens")
        assert (
            sum(int(line[column]) for line in lines[1:])
            == body["totals"]["prompt_tokens"]
            == sum(range(count))
        )
    finally:
        asyncio.run(remove())
