"""Wire messages (msgpack) for jobs, token streams, cancels, events and worker heartbeats."""

from __future__ import annotations

from time import time as _now
from typing import Literal

import msgspec

Priority = Literal["interactive", "background"]
Endpoint = Literal["chat", "completions"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
# Why the API cancels a request it queued (chat.cancel.<id>, metrics, the Cancelled event).
CancelReason = Literal["client_disconnected", "deadline", "stream_failed"]


class ChatMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class Sampling(msgspec.Struct, frozen=True, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: list[str] = []
    seed: int | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Purpose = Literal["chat", "title"]
# Where the answer of a request with no conversation is stored, after its prompt.
ANSWER_POSITION = 1_000_000


class RequestMeta(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who asked, and where the turn belongs; copied from the job into each of its events.

    user_id and key_id are chatq's account and API key (None for a service key or
    development mode without an account); conversation_id is set for /api/chat turns,
    whose new messages are stored from `position` on and whose answer at
    `answer_position`. A `title` job writes its answer as the conversation's title.
    """

    user_id: int | None = None
    key_id: int | None = None
    conversation_id: str | None = None
    position: int = 0
    answer_position: int = ANSWER_POSITION
    purpose: Purpose = "chat"
    priority: Priority = "interactive"
    # A turn that replaces the conversation's last one (regenerate, edit and resend): the
    # messages of this earlier request are removed when this turn's are stored.
    replaces: str | None = None


# --- chat.jobs.<model>.<priority> (JetStream JOBS) -------------------------------------


class Job(msgspec.Struct, frozen=True, tag="job", tag_field="t", omit_defaults=True):
    """One chat completion to run; the JetStream message id is its request_id."""

    request_id: str
    model: str
    messages: list[ChatMessage]
    sampling: Sampling
    created: float  # unix seconds, when the API accepted it
    deadline: float  # unix seconds; a worker drops a job found past it
    priority: Priority = "interactive"
    user: str | None = None
    # The client's OpenAI request body (JSON), served by the engine's own OpenAI layer;
    # messages and sampling above are chatq's reading of it (history, limits).
    endpoint: Endpoint = "chat"
    body: bytes = b""
    stream: bool = True
    meta: RequestMeta = RequestMeta()
    # The API matches the answer against output policies: each Chunk carries its plain
    # `text` besides `data` (otherwise text stays empty, as it costs bytes on every chunk).
    output_text: bool = False


# --- chat.stream.<request id> (core NATS) ----------------------------------------------


class Started(msgspec.Struct, frozen=True, tag="started", tag_field="t"):
    """A worker has taken the job and started the engine request."""

    worker_id: str


class Chunk(msgspec.Struct, frozen=True, tag="chunk", tag_field="t", omit_defaults=True):
    """Coalesced output; seq counts from 0; the last chunk has finish_reason and usage.

    `data` is the OpenAI wire text as the engine wrote it (SSE events for a stream, the
    JSON body otherwise), UTF-8, relayed to the client byte for byte without decoding;
    `text` is unused by engines that write `data`.
    """

    seq: int
    text: str
    tokens: int
    worker_id: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    data: bytes = b""


class Heartbeat(msgspec.Struct, frozen=True, tag="hb", tag_field="t"):
    """The worker is alive and still generating; next_seq is the seq of its next chunk."""

    worker_id: str
    next_seq: int


class StreamError(msgspec.Struct, frozen=True, tag="error", tag_field="t", omit_defaults=True):
    """The worker failed or refused the request; the stream ends.

    status is the HTTP status the engine gave a refusal (400 for a prompt too long, a
    bad parameter); 0 for a failure of the worker or engine.
    """

    worker_id: str
    code: str
    message: str
    status: int = 0
    param: str | None = None


StreamMsg = Started | Chunk | Heartbeat | StreamError


# --- chat.cancel.<request id> (core NATS) ----------------------------------------------


class Cancel(msgspec.Struct, frozen=True, tag="cancel", tag_field="t"):
    request_id: str
    reason: CancelReason


# --- chat.events.> (JetStream EVENTS) --------------------------------------------------
# Each event of a job is built by its `for_job`, which copies what every event of the
# job carries (request id, model, user, meta) from the job, and stamps the time.


class Accepted(msgspec.Struct, frozen=True, tag="accepted", tag_field="t", omit_defaults=True):
    request_id: str
    model: str
    time: float
    user: str | None = None
    stream: bool = True
    # The messages to store: the whole prompt, or a conversation turn's new message(s).
    messages: list[ChatMessage] = []
    meta: RequestMeta = RequestMeta()

    @classmethod
    def for_job(cls, job: Job, messages: list[ChatMessage]) -> Accepted:
        """The job is queued; `messages` are what its record stores of the prompt."""
        return cls(
            request_id=job.request_id,
            model=job.model,
            time=job.created,
            user=job.user,
            stream=job.stream,
            messages=messages,
            meta=job.meta,
        )


class Completed(msgspec.Struct, frozen=True, tag="completed", tag_field="t", omit_defaults=True):
    request_id: str
    model: str
    time: float
    worker_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    ttft_s: float | None = None
    duration_s: float = 0.0
    user: str | None = None
    meta: RequestMeta = RequestMeta()

    @classmethod
    def for_job(
        cls,
        job: Job,
        *,
        worker_id: str,
        text: str,
        finish_reason: FinishReason,
        usage: Usage,
        ttft_s: float | None,
        duration_s: float,
    ) -> Completed:
        """The job's answer is complete."""
        return cls(
            request_id=job.request_id,
            model=job.model,
            time=_now(),
            worker_id=worker_id,
            text=text,
            finish_reason=finish_reason,
            usage=usage,
            ttft_s=ttft_s,
            duration_s=duration_s,
            user=job.user,
            meta=job.meta,
        )


class Cancelled(msgspec.Struct, frozen=True, tag="cancelled", tag_field="t", omit_defaults=True):
    """Partial output of a cancelled stream is billed and stored."""

    request_id: str
    model: str
    time: float
    worker_id: str
    reason: str
    text: str
    usage: Usage
    user: str | None = None
    meta: RequestMeta = RequestMeta()

    @classmethod
    def for_job(
        cls, job: Job, *, worker_id: str, reason: str, text: str = "", usage: Usage | None = None
    ) -> Cancelled:
        """The job was cancelled; its partial text and usage (none if it never ran)."""
        return cls(
            request_id=job.request_id,
            model=job.model,
            time=_now(),
            worker_id=worker_id,
            reason=reason,
            text=text,
            usage=usage if usage is not None else Usage(0, 0),
            user=job.user,
            meta=job.meta,
        )


class Failed(msgspec.Struct, frozen=True, tag="failed", tag_field="t", omit_defaults=True):
    request_id: str
    model: str
    time: float
    code: str
    message: str
    worker_id: str | None = None
    user: str | None = None
    meta: RequestMeta = RequestMeta()

    @classmethod
    def for_job(cls, job: Job, *, code: str, message: str, worker_id: str | None) -> Failed:
        """The job failed; `worker_id` is None when no worker had taken it."""
        return cls(
            request_id=job.request_id,
            model=job.model,
            time=_now(),
            code=code,
            message=message,
            worker_id=worker_id,
            user=job.user,
            meta=job.meta,
        )


Event = Accepted | Completed | Cancelled | Failed


# --- workers KV ------------------------------------------------------------------------


class WorkerStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    worker_id: str
    model: str
    engine: str
    state: Literal["loading", "ready", "draining"]
    slots: int
    free_slots: int
    updated: float
    # Model profiles and live switching (appended: older readers ignore them).
    profile: str | None = None  # the profile id of `model`, if it was loaded from one
    switch_to: str | None = None  # the profile a switch in progress is loading
    progress: str = ""  # "draining", "loading 40%", "ready", "failed: <reason>"
    gpus: int = 0  # GPUs NVML reports on the worker's host
    host: str = ""  # the worker's host name
    engine_version: str = ""  # e.g. vLLM's version, "synthetic"
    # Seconds a completed job held its slot, fetch to last token, averaged over the
    # recent ones (0: none yet). slots / job_s is what the worker can start per second,
    # known before any backlog has shown it (admission's capacity estimate).
    job_s: float = 0.0
    # When the running jobs are expected to free a slot (unix seconds, soonest first;
    # workers/inference/pacing.py): admission counts the slots that free up within its
    # wait target (None: a worker that does not say).
    releases: list[float] | None = None
    # Per job consumer (broker.names.jobs_consumer), the sequence of the last job the worker
    # took: the jobs delivered after it have taken slots this status does not show.
    taken: dict[str, int] = {}


# --- control.workers.<worker>.model (core NATS request/reply) ---------------------------


class SwitchModel(msgspec.Struct, frozen=True, tag="switch", tag_field="t"):
    """Ask a worker to load another profile (an admin's live switch)."""

    profile: str


class SwitchReply(msgspec.Struct, frozen=True, tag="switch_reply", tag_field="t", omit_defaults=True):
    """accepted, or why not: unknown_profile, already_switching, does_not_fit, same_model."""

    accepted: bool
    code: str = ""
    message: str = ""
    previous: str = ""


# Encoders and decoders are built once: msgspec reuses their internal state.
_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
decode_job = msgspec.msgpack.Decoder(Job).decode
decode_stream = msgspec.msgpack.Decoder(StreamMsg).decode
decode_cancel = msgspec.msgpack.Decoder(Cancel).decode
decode_event = msgspec.msgpack.Decoder(Event).decode
decode_worker_status = msgspec.msgpack.Decoder(WorkerStatus).decode
decode_switch = msgspec.msgpack.Decoder(SwitchModel).decode
decode_switch_reply = msgspec.msgpack.Decoder(SwitchReply).decode
