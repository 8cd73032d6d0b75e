"""Accounts: login and token check, API keys, users (admins), per-user settings."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, patch, post, put
from litestar.di import NamedDependency

from api.auth import principal_of
from api.body import decode_body
from api.models import model_setting
from api.ratelimit import LoginThrottled
from api.services import Services
from chatq.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from database import accounts
from database.accounts import AccountError

_json = msgspec.json.Encoder()
AnyRequest = Request[Any, Any, Any]


def json_response(body: object, status: int = 200) -> Response[bytes]:
    return Response(_json.encode(body), status_code=status, media_type="application/json")


def account_error(exc: AccountError) -> InvalidRequest | Conflict:
    if "taken" in str(exc):
        return Conflict(str(exc), code="username_taken", param="username")
    return InvalidRequest(str(exc))


# --- login ------------------------------------------------------------------------------


class Login(msgspec.Struct, forbid_unknown_fields=True):
    username: Annotated[str, msgspec.Meta(max_length=200)]
    password: Annotated[str, msgspec.Meta(max_length=1000)]


class Token(msgspec.Struct):
    access_token: str
    expires_in: int
    token_type: str = "bearer"


@post("/api/auth/login", status_code=200, opt={"body": Login})
async def login(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    """Username and password → a bearer token. Wrong password and unknown user: the same 401."""
    body: Login = decode_body(await request.body(), Login)
    settings, logins = services.settings, services.limiter.logins
    # The peer, or the X-Forwarded-For of a proxy listed in FORWARDED_ALLOW_IPS (uvicorn's).
    client = request.client.host if request.client else "unknown"
    wait_s = await logins.attempt(
        body.username,
        client,
        settings.login_max_failures,
        settings.login_max_failures_per_client,
        settings.login_window_s,
    )
    if wait_s:
        raise LoginThrottled(wait_s)
    async with services.db() as conn:
        found = await accounts.find_user(conn, body.username)
        user, password_hash = found if found is not None else (None, None)
        # Verified even for an unknown user (against a dummy hash): the same time either way.
        # argon2id takes ~0.1 s of CPU: in a thread, so this process's streams keep flowing.
        ok = await asyncio.to_thread(accounts.verify_password, password_hash, body.password)
        if user is None or not ok or user.disabled:
            raise Unauthorized("wrong username or password", code="invalid_credentials")
        cur = await conn.execute(
            "UPDATE users SET last_login_at = now() WHERE id = %s RETURNING token_version", (user.id,)
        )
        row = await cur.fetchone()
    assert row is not None
    await logins.succeeded(body.username, client)
    token, ttl = services.auth.issue(user.id, user.username, user.role, row[0])
    return json_response(Token(access_token=token, expires_in=ttl))


@post("/api/auth/logout", status_code=204)
async def logout(request: AnyRequest, services: NamedDependency[Services]) -> None:
    """End the caller's login tokens: this one and every other the user holds."""
    principal = principal_of(request)
    if principal.via != "jwt" or principal.user_id is None:
        raise InvalidRequest(
            "logout ends login tokens; an API key is ended with DELETE /api/keys/{id}",
            code="not_a_token",
        )
    async with services.db() as conn:
        await accounts.end_tokens(conn, principal.user_id)
    services.auth.forget(user_id=principal.user_id)


class Verified(msgspec.Struct):
    username: str
    role: str
    exp: int | None
    user_id: int | None
    via: str


@get("/api/auth/verify", sync_to_thread=False)
def verify(request: AnyRequest) -> Response[bytes]:
    """Who the credentials belong to, and when the token expires (null for a key)."""
    p = principal_of(request)
    return json_response(Verified(username=p.username, role=p.role, exp=p.exp, user_id=p.user_id, via=p.via))


# --- API keys -----------------------------------------------------------------------------


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "default"


class CreatedKey(msgspec.Struct):
    id: int
    name: str
    prefix: str
    created_at: dt.datetime
    key: str  # shown this once


