"""Usage: who used how many tokens, when, on which model — as JSON or as a CSV download.

- `GET /api/usage` answers rows (one per request, or one per day / user / model with
  `group_by`) and totals over everything that matched.
- `GET /api/usage.csv` answers the same rows as a CSV file, streamed from a server-side
  cursor in batches, so an export of a year does not sit in the API's memory.

A user sees their own requests; an admin (a service key acts as one) sees everyone's and
may pick a user with `user=`. A request counts at its `finished_at`, or its `created_at`
while it has not finished. `since` is inclusive, `until` exclusive; a bare date for
`until` means the end of that day. Times without a zone are UTC. Cancelled and failed
requests count the tokens they really used (unknown counts as 0).

Every SQL statement here is put together from fixed fragments; what the caller sends only
ever travels as a parameter.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.response import Stream
from psycopg import sql

from api.accounts import json_response
from api.auth import principal_of
from api.services import Services
from chatq.errors import InvalidRequest, NotFound
from database import accounts
from database.accounts import AccountError

GroupBy = Literal["day", "user", "model"]
GROUPS: tuple[GroupBy, ...] = ("day", "user", "model")
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
CSV_BATCH = 500

# One request's row, in this order in both answers.
ROW_COLUMNS = (
    "request_id",
    "created_at",
    "finished_at",
    "user",
    "model",
    "purpose",
    "status",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "ttft_ms",
    "latency_ms",
)
SUM_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cancelled", "failed")
TOTAL_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")

ColumnKind = Literal["time", "number", "text"]
# Each column's heading and how a page formats it; the operator page renders these.
_COLUMN_INFO: dict[str, tuple[str, ColumnKind]] = {
    "request_id": ("Request", "text"),
    "created_at": ("Started", "time"),
    "finished_at": ("Finished", "time"),
    "user": ("User", "text"),
    "model": ("Model", "text"),
    "purpose": ("Purpose", "text"),
    "status": ("Status", "text"),
    "finish_reason": ("Finish", "text"),
    "prompt_tokens": ("Prompt tokens", "number"),
    "completion_tokens": ("Completion tokens", "number"),
    "total_tokens": ("Total tokens", "number"),
    "ttft_ms": ("TTFT ms", "number"),
    "latency_ms": ("Latency ms", "number"),
    "requests": ("Requests", "number"),
    "cancelled": ("Cancelled", "number"),
    "failed": ("Failed", "number"),
    "day": ("Day (UTC)", "text"),
}


def shown_columns(columns: Sequence[str]) -> list[dict[str, str]]:
    """The columns a table shows, in order: name, label and kind (the request id, long, last)."""
    order = [c for c in columns if c != "request_id"] + [c for c in columns if c == "request_id"]
    return [{"name": c, "label": _COLUMN_INFO[c][0], "kind": _COLUMN_INFO[c][1]} for c in order]


# When a request counts: when it finished, or when it was accepted while still running.
_AT = sql.SQL("COALESCE(r.finished_at, r.created_at)")
_ROWS = sql.SQL(
    "SELECT r.request_id, r.created_at, r.finished_at, u.username, r.model, r.purpose, r.status, "
    "r.finish_reason, r.prompt_tokens, r.completion_tokens, "
    "COALESCE(r.prompt_tokens, 0) + COALESCE(r.completion_tokens, 0), r.ttft_ms, r.duration_ms "
    "FROM requests r LEFT JOIN users u ON u.id = r.user_id "
    "WHERE {where} ORDER BY {at} DESC NULLS LAST, r.request_id DESC"
)
_SUMS = sql.SQL(
    "count(*), "
    "COALESCE(sum(COALESCE(r.prompt_tokens, 0)), 0)::bigint, "
    "COALESCE(sum(COALESCE(r.completion_tokens, 0)), 0)::bigint, "
    "COALESCE(sum(COALESCE(r.prompt_tokens, 0) + COALESCE(r.completion_tokens, 0)), 0)::bigint"
)
_GROUPED = sql.SQL(
    "SELECT {key}, {sums}, "
    "count(*) FILTER (WHERE r.status = 'cancelled'), count(*) FILTER (WHERE r.status = 'failed') "
    "FROM requests r LEFT JOIN users u ON u.id = r.user_id "
    "WHERE {where} GROUP BY {group} ORDER BY {order}"
)
_TOTALS = sql.SQL("SELECT {sums} FROM requests r WHERE {where}")
# The group key's expression, what it is grouped by, and the order of the groups.
_DAY = sql.SQL("({at} AT TIME ZONE 'UTC')::date").format(at=_AT)
_GROUP_SQL: dict[GroupBy, tuple[sql.Composable, sql.Composable, sql.Composable]] = {
    "day": (_DAY, _DAY, sql.SQL("1 NULLS LAST")),
    "user": (sql.SQL("u.username"), sql.SQL("r.user_id, u.username"), sql.SQL("1 NULLS LAST, r.user_id")),
    "model": (sql.SQL("r.model"), sql.SQL("r.model"), sql.SQL("1")),
}
# A spreadsheet runs a cell starting with one of these as a formula (OWASP's list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# "+01:00" sent unencoded in a query string arrives as " 01:00".
_UNENCODED_PLUS = re.compile(r"(T\d[\d:.]*) (\d\d(:?\d\d)?)$")


@dataclass(frozen=True)
class Query:
    """What to count, checked: whose (None: everyone), which model, which time range."""

    user_id: int | None
    model: str | None
    since: dt.datetime | None
    until: dt.datetime | None
    group_by: GroupBy | None
    limit: int | None  # None: every row (the CSV without limit=)

    def where(self) -> tuple[sql.Composable, list[object]]:
        parts: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[object] = []
        if self.user_id is not None:
            parts.append(sql.SQL("r.user_id = %s"))
            params.append(self.user_id)
        if self.model is not None:
            parts.append(sql.SQL("r.model = %s"))
            params.append(self.model)
        if self.since is not None:
            parts.append(sql.SQL("{at} >= %s").format(at=_AT))
            params.append(self.since)
        if self.until is not None:
            parts.append(sql.SQL("{at} < %s").format(at=_AT))
            params.append(self.until)
        return sql.SQL(" AND ").join(parts), params

    def statement(self) -> tuple[sql.Composed, list[object]]:
        """The rows' query: one per request, or one per group."""
        where, params = self.where()
        if self.group_by is None:
            query = _ROWS.format(where=where, at=_AT)
            if self.limit is not None:
                query = sql.SQL("{} LIMIT %s").format(query)
                params.append(self.limit)
            return query, params
        key, group, order = _GROUP_SQL[self.group_by]
        return _GROUPED.format(key=key, sums=_SUMS, where=where, group=group, order=order), params

    def totals(self) -> tuple[sql.Composed, list[object]]:
        where, params = self.where()
        return _TOTALS.format(sums=_SUMS, where=where), params

    def columns(self) -> tuple[str, ...]:
        return ROW_COLUMNS if self.group_by is None else (self.group_by, *SUM_COLUMNS)


