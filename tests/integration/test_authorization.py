"""Authorization, route by route (OWASP API1 object level, API3 property level, API5
function level): one table, ROWS, with a row for every HTTP route of the app and what each
of five callers gets there: nobody, user A (who owns every object a path names), another
user B, an admin and a service key. Tried against one real stack (NATS, PostgreSQL, Redis,
persistence, a synthetic worker). A route the app serves without a row fails the suite;
so does an answer to anyone but A that carries A's conversation, and an answer to B or to
nobody that carries A's e-mail or key."""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.routes import HTTPRoute

from api.app import create_app
from chatq.settings import load as load_settings
from tests.helpers import (
    API_KEY,
    JWT_SECRET,
    Account,
    accounts_stack,
    auth,
    create_account,
    login,
    no_rate_limits,
    wait_until,
)

MODEL = "authz-model"
CALLERS = ("anonymous", "owner", "other", "admin", "service")
# What A keeps: nobody else may read the first two; the e-mail and the key prefix only A and
# the admins; the key itself nobody once it was shown at its creation (nor any password hash,
# key digest, service key or the JWT secret).
TITLE = "A's private title q7f3c"
SAID = "A's private question 91bez"
EMAIL = "a-private-3kd9@example.test"
CODES = {401: "invalid_api_key", 404: "not_found"}
ERROR_FIELDS = {"type", "code", "message", "request_id"}


@dataclass
class World:
    """The stack's URL, the callers' credentials, and A's things the paths name."""

    url: str
    accounts: dict[str, Account]
    headers: dict[str, dict[str, str]]
    conversation: str = ""
    key_id: int = 0
    key_prefix: str = ""
    key: str = ""
    worker: str = ""
    made: Iterator[int] = field(default_factory=itertools.count)
    fresh: list[tuple[str, str]] = field(default_factory=list)  # A's things made for one request

    def send(self, caller: str, method: str, path: str, body: object = None) -> httpx.Response:
        return httpx.request(method, self.url + path, json=body, headers=self.headers[caller], timeout=60)

    def new_conversation(self) -> str:
        """A new conversation of A's, with A's private title."""
        created = self.send("owner", "POST", "/api/conversations", {"title": TITLE})
        assert created.status_code == 201, created.text
        conversation_id: str = created.json()["id"]
        self.fresh.append(("conversation", conversation_id))
        return conversation_id

    def new_key(self) -> dict[str, Any]:
        """A new API key of A's: its id, prefix and the key."""
        created = self.send("owner", "POST", "/api/keys", {"name": "authz"})
        assert created.status_code == 201, created.text
        key: dict[str, Any] = created.json()
        self.fresh.append(("key", str(key["id"])))
        return key

    def relogin(self, caller: str) -> None:
        """A new session for `caller`, whose tokens a logout has ended."""
        account = self.accounts[caller]
        self.headers[caller] = login(self.url, account.username, account.password)

    def value(self, name: str, fresh: bool) -> str:
        """What a path parameter (or query placeholder) names: A's things, or else a real one."""
        if name == "conversation_id":
            return self.new_conversation() if fresh else self.conversation
        if name == "key_id":
            return str(self.new_key()["id"] if fresh else self.key_id)
        owner = self.accounts["owner"]
        known = {"user_id": str(owner.id), "username": owner.username, "worker_id": self.worker}
        known |= {"model_id": MODEL, "file_path": "app.js", "path": "no-such-page"}
        return known[name]

    def fill(self, template: str, fresh: bool = False) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: self.value(m.group(1), fresh), template)


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # as the app's route table spells it; its {parameters} name A's things
    # One outcome per caller, in CALLERS' order: a status, "400:code" when the code matters
    # beyond the status's usual one, "200|404" when either is right.
    expect: str
    body: object = None  # JSON, or a function of the World that makes it
    query: str = ""
    fresh: bool = False  # the route changes or ends what its path names: a new one each time
    ends_session: bool = False

    def outcome(self, caller: str) -> list[tuple[int, str | None]]:
        tokens = self.expect.split()
        assert len(tokens) == len(CALLERS), self
        choices = tokens[CALLERS.index(caller)].split("|")
        return [(int(status), code or None) for status, _, code in (c.partition(":") for c in choices)]

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}" + (f"?{self.query}" if self.query else "")


def _chat_into_a_conversation(world: World) -> dict[str, object]:
    return {"message": "hi", "conversation_id": world.new_conversation(), "max_tokens": 2}