@get("/api/keys")
async def list_keys(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    """The caller's keys (never the keys themselves: name, prefix, dates)."""
    user_id = principal_of(request).require_account()
    async with services.db() as conn:
        keys = await accounts.list_keys(conn, user_id)
    return json_response({"keys": keys})


@post("/api/keys", status_code=201, opt={"body": NewKey, "body_optional": True})
async def create_key(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    """A new key for the caller; the answer is the only time the key is shown."""
    user_id = principal_of(request).require_account()
    raw = await request.body()
    body: NewKey = decode_body(raw, NewKey) if raw.strip() else NewKey()
    async with services.db() as conn:
        try:
            record, key = await accounts.create_key(conn, user_id, body.name)
        except AccountError as exc:
            raise account_error(exc) from None
    created = CreatedKey(
        id=record.id, name=record.name, prefix=record.prefix, created_at=record.created_at, key=key
    )
    return json_response(created, 201)


@delete("/api/keys/{key_id:int}", status_code=204)
async def revoke_key(key_id: int, request: AnyRequest, services: NamedDependency[Services]) -> None:
    """Revoke one of the caller's keys (an admin: anyone's). Another user's key: 404."""
    p = principal_of(request)
    owner = None if p.is_admin else p.require_account()
    async with services.db() as conn:
        if not await accounts.revoke_key(conn, key_id, user_id=owner):
            raise NotFound(f"no API key {key_id}")
    services.auth.forget()


# --- users (admins) -------------------------------------------------------------------------


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str
    role: Literal["user", "admin"] = "user"
    email: str | None = None


class UserChange(msgspec.Struct, forbid_unknown_fields=True):
    disabled: bool | None = None
    role: Literal["user", "admin"] | None = None
    password: str | None = None
    email: str | None = None


@get("/api/users", opt={"admin": True})
async def list_users(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    principal_of(request).require_admin()
    async with services.db() as conn:
        users = await accounts.list_users(conn)
    return json_response({"users": users})


@post("/api/users", status_code=201, opt={"body": NewUser, "admin": True})
async def create_user(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    principal_of(request).require_admin()
    body: NewUser = decode_body(await request.body(), NewUser)
    async with services.db() as conn:
        try:
            user = await accounts.create_user(
                conn, body.username, body.password, role=body.role, email=body.email
            )
        except AccountError as exc:
            raise account_error(exc) from None
    return json_response(user, 201)


@patch("/api/users/{user_id:int}", opt={"body": UserChange, "admin": True})
async def change_user(
    user_id: int, request: AnyRequest, services: NamedDependency[Services]
) -> Response[bytes]:
    """Disable or enable a user, change their role, password or e-mail."""
    principal_of(request).require_admin()
    body: UserChange = decode_body(await request.body(), UserChange)
    async with services.db() as conn:
        user = await accounts.get_user(conn, user_id)
        if user is None:
            raise NotFound(f"no user {user_id}")
        try:
            if body.password is not None:
                await accounts.set_password(conn, user.username, body.password)
        except AccountError as exc:
            raise account_error(exc) from None
        if body.disabled is not None:
            await accounts.set_disabled(conn, user_id, body.disabled)
        if body.role is not None:
            await conn.execute("UPDATE users SET role = %s WHERE id = %s", (body.role, user_id))
        if body.email is not None:
            await conn.execute("UPDATE users SET email = %s WHERE id = %s", (body.email or None, user_id))
        user = await accounts.get_user(conn, user_id)
    services.auth.forget(user_id=user_id)
    return json_response(user)


@get("/api/users/{user_id:int}/keys", opt={"admin": True})
async def user_keys(
    user_id: int, request: AnyRequest, services: NamedDependency[Services]
) -> Response[bytes]:
    principal_of(request).require_admin()
    async with services.db() as conn:
        if await accounts.get_user(conn, user_id) is None:
            raise NotFound(f"no user {user_id}")
        keys = await accounts.list_keys(conn, user_id)
    return json_response({"keys": keys})


# --- the caller's own settings ------------------------------------------------------------

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]


class Sampling(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    top_p: TopP | None = None


class UserSettings(msgspec.Struct, forbid_unknown_fields=True):
    system_prompt: Annotated[str, msgspec.Meta(max_length=20_000)] | None = None
    model: str | None = None
    params: Sampling = msgspec.field(default_factory=Sampling)


async def load_settings(services: Services, user_id: int) -> UserSettings:
    async with services.db() as conn:
        user = await accounts.get_user(conn, user_id)
    if user is None:
        raise NotFound("no such user")
    return UserSettings(
        system_prompt=user.system_prompt,
        model=user.default_model,
        params=msgspec.convert(user.default_params or {}, Sampling),
    )


@get("/api/me/settings")
async def get_settings(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    """The caller's defaults, applied to /api/chat requests that give none."""
    return json_response(await load_settings(services, principal_of(request).require_account()))


@put("/api/me/settings", opt={"body": UserSettings})
async def put_settings(request: AnyRequest, services: NamedDependency[Services]) -> Response[bytes]:
    user_id = principal_of(request).require_account()
    body: UserSettings = decode_body(await request.body(), UserSettings)
    body = msgspec.structs.replace(body, model=model_setting(services, body.model))
    async with services.db() as conn:
        await conn.execute(
            "UPDATE users SET system_prompt = %s, default_model = %s, default_params = %s WHERE id = %s",
            (body.system_prompt, body.model, _json.encode(body.params).decode(), user_id),
        )
    return json_response(body)


ROUTES = [
    login,
    logout,
    verify,
    list_keys,
    create_key,
    revoke_key,
    list_users,
    create_user,
    change_user,
    user_keys,
    get_settings,
    put_settings,
]
