"""The Litestar app factory: routes, lifespan (NATS, topology, registry), error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from api import accounts as accounts_routes
from api import admin, allow, conversations, metrics, models, openapi, usage
from api import asyncapi as asyncapi_routes
from api import web as web_routes
from api.admission import QueueMonitor, StreamCap
from api.auth import Authenticator, authenticated
from api.chat_turn import simple_chat
from api.content_policy import load_policies
from api.generation import new_request_id
from api.openai_relay import chat_completions, completions
from api.ratelimit import RateLimiter
from api.services import Services
from broker import connect as nats_connect
from broker import topology
from broker.bus import Bus
from broker.connect import NatsLogin
from broker.workers import WorkerRegistry
from catalog.profiles import load_profiles, settle_model_profile
from chatq.errors import (
    ApiError,
    ClientError,
    ConfigError,
    RequestTooLarge,
    ServerError,
    error_body,
)
from chatq.gcfreeze import freeze_startup_objects
from chatq.settings import Settings, jwt_secret_problem
from chatq.tasks import TaskSet
from database import schema
from database.accounts import seed_development_accounts

log = logging.getLogger("chatq.api")
_json = msgspec.json.Encoder()

SERVICE_NAME = "vLLM Chat Gateway"
try:
    VERSION = version("chatq")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0"

Connect = Callable[[str, str, NatsLogin], Awaitable[Client]]


SERVED = "/v1/chat/completions, /v1/completions, /v1/models"


def _error_response(request: Request, exc: ApiError) -> Response[bytes]:  # type: ignore[type-arg]
    # Every error carries a request id, also those raised before a handler ran (auth, routing).
    request_id = getattr(request.state, "request_id", None) or new_request_id()
    headers = {"X-Request-Id": request_id}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return Response(
        _json.encode(error_body(exc, request_id)),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _http_error(request: Request, exc: HTTPException) -> Response[bytes]:  # type: ignore[type-arg]
    """Litestar's own errors (404 route, 405, 413 body size) in the standard body."""
    status = exc.status_code
    mapped: ApiError
    if status == 413:
        mapped = RequestTooLarge("the request body is larger than this server accepts")
    elif status == 404 and request.url.path.startswith("/v1/"):
        mapped = ClientError(
            f"chatq does not serve {request.method} {request.url.path}; it serves {SERVED}",
            code="unsupported_endpoint",
        )
    elif status == 405:
        mapped = ClientError(
            f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
    elif status < 500:
        code = {404: "not_found"}.get(status, "invalid_request")
        mapped = ClientError(str(exc.detail), code=code)
    else:
        mapped = ServerError(str(exc.detail))
    response = _error_response(request, mapped)
    response.status_code = status
    if status == 405:  # (raised while routing, before any middleware)
        response.headers["Allow"] = ", ".join(allow.allowed_methods(request.app, request.url.path))
    return response


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:  # type: ignore[type-arg]
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    response = _error_response(request, ServerError("internal error"))
    response.status_code = HTTP_500_INTERNAL_SERVER_ERROR
    return response


@get("/health", sync_to_thread=False)
def health(services: NamedDependency[Services]) -> Response[bytes]:
    """Liveness and readiness: NATS connection and ready workers; no auth."""
    nats_ok = services.bus.nc.is_connected
    ready = services.registry.ready()
    models: dict[str, int] = {}
    for worker in ready:
        models[worker.model] = models.get(worker.model, 0) + 1
    healthy = nats_ok and bool(ready)
    body = {
        "status": "healthy" if healthy else "degraded",
        "service": SERVICE_NAME,
        "version": VERSION,
        "services": {
            "nats": "ok" if nats_ok else "down",
            "workers": {
                "ready": len(ready),
                "total": len(services.registry.workers),
                "free_slots": sum(w.free_slots for w in ready),
                "models": models,
            },
        },
    }
    return Response(_json.encode(body), media_type="application/json")


@get("/metrics", sync_to_thread=False, opt={"media": ["text/plain"]})
def prometheus_metrics() -> Response[bytes]:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _services(state: State) -> Services:
    services: Services = state.services
    return services


def check_settings(settings: Settings) -> None:
    """Refuse unsafe or unusable settings before anything starts (ConfigError says why)."""
    if settings.dev_mode:
        return
    problem = jwt_secret_problem(settings.jwt_secret)
    if problem is not None:
        raise ConfigError(
            f"{problem}: set JWT_SECRET to at least 32 random characters or write them to "
            f"{settings.home / 'jwt_secret'} (./start does), or set DEVELOPMENT_MODE=true"
        )
    if not settings.api_keys and not settings.database_url:
        raise ConfigError(
            "nobody could sign in: set DATABASE_URL for accounts (./start does), or CHATQ_API_KEYS "
            "for service keys, or DEVELOPMENT_MODE=true"
        )


async def _open_database(settings: Settings) -> AsyncConnectionPool[Any] | None:
    """The API's connection pool, after migrating the schema (development mode: test accounts)."""
    if not settings.database_url:
        log.warning("no DATABASE_URL: accounts, conversations and usage are off; service keys only")
        return None
    applied = await schema.migrate_url(settings.database_url)
    if applied:
        log.info("database migrated: %s", ", ".join(applied))
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=settings.api_db_pool_max,
        open=False,
        kwargs={"autocommit": True},
        name="chatq-api",
    )
    await pool.open(wait=True, timeout=30)
    if settings.dev_mode:
        async with pool.connection() as conn:
            made = await seed_development_accounts(conn)
        if made:
            log.warning("DEVELOPMENT MODE: created the test accounts %s", ", ".join(made))
    return pool