def _new_user(world: World) -> dict[str, object]:
    return {"username": f"authz-made-{next(world.made)}", "password": "pw-authz-made-12345"}


def _owners_login(world: World) -> dict[str, object]:
    owner = world.accounts["owner"]
    return {"username": owner.username, "password": owner.password}


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PUBLIC = "200 200 200 200 200"
ANY_KEY = "401 200 200 200 200"
ADMIN = "401 403 403 200 200"
ACCOUNT = "401 200 200 200 403"
OWNER = "401 200 404 404 403"  # A's conversation: for everyone else there is no such thing

ROWS = [
    # Row(method, path, "anonymous owner other admin service", body): see Row.expect
    Row("POST", "/v1/chat/completions", ANY_KEY, CHAT),
    Row("POST", "/v1/completions", ANY_KEY, {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    Row("POST", "/api/chat", OWNER, _chat_into_a_conversation),
    Row("GET", "/api/models", ANY_KEY),
    Row("GET", "/v1/models", ANY_KEY),
    Row("GET", "/v1/models/{model_id}", ANY_KEY),
    Row(
        "POST",
        "/api/admin/workers/{worker_id}/model",  # a profile that is not there: nothing switches
        "401 403 403 400:unknown_profile 400:unknown_profile",
        {"profile": "no-such-profile"},
    ),
    Row("POST", "/api/auth/logout", "401 204 204 204 400:not_a_token", ends_session=True),
    Row("POST", "/api/auth/login", PUBLIC, _owners_login),
    Row("GET", "/api/auth/verify", ANY_KEY),
    Row("GET", "/api/keys", ACCOUNT),
    Row("POST", "/api/keys", "401 201 201 201 403", {"name": "authz"}),
    Row("DELETE", "/api/keys/{key_id}", "401 204 404 204 204", fresh=True),
    Row("GET", "/api/users", ADMIN),
    Row("POST", "/api/users", "401 403 403 201 201", _new_user),
    Row("PATCH", "/api/users/{user_id}", ADMIN, {"disabled": False}),
    Row("GET", "/api/users/{user_id}/keys", ADMIN),
    Row("GET", "/api/me/settings", ACCOUNT),
    Row("PUT", "/api/me/settings", ACCOUNT, {}),
    Row("POST", "/api/conversations", "401 201 201 201 403", {"title": "a conversation"}),
    Row("GET", "/api/conversations", ACCOUNT),
    Row("GET", "/api/conversations/{conversation_id}", OWNER),
    Row("PATCH", "/api/conversations/{conversation_id}", OWNER, {"title": "renamed"}, fresh=True),
    Row("DELETE", "/api/conversations/{conversation_id}", "401 204 404 404 403", fresh=True),
    Row("GET", "/api/usage", ANY_KEY),  # (B's own rows only: A's username is not in them)
    Row("GET", "/api/usage", "401 200 404 200 200", query="user={username}"),
    Row("GET", "/api/usage.csv", ANY_KEY),
    Row("GET", "/api/usage.csv", "401 200 404 200 200", query="user={username}"),
    Row("GET", "/api/admin/workers", ADMIN),
    Row("GET", "/api/admin/status", ADMIN),
    Row("GET", "/health", PUBLIC),
    Row("GET", "/metrics", PUBLIC),
    Row("GET", "/asyncapi.json", PUBLIC),
    Row("GET", "/asyncapi", PUBLIC),
    Row("GET", "/schema", PUBLIC),
    Row("GET", "/schema/openapi.json", PUBLIC),
    Row("GET", "/schema/{path}", "404 404 404 404 404"),
    # The web page: the same static shell for everyone; its data comes from the API above.
    Row("GET", "/", PUBLIC),
    Row("GET", "/login", PUBLIC),
    Row("GET", "/admin", PUBLIC),
    Row("GET", "/c/{conversation_id}", PUBLIC),
    Row("GET", "/assets/{file_path}", PUBLIC),
    Row("HEAD", "/assets/{file_path}", PUBLIC),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("authz")
    dist = _web_bundle(root / "dist")
    with accounts_stack(
        root,
        MODEL,
        CHATQ_WEB_DIST=str(dist),
        SYNTH_TOKENS_PER_S="20000",
        SYNTH_TTFT_MS="1",
        **no_rate_limits("user", "admin"),
    ) as stack:
        yield _populated(stack.url)


def _web_bundle(dist: Path) -> Path:
    """A stand-in for the built web interface (the real one needs Node)."""
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>chatq</title><script src=/assets/app.js>")
    (dist / "assets" / "app.js").write_text("document.title = 'chatq';\n")
    return dist


def _populated(url: str) -> World:
    """The callers, and A's things: a conversation with a turn, a key, an e-mail."""
    accounts = {
        "owner": create_account(url, "authz-owner"),
        "other": create_account(url, "authz-other"),
        "admin": create_account(url, "authz-admin", "admin"),
    }
    headers = {"anonymous": {}, "service": auth()}
    headers |= {caller: login(url, a.username, a.password) for caller, a in accounts.items()}
    world = World(url, accounts, headers)
    email = world.send("service", "PATCH", f"/api/users/{accounts['owner'].id}", {"email": EMAIL})
    assert email.status_code == 200, email.text
    world.conversation = world.new_conversation()
    turn = world.send("owner", "POST", "/api/chat", {"message": SAID, "conversation_id": world.conversation})
    assert turn.status_code == 200, turn.text
    wait_until(
        "A's turn stored",
        lambda: SAID in world.send("owner", "GET", f"/api/conversations/{world.conversation}").text,
        timeout=30,
    )
    key = world.new_key()
    world.key_id, world.key_prefix, world.key = key["id"], key["prefix"], key["key"]
    workers = world.send("service", "GET", "/api/admin/workers").json()["workers"]
    world.worker = workers[0]["id"]
    return world


def _assert_standard_error(response: httpx.Response, caller: str, code: str | None) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert ERROR_FIELDS <= set(error) <= ERROR_FIELDS | {"param"}, error
    assert error["message"] and error["request_id"] == response.headers["x-request-id"], error
    if code is None:  # the status's own code; a service key has no account, a user is no admin
        code = "account_required" if caller == "service" else "forbidden"
        code = CODES.get(response.status_code, code)
    assert error["code"] == code, error


def _assert_nothing_of_a(world: World, caller: str, text: str, asked: str) -> None:
    for secret in (world.key, API_KEY, JWT_SECRET, "$argon2", "password_hash", "key_sha256"):
        assert secret not in text, f"a secret ({secret[:12]}…) was answered"
    username = world.accounts["owner"].username
    if caller in ("anonymous", "other") and username not in asked:  # (an error may echo the ask)
        assert username not in text, f"{caller} got A's username"
    if caller != "owner":
        for private in (TITLE, SAID):
            assert private not in text, f"{caller} got A's {private!r}"
    if caller in ("anonymous", "other"):
        for personal in (EMAIL, world.key_prefix):
            assert personal not in text, f"{caller} got A's {personal!r}"


def _assert_intact(world: World, kind: str, thing: str) -> None:
    """A refused request about a thing of A's left it as it was."""
    if kind == "conversation":
        kept = world.send("owner", "GET", f"/api/conversations/{thing}").json()
        assert kept["title"] == TITLE and kept["messages"] == [], kept
    else:
        keys = world.send("owner", "GET", "/api/keys").json()["keys"]
        assert [k["revoked_at"] for k in keys if k["id"] == int(thing)] == [None], keys


@pytest.mark.parametrize(
    ("row", "caller"), [pytest.param(r, c, id=f"{r.id} as {c}") for r in ROWS for c in CALLERS]
)
def test_each_route_answers_each_caller_as_the_table_says(world: World, row: Row, caller: str) -> None:
    world.fresh.clear()
    target = world.fill(row.path, row.fresh) + (f"?{world.fill(row.query)}" if row.query else "")
    body = row.body(world) if callable(row.body) else row.body
    response = world.send(caller, row.method, target, body)
    expected = row.outcome(caller)
    status = response.status_code
    assert status in [s for s, _ in expected], f"{row.id} as {caller}: {status} {response.text[:300]}"
    if status >= 400 and row.method != "HEAD":
        _assert_standard_error(response, caller, dict(expected)[status])
    _assert_nothing_of_a(world, caller, response.text, f"{target} {body}")
    if status >= 400:
        for kind, thing in world.fresh:
            _assert_intact(world, kind, thing)
    if row.ends_session and status == 204:
        world.relogin(caller)


def test_what_the_others_must_not_see_is_there_for_those_who_may(world: World) -> None:
    """The absence checks above would pass with markers that never appear anywhere."""
    mine = world.send("owner", "GET", f"/api/conversations/{world.conversation}").text
    assert TITLE in mine and SAID in mine
    assert EMAIL in world.send("admin", "GET", "/api/users").text
    assert world.key_prefix in world.send("owner", "GET", "/api/keys").text
    verified = httpx.get(world.url + "/api/auth/verify", headers={"Authorization": f"Bearer {world.key}"})
    assert verified.json()["username"] == world.accounts["owner"].username


def _as_b(field: str) -> Callable[[World], dict[str, object]]:
    return lambda world: {field: world.accounts["other"].id}


# API3: a field that would make a thing someone else's, or the caller an admin, is refused
# whole; nothing is made or changed.
PLANTED = [
    ("PUT", "/api/me/settings", lambda world: {"role": "admin"}),
    ("PUT", "/api/me/settings", _as_b("user_id")),
    ("POST", "/api/conversations", _as_b("user_id")),
    ("PATCH", "/api/conversations/{conversation_id}", _as_b("user_id")),
    ("POST", "/api/keys", _as_b("user_id")),
    ("POST", "/api/chat", lambda world: {"message": "planted", "user_id": world.accounts["other"].id}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), [pytest.param(*p, id=f"{p[0]} {p[1]} #{i}") for i, p in enumerate(PLANTED)]
)
def test_a_field_that_assigns_to_another_user_or_a_role_is_refused(
    world: World, method: str, path: str, body: Callable[[World], dict[str, object]]
) -> None:
    def bs_things() -> tuple[object, ...]:
        return tuple(world.send("other", "GET", p).json() for p in ("/api/conversations", "/api/keys"))

    before = bs_things()
    response = world.send("owner", method, world.fill(path), body(world))
    assert response.status_code == 400, response.text
    _assert_standard_error(response, "owner", "invalid_request")
    assert world.send("owner", "GET", "/api/auth/verify").json()["role"] == "user"
    assert bs_things() == before


def test_the_openai_user_field_bills_no_one_else(world: World) -> None:
    """`user` in a /v1 request is the client's label; the usage is the caller's."""
    b = world.accounts["other"].username
    said = world.send("owner", "POST", "/v1/chat/completions", {**CHAT, "user": b})
    request_id = said.json()["id"]
    wait_until("A's usage row", lambda: request_id in world.send("owner", "GET", "/api/usage").text, 30)
    assert request_id not in world.send("other", "GET", "/api/usage").text


def _app_routes() -> set[tuple[str, str]]:
    """Every method and path the app serves, from Litestar's route table (OPTIONS aside:
    Litestar answers it on every path; the last test tries it)."""
    app = create_app(load_settings({"DEVELOPMENT_MODE": "1", "CHATQ_HOME": tempfile.mkdtemp()}))
    routes = [route for route in app.routes if isinstance(route, HTTPRoute)]
    return {(m, route.path_format) for route in routes for m in route.methods if m != "OPTIONS"}


def test_every_route_of_the_app_has_a_row() -> None:
    tabled = {(row.method, row.path) for row in ROWS}
    served = _app_routes()
    missing = sorted(f"{method} {path}" for method, path in served - tabled)
    assert not missing, f"routes with no row in ROWS: {', '.join(missing)}"
    assert tabled <= served, sorted(tabled - served)
    assert len({row.id for row in ROWS}) == len(ROWS), "two rows alike"


def test_the_running_api_serves_no_route_beyond_the_table(world: World) -> None:
    """The app whose table was read is the one running: its document names no other route."""
    document = world.send("anonymous", "GET", "/schema/openapi.json").json()
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented <= {(row.method, row.path) for row in ROWS}


@pytest.mark.parametrize("path", sorted({row.path for row in ROWS}))
def test_options_names_the_methods_and_opens_no_guarded_path(world: World, path: str) -> None:
    rows = [row for row in ROWS if row.path == path]
    anonymous = world.send("anonymous", "OPTIONS", world.fill(path))
    if all(row.outcome("anonymous") == [(401, None)] for row in rows):
        assert anonymous.status_code == 401, anonymous.text
        _assert_standard_error(anonymous, "anonymous", None)
    else:
        assert anonymous.status_code == 204, anonymous.text
    response = world.send("service", "OPTIONS", world.fill(path))
    assert response.status_code == 204 and not response.content, response.text
    allowed = set(response.headers["allow"].split(", "))
    assert {row.method for row in rows} | {"OPTIONS"} <= allowed, allowed