def _timestamp(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _value(value: object) -> object:
    """A database value as both answers show it: times in UTC with a Z, days as YYYY-MM-DD."""
    if isinstance(value, dt.datetime):
        return _timestamp(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _row(columns: Sequence[str], record: Sequence[object]) -> dict[str, object]:
    return {name: _value(value) for name, value in zip(columns, record, strict=True)}


def csv_cell(value: object) -> object:
    """A value as a CSV cell: text a spreadsheet would run as a formula gets a leading '."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# --- the query string ---------------------------------------------------------------------------


def _param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def parse_time(value: str, name: str, *, end: bool = False) -> dt.datetime:
    """An ISO 8601 date or date-time as an aware UTC time; a date as `until` means its end."""
    try:
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            parsed = dt.datetime.fromisoformat(_UNENCODED_PLUS.sub(r"\1+\2", value))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            return parsed.astimezone(dt.UTC)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        if end:
            return dt.datetime.max.replace(tzinfo=dt.UTC) if day == dt.date.max else start + dt.timedelta(1)
        return start
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{name} must be an ISO 8601 date or date-time (2025-01-31 or 2025-01-31T12:00:00Z), "
            f"not {value!r}",
            param=name,
        ) from None


def parse_limit(value: str | None, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}", param="limit")
    return limit


async def read_query(
    request: Request,  # type: ignore[type-arg]
    conn: psycopg.AsyncConnection[Any],
    *,
    default_limit: int | None,
) -> Query:
    """The caller's filters, checked, and whose rows they may see."""
    params = request.query_params
    group = _param(params, "group_by")
    if group is not None and group not in GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}, not {group!r}", param="group_by")
    since_raw, until_raw = _param(params, "since"), _param(params, "until")
    since = parse_time(since_raw, "since") if since_raw else None
    until = parse_time(until_raw, "until", end=True) if until_raw else None
    if since is not None and until is not None and until < since:
        raise InvalidRequest("until is before since", param="until")
    limit = parse_limit(_param(params, "limit"), default_limit)

    caller = principal_of(request)
    username = _param(params, "user")
    user_id: int | None
    if caller.is_admin:
        user_id = None
        if username is not None:
            try:
                user_id = await accounts.user_id_of(conn, username)
            except AccountError:
                raise NotFound(f"no user {username!r}", param="user") from None
    else:
        # Someone else's name answers as if there were no such user: nothing leaks.
        user_id = caller.require_account()
        if username is not None and username != caller.username:
            raise NotFound(f"no user {username!r}", param="user")
    group_by: GroupBy | None = group
    return Query(user_id, _param(params, "model"), since, until, group_by, limit)


# --- the routes -----------------------------------------------------------------------------------


@get("/api/usage")
async def usage(request: Request, services: NamedDependency[Services]) -> Response[bytes]:  # type: ignore[type-arg]
    """Usage rows and totals as JSON, rows and totals from one snapshot."""
    async with services.db(snapshot=True) as conn:
        query = await read_query(request, conn, default_limit=DEFAULT_LIMIT)
        statement, params = query.statement()
        cur = await conn.execute(statement, params)
        records = await cur.fetchall()
        statement, params = query.totals()
        cur = await conn.execute(statement, params)
        sums = await cur.fetchone()
    columns = query.columns()
    rows = [_row(columns, record) for record in records]
    assert sums is not None
    totals = dict(zip(TOTAL_COLUMNS, sums, strict=True))
    body: dict[str, object] = {
        "columns": shown_columns(columns),
        "rows": rows,
        "totals": totals,
        "group_by": query.group_by,
        "since": _timestamp(query.since),
        "until": _timestamp(query.until),
    }
    if query.group_by is None:
        # The rows stop at `limit`; the totals never do.
        body["truncated"] = query.limit is not None and len(rows) < totals["requests"]
    return json_response(body)


@get("/api/usage.csv", opt={"media": ["text/csv"]})
async def usage_csv(request: Request, services: NamedDependency[Services]) -> Stream:  # type: ignore[type-arg]
    """The same rows as a CSV download (every row unless limit= is given)."""
    async with services.db() as conn:
        query = await read_query(request, conn, default_limit=None)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Stream(
        _csv_lines(services, query),
        media_type="text/csv",  # Litestar adds "; charset=utf-8"
        headers={
            "Content-Disposition": f'attachment; filename="chatq-usage-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


async def _csv_lines(services: Services, query: Query) -> AsyncIterator[bytes]:
    """The header line, then the rows a batch at a time from a server-side cursor."""
    columns = query.columns()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: CRLF, quotes where needed
    writer.writerow(columns)
    yield buffer.getvalue().encode()
    statement, params = query.statement()
    async with services.db(snapshot=True) as conn:  # a named cursor lives in a transaction
        cur = conn.cursor(name="chatq_usage_csv")
        try:
            await cur.execute(statement, params)
            while True:
                batch = await cur.fetchmany(CSV_BATCH)
                if not batch:
                    break
                buffer.seek(0)
                buffer.truncate()
                for record in batch:
                    writer.writerow([csv_cell(_value(value)) for value in record])
                yield buffer.getvalue().encode()
        finally:
            await cur.close()


ROUTES = [usage, usage_csv]