def create_app(settings: Settings, *, connect: Connect = nats_connect.connect) -> Litestar:
    """Build the API; `connect` is the NATS connector, swappable in tests."""
    check_settings(settings)
    profiles = load_profiles(settings.profiles_file)
    settings = settle_model_profile(settings, profiles)
    policies = load_policies(settings.content_policy_file)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.dev_mode:
            log.warning(
                "DEVELOPMENT MODE: calls without credentials act as admin, and the test accounts "
                "admin/admin123 and test/test exist. Never run it like this where others can reach it."
            )
        pool = await _open_database(settings)
        nc = await connect(settings.nats_url, "chatq-api", NatsLogin.of(settings))
        bus = Bus(nc)
        await topology.ensure_streams(
            bus.js, jobs_max_msgs=settings.jobs_max_msgs, replicas=settings.nats_stream_replicas
        )
        for model in dict.fromkeys([*settings.models, *(p.id for p in profiles)]):
            await topology.ensure_model(bus.js, model, ack_wait_s=settings.ack_wait_s)
        registry = WorkerRegistry(bus)
        await registry.start()
        spawn = TaskSet()
        limiter = RateLimiter(settings.redis_url, settings.rate_limit_failure)
        await limiter.start()
        if settings.redis_url is None:
            log.warning("no REDIS_URL: rate limits are off")
        app.state.services = Services(
            settings=settings,
            bus=bus,
            monitor=QueueMonitor(
                bus,
                bound=settings.queue_max,
                cache_s=settings.queue_depth_cache_s,
                policy=settings.admission_policy,
                wait_target_s=settings.admission_wait_target_s,
                free_slots=registry.free_slots,
                capacity_estimate=registry.capacity_estimate,
                slot_times=registry.slot_times,
            ),
            registry=registry,
            streams=StreamCap(settings.api_max_streams),
            auth=Authenticator(settings, pool),
            limiter=limiter,
            spawn=spawn,
            pool=pool,
            profiles=profiles,
            policies=policies,
        )
        freeze_startup_objects("api")
        try:
            yield
        finally:
            await registry.stop()
            await spawn.wait()
            await bus.close()
            await limiter.close()
            if pool is not None:
                await pool.close()

    protected = Router(
        path="/",
        route_handlers=[
            chat_completions,
            completions,
            simple_chat,
            *models.ROUTES,
            *[r for r in accounts_routes.ROUTES if r is not accounts_routes.login],
            *conversations.ROUTES,
            *usage.ROUTES,
            *admin.ROUTES,
        ],
        guards=[authenticated],
    )
    return Litestar(
        route_handlers=[
            protected,
            health,
            prometheus_metrics,
            accounts_routes.login,
            *asyncapi_routes.ROUTES,
            *web_routes.routes(),
        ],
        lifespan=[lifespan],
        middleware=[metrics.count_responses, allow.full_allow_header],
        dependencies={"services": Provide(_services, sync_to_thread=False)},
        exception_handlers={
            ApiError: _error_response,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        request_max_body_size=settings.max_request_bytes,
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
        if settings.cors_origins
        else None,
        openapi_config=openapi.config(asyncapi_routes.chatq_version()),
    )
