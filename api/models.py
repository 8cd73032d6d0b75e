"""Models: which names a request may use, the model lists, and an admin's live switch.

A request names a model by a profile's id or alias (catalog/profiles.toml), or by the name
of a model a live worker serves without a profile (MODEL_ID), or one in CHATQ_MODELS.
An alias resolves to its profile's id before the job is queued: one queue per model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

import schemas
from api.auth import principal_of
from api.body import decode_body
from api.services import Services
from broker import names
from broker.workers import ModelState
from catalog.profiles import Profile
from chatq.errors import (
    ClientError,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    UpstreamUnavailable,
)
from schemas.messages import SwitchModel, SwitchReply, decode_switch_reply

_json = msgspec.json.Encoder()
SWITCH_REPLY_TIMEOUT_S = 5.0


def lookup_model(services: Services, name: str) -> tuple[str, Profile | None] | None:
    """The model `name` names, by id or alias: its id (a profile's for an alias) and profile;
    None when chatq knows no such model."""
    profile = services.profiles.resolve(name)
    if profile is not None:
        return profile.id, profile
    return (name, None) if name in services.known_models() else None


def model_setting(services: Services, name: str | None) -> str | None:
    """A model stored as a default (user settings, a conversation): its id; 400 if unknown."""
    if name is None:
        return None
    found = lookup_model(services, name)
    if found is None:
        raise InvalidRequest(f"the model {name!r} is not served here", param="model")
    return found[0]


def resolve_model(services: Services, model: str) -> str:
    """The queue name for a request's `model`: a profile's id for an alias; 404 if unknown.

    With UNSERVED_MODEL=reject a model that no live worker serves or is loading is a 503
    model_unavailable; with `wait` its job waits in the queue (until the request's deadline).
    """
    found = lookup_model(services, model)
    if found is None:
        raise ModelNotFound(
            f"the model {model!r} does not exist; served models: {', '.join(services.known_models())}",
            param="model",
        )
    name = found[0]
    if services.settings.unserved_model == "reject" and services.registry.model_state(name) not in (
        "ready",
        "loading",
    ):
        raise UpstreamUnavailable(
            f"no worker serves the model {name!r} right now; try again later or ask an admin to load it",
            code="model_unavailable",
            retry_after=5,
        )
    return name


class WorkerRef(msgspec.Struct):
    id: str
    state: str
    progress: str
    slots: int
    free_slots: int


class ModelEntry(msgspec.Struct, omit_defaults=True):
    """One model in GET /api/models and GET /v1/models (OpenAI's fields first)."""

    id: str
    name: str
    created: int
    aliases: list[str]
    state: ModelState
    workers: list[WorkerRef]
    queue_depth: int | None
    profile: bool
    object: str = "model"
    owned_by: str = "chatq"
    cpu: bool | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int | None = None
    quantization: str | None = None
    dtype: str | None = None


async def _queue_depth(services: Services, model: str) -> int | None:
    try:
        depth = await services.monitor.depth(model)
    except Exception:  # noqa: BLE001 - no queue yet (a model no one has served) or NATS down
        return None
    return depth.pending


async def _entry(services: Services, model: str, profile: Profile | None, now: int) -> ModelEntry:
    workers = [
        WorkerRef(id=w.worker_id, state=w.state, progress=w.progress, slots=w.slots, free_slots=w.free_slots)
        for w in sorted(services.registry.serving(model), key=lambda w: w.worker_id)
    ]
    entry = ModelEntry(
        id=model,
        name=profile.name if profile else model,
        created=now,
        aliases=list(profile.aliases) if profile else [],
        state=services.registry.model_state(model),
        workers=workers,
        queue_depth=await _queue_depth(services, model),
        profile=profile is not None,
    )
    if profile is not None:
        entry.cpu = profile.cpu
        entry.max_model_len = profile.engine.max_model_len
        entry.tensor_parallel_size = profile.engine.tensor_parallel_size
        entry.quantization = profile.engine.quantization
        entry.dtype = profile.engine.dtype
    return entry


async def model_entries(services: Services) -> list[ModelEntry]:
    """Every profile, then every other model configured or served, with its live state."""
    now = int(time.time())
    profiled = [(p.id, p) for p in services.profiles]
    others: list[tuple[str, Profile | None]] = [
        (m, None) for m in services.known_models() if services.profiles.get(m) is None
    ]
    pairs = [(m, None) for m, _ in others if m in services.settings.models] + profiled
    pairs += [(m, None) for m, _ in others if m not in services.settings.models]
    return list(await asyncio.gather(*(_entry(services, m, p, now) for m, p in pairs)))


class ModelsBody(msgspec.Struct):
    models: list[ModelEntry]


class OpenAIModels(msgspec.Struct):
    data: list[ModelEntry]
    object: str = "list"


@get("/api/models")
async def api_models(services: NamedDependency[Services]) -> Response[bytes]:
    """`{"models": [...]}`: every profile and served model, its state, workers and queue."""
    body = ModelsBody(models=await model_entries(services))
    return Response(_json.encode(body), media_type="application/json")


@get("/v1/models")
async def list_models(services: NamedDependency[Services]) -> Response[bytes]:
    """OpenAI's model list, each entry with chatq's live state."""
    body = OpenAIModels(data=await model_entries(services))
    return Response(_json.encode(body), media_type="application/json")


@get("/v1/models/{model_id:path}")
async def get_model(model_id: str, services: NamedDependency[Services]) -> Response[bytes]:
    """One model, by id or alias, or 404 model_not_found."""
    model_id = model_id.lstrip("/")
    found = lookup_model(services, model_id)
    if found is None:
        raise ModelNotFound(f"the model {model_id!r} does not exist", param="model")
    name, profile = found
    entry = await _entry(services, name, profile, int(time.time()))
    return Response(_json.encode(entry), media_type="application/json")


class SwitchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str


class SwitchAccepted(msgspec.Struct):
    worker_id: str
    profile: str
    previous: str
    state: Literal["draining"] = "draining"


_REFUSALS: dict[str, type[ClientError]] = {
    "unknown_profile": InvalidRequest,
    "already_switching": Conflict,
    "does_not_fit": Conflict,
    "same_model": Conflict,
}


@post("/api/admin/workers/{worker_id:str}/model", status_code=202, opt={"body": SwitchRequest, "admin": True})
async def switch_model(
    worker_id: str,
    request: Request,  # type: ignore[type-arg]
    services: NamedDependency[Services],
) -> Response[bytes]:
    """Admin: have one worker drain, unload, and load another profile (answers 202 at once)."""
    principal_of(request).require_admin()
    body = decode_body(await request.body(), SwitchRequest)
    profile = services.profiles.resolve(body.profile)
    if profile is None:
        raise InvalidRequest(
            f"there is no profile {body.profile!r}; profiles: {', '.join(p.id for p in services.profiles)}",
            code="unknown_profile",
            param="profile",
        )
    if worker_id not in services.registry.workers:
        raise NotFound(f"there is no live worker {worker_id!r}")
    try:
        msg = await services.bus.nc.request(
            names.worker_control_subject(worker_id),
            schemas.encode(SwitchModel(profile=profile.id)),
            timeout=SWITCH_REPLY_TIMEOUT_S,
        )
        reply: SwitchReply = decode_switch_reply(msg.data)
    except NoRespondersError:
        raise NotFound(f"the worker {worker_id!r} does not answer; it may have stopped") from None
    except (NatsTimeout, TimeoutError):
        raise UpstreamUnavailable(f"the worker {worker_id!r} did not answer in time") from None
    except msgspec.DecodeError:
        raise UpstreamUnavailable(f"the worker {worker_id!r} answered something unreadable") from None
    if not reply.accepted:
        error = _REFUSALS.get(reply.code, Conflict)
        raise error(reply.message, code=reply.code, param="profile" if error is InvalidRequest else None)
    accepted = SwitchAccepted(worker_id=worker_id, profile=profile.id, previous=reply.previous)
    return Response(_json.encode(accepted), media_type="application/json", status_code=202)


ROUTES = [api_models, list_models, get_model, switch_model]
