"""Who is calling: `Authorization: Bearer <JWT or API key>`, resolved to a Principal.

- A JWT (from POST /api/auth/login) is verified with pyjwt: HS256 only, `exp` `iat` `sub`
  `iss` `aud` required and checked. Its user is read from PostgreSQL (cached briefly), so
  a disabled user or a changed role takes effect within API_KEY_CACHE_S; so does the end
  of a token by a password change or a logout: the token's `ver` claim must equal the
  user's token_version, which both add one to (on the process that made the change at
  once, it forgets its cached answer).
- An API key is looked up by its SHA-256 digest (keys are 256-bit random, so a fast hash
  is safe where a password would need argon2), and the answer is cached for
  API_KEY_CACHE_S: the common case costs a dict lookup, and a revoked key stops working
  on every API process within that time.
- Service keys (CHATQ_API_KEYS, the state folder's api_keys file) belong to no account and
  act as an admin; they are the operator's keys and what the load test uses.
- Development mode: a call without a token acts as the seeded `admin`; a token, when
  given, still decides who the caller is.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import jwt
import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from psycopg_pool import AsyncConnectionPool

from chatq.errors import Forbidden, Unauthorized, UpstreamUnavailable
from chatq.settings import Settings
from chatq.tasks import TaskSet
from database.accounts import key_digest

log = logging.getLogger("chatq.api.auth")

ISSUER = "chatq"
AUDIENCE = "chatq"
ALGORITHM = "HS256"
# Cached answers at most; random keys sent by a prober must not grow memory without end.
_CACHE_MAX = 50_000
_LAST_USED_EVERY_S = 60.0
K = TypeVar("K", bytes, int)


class Principal(msgspec.Struct, frozen=True):
    """The caller: an account (user_id), or a service key (user_id None) acting as admin."""

    user_id: int | None
    username: str
    role: Literal["user", "admin"]
    key_id: int | None = None
    via: Literal["jwt", "key", "service", "development"] = "jwt"
    exp: int | None = None
    # The user's token_version: a login token with another `ver` has been ended.
    token_version: int = 0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def scopes(self) -> list[str]:
        """The rate-limit buckets this call counts against: its user, and its key if any."""
        scopes = [f"user:{self.user_id}" if self.user_id is not None else f"service:{self.username}"]
        if self.key_id is not None:
            scopes.append(f"key:{self.key_id}")
        return scopes

    def require_account(self) -> int:
        """The caller's user id; a service key has no account to hold conversations or keys."""
        if self.user_id is None:
            raise Forbidden(
                "this needs a user account: log in, or use a key made with POST /api/keys",
                code="account_required",
            )
        return self.user_id

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("only an admin may do this")


class _Cached(msgspec.Struct):
    principal: Principal | None  # None: no such key, revoked, or its user disabled
    until: float
    refreshing: bool = False


_KEY_QUERY = """
SELECT k.id, k.revoked_at IS NOT NULL, u.id, u.username, u.role, u.disabled
FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_sha256 = %s
"""
_USER_QUERY = "SELECT username, role, disabled, token_version FROM users WHERE id = %s"


class Authenticator:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool[Any] | None) -> None:
        self.settings = settings
        self.pool = pool
        self._service = [key_digest(k) for k in settings.api_keys]
        self.secret = settings.jwt_secret or secrets.token_urlsafe(48)
        self._keys: dict[bytes, _Cached] = {}
        self._users: dict[int, _Cached] = {}
        self._last_used: dict[int, float] = {}
        self._development: Principal | None = None
        self._spawn = TaskSet("auth bookkeeping")

    # --- tokens ---------------------------------------------------------------------

    def issue(self, user_id: int, username: str, role: str, token_version: int) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds."""
        now = int(time.time())
        ttl = self.settings.jwt_expire_minutes * 60
        claims = {
            "sub": str(user_id),
            "name": username,
            "role": role,
            "iat": now,
            "exp": now + ttl,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "ver": token_version,
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM), ttl

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],  # pinned: never "none", never what the token says
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired: log in again", code="token_expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid token", code="invalid_token") from None
        return claims

    # --- who is calling -------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            if self.settings.dev_mode:
                return await self._development_admin()
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <token or API key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send 'Authorization: Bearer <token or API key>'")
        if token.count(".") == 2:
            claims = self._claims(token)
            try:
                user_id = int(claims["sub"])
            except (TypeError, ValueError):
                raise Unauthorized("invalid token", code="invalid_token") from None
            principal = await self._user(user_id)
            if principal is None:
                raise Unauthorized("this account is disabled or gone", code="account_disabled")
            # A token from before this column existed has no `ver`: it counts as 0.
            if claims.get("ver", 0) != principal.token_version:
                raise Unauthorized(
                    "this token was ended by a password change or a logout: log in again",
                    code="token_revoked",
                )
            return msgspec.structs.replace(principal, exp=int(claims["exp"]))
        return await self._key(token)

    async def _key(self, key: str) -> Principal:
        digest = key_digest(key)
        for service in self._service:
            if hmac.compare_digest(digest, service):
                return Principal(None, "service", "admin", via="service")
        now = time.monotonic()
        principal = await self._remember(self._keys, digest, lambda: self._lookup_key(digest))
        if principal is None:
            raise Unauthorized("invalid API key")
        key_id = principal.key_id
        if (
            key_id is not None
            and now - self._last_used.get(key_id, -_LAST_USED_EVERY_S) >= _LAST_USED_EVERY_S
        ):
            self._last_used[key_id] = now
            self._spawn(self._touch(key_id))
        return principal

    async def _lookup_key(self, digest: bytes) -> Principal | None:
        row = await self._fetch(_KEY_QUERY, (digest,))
        if row is None:
            return None
        key_id, revoked, user_id, username, role, disabled = row
        if revoked or disabled:
            return None
        return Principal(user_id, username, role, key_id=key_id, via="key")

    async def _user(self, user_id: int) -> Principal | None:
        return await self._remember(self._users, user_id, lambda: self._lookup_user(user_id))

    async def _lookup_user(self, user_id: int) -> Principal | None:
        row = await self._fetch(_USER_QUERY, (user_id,))
        if row is None or row[2]:
            return None
        return Principal(user_id, row[0], row[1], via="jwt", token_version=row[3])

    async def _remember(
        self, cache: dict[K, _Cached], key: K, load: Callable[[], Awaitable[Principal | None]]
    ) -> Principal | None:
        """A cached answer, never older than API_KEY_CACHE_S (so a revocation or a disabled
        user takes effect within it); past half its life it is reloaded in the background,
        so a busy key or user never waits for the database."""
        ttl = self.settings.api_key_cache_s
        now = time.monotonic()
        cached = cache.get(key)
        if cached is None or cached.until <= now:
            try:
                principal = await load()
            except UpstreamUnavailable:
                if cached is None:
                    raise
                # PostgreSQL is down: nobody can revoke a key or disable a user meanwhile,
                # so the last answer stands until it is back (callers keep working).
                cached.until = now + min(ttl, 1.0)
                return cached.principal
            cached = _Cached(principal, now + ttl)
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = cached
        elif cached.until - now < ttl / 2 and not cached.refreshing:
            cached.refreshing = True
            self._spawn(self._reload(cache, key, load, cached))
        return cached.principal

    async def _reload(
        self, cache: dict[K, _Cached], key: K, load: Callable[[], Awaitable[Principal | None]], old: _Cached
    ) -> None:
        started = time.monotonic()
        try:
            principal = await load()
        except UpstreamUnavailable:
            old.refreshing = False  # the database is down: the entry still expires on time
            return
        cache[key] = _Cached(principal, started + self.settings.api_key_cache_s)

    async def _development_admin(self) -> Principal:
        if self._development is None:
            row = None
            if self.pool is not None:
                row = await self._fetch("SELECT id FROM users WHERE username = 'admin'", ())
            user_id = None if row is None else int(row[0])
            self._development = Principal(user_id, "admin", "admin", via="development")
        return self._development

    def forget(self, *, user_id: int | None = None) -> None:
        """Drop cached answers on this process (after a change it made itself)."""
        if user_id is None:
            self._keys.clear()
            self._users.clear()
            return
        self._users.pop(user_id, None)
        self._keys = {
            d: c for d, c in self._keys.items() if c.principal is None or c.principal.user_id != user_id
        }

    async def _fetch(self, query: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        if self.pool is None:
            return None
        try:
            async with self.pool.connection(timeout=1.0) as conn:
                cur = await conn.execute(query, params)
                row: tuple[Any, ...] | None = await cur.fetchone()
                return row
        except Exception as exc:
            log.warning("cannot check credentials: %r", exc)
            raise UpstreamUnavailable(
                "the account database is unreachable; try again shortly", code="accounts_unavailable"
            ) from exc

    async def _touch(self, key_id: int) -> None:
        if self.pool is None:
            return
        try:
            async with self.pool.connection(timeout=5.0) as conn:
                await conn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s", (key_id,))
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            log.debug("could not record a key's last use: %r", exc)


async def authenticated(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Litestar guard: resolve the caller and keep it in the request's state."""
    auth: Authenticator = connection.app.state.services.auth
    connection.state.principal = await auth.authenticate(connection.headers.get("authorization"))


def principal_of(connection: ASGIConnection) -> Principal:  # type: ignore[type-arg]
    principal: Principal = connection.state.principal
    return principal
