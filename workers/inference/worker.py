"""Pulls jobs only while the engine has free slots, streams chunks, aborts on cancel."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError
from nats.js.kv import KeyValue

import schemas
from broker import names, topology
from broker.bus import REQUEST_ID_HEADER, Bus
from catalog.profiles import Profile, ProfileSet
from chatq import gcfreeze, logs
from chatq.tasks import TaskSet
from schemas.messages import FinishReason, Priority, SwitchReply
from workers.inference import metrics
from workers.inference.chunker import ChunkStream
from workers.inference.engine import Answer, Engine, OpenAIRequest, Progress, RequestRejected

log = logging.getLogger(__name__)
_HOST = socket.gethostname()


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message: treat as the first try
        return 1


# How long an idle worker's pull request waits on the interactive queue before it looks
# at the background queue; the background look is short, so interactive jobs barely wait.
INTERACTIVE_POLL_S = 1.0
BACKGROUND_POLL_S = 0.02
# An engine's last SSE event; it travels with the finish chunk, once usage is known.
_DONE = "data: [DONE]"


@dataclass(eq=False)
class ActiveRequest:
    job: schemas.Job
    msg: Msg
    chunks: ChunkStream
    fetched_at: float
    acked: bool = False
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = None
    last_progress: float = field(default_factory=time.monotonic)
    last_beat: float = float("-inf")
    # Set when the request enters the engine, and once the engine is done: a cancel
    # interrupts only in between (before, the flag is enough; after, the finish runs).
    in_engine: bool = False
    generated: bool = False
    first_token_at: float | None = None


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    ack_wait_s: float
    heartbeat_s: float
    chunk_max_tokens: int
    chunk_max_delay_s: float
    status_interval_s: float = 2.0
    # A live switch: how long in-flight streams may run on before they are ended.
    switch_grace_s: float = 30.0
    # After a switch or shutdown cancels a request, how long it may take to end.
    cancel_wait_s: float = 5.0
    gpus: int = 0


# Builds an engine for a profile (None: the worker's MODEL_ID model), and the hardware
# check: why a profile cannot load here (one sentence), or None; its flag says the
# worker still holds a model (so judge on total, not free, memory).
EngineFactory = Callable[[Profile | None], Engine]
FitCheck = Callable[[Profile, bool], str | None]


def _no_check(profile: Profile, loaded: bool) -> str | None:
    return None


class InferenceWorker:
    """One engine, one model at a time: the pull loop, the per-job tasks, cancels, heartbeats,
    and live switches to another profile (drain, unload, check, load, or roll back)."""

    def __init__(
        self,
        bus: Bus,
        engine: Engine,
        config: WorkerConfig,
        *,
        profile: Profile | None = None,
        profiles: ProfileSet | None = None,
        engine_factory: EngineFactory | None = None,
        fits: FitCheck = _no_check,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.config = config
        self.model = engine.model
        self.profile = profile
        self.profiles = profiles or ProfileSet.empty()
        self._engine_factory = engine_factory
        self._fits = fits
        self._switch_target: Profile | None = None
        self._switch_to: str | None = None
        self._progress = "loading"
        self._shutting_down = False
        self.active: dict[str, ActiveRequest] = {}
        self._slot_freed = asyncio.Event()
        self._idle = asyncio.Event()  # set while no request runs
        self._idle.set()
        self._stopping = asyncio.Event()
        # Acks, naks, heartbeats, announcements, and each job's own task.
        self.spawn = TaskSet("worker task")
        self._kv: KeyValue | None = None
        self._state: str = "loading"
        self._labels = {"model": self.model}
        self._next_status = 0.0
        metrics.ENGINE_LOAD.watch(self)

    # --- helpers --------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.engine.slots - len(self.active))

    # --- lifecycle ------------------------------------------------------------------

    async def announce(self, state: str) -> None:
        """Publish this worker's state and free slots to the workers KV bucket."""
        self._state = state
        if self._kv is None:
            self._kv = await topology.workers_kv(self.bus.js)
        if state == "loading" and self._progress.startswith("loading"):
            fraction = getattr(self.engine, "load_fraction", None)
            if callable(fraction):
                self._progress = f"loading {round(100 * min(1.0, max(0.0, fraction())))}%"
        status = schemas.WorkerStatus(
            worker_id=self.config.worker_id,
            model=self.model,
            engine=self.engine.name,
            state=state,  # type: ignore[arg-type]
            slots=self.engine.slots,
            free_slots=self.free_slots if state == "ready" else 0,
            updated=time.time(),
            profile=None if self.profile is None else self.profile.id,
            switch_to=self._switch_to,
            progress=self._progress,
            gpus=self.config.gpus,
            host=_HOST,
            engine_version=str(getattr(self.engine, "version", "") or ""),
        )
        try:
            await self._kv.put(names.worker_key(self.config.worker_id), schemas.encode(status))
        except Exception as exc:  # noqa: BLE001 - retried at the next status interval
            log.warning("announcing %s to the workers bucket failed: %r", state, exc)

    async def run(self) -> None:
        """Fetch and run jobs until stop() is called; between models during a switch."""
        housekeeping = asyncio.create_task(self._housekeeping())
        # Without heartbeats every stream would fail its watchdog: a worker whose
        # housekeeping died stops, to be restarted, rather than limp on.
        housekeeping.add_done_callback(lambda _: self.stop_fetching())
        try:
            while True:
                await self._serve_model()
                if housekeeping.done() and not housekeeping.cancelled():
                    raise RuntimeError(f"the housekeeping task died: {housekeeping.exception()!r}")
                target, self._switch_target = self._switch_target, None
                if target is None or self._shutting_down:
                    return
                await self._switch(target)
                if self._shutting_down:
                    return
                self._stopping.clear()
        finally:
            housekeeping.cancel()

    async def _serve_model(self) -> None:
        """Bind this model's queues and pull from them until fetching stops."""
        metrics.SLOTS.labels(**self._labels).set(self.engine.slots)
        await topology.ensure_model(self.bus.js, self.model, ack_wait_s=self.config.ack_wait_s)
        subs: dict[Priority, JetStreamContext.PullSubscription] = {}
        try:
            for priority in names.PRIORITIES:
                subs[priority] = await self.bus.js.pull_subscribe_bind(
                    durable=names.jobs_consumer(self.model, priority), stream=names.JOBS_STREAM
                )
            if not self._progress.startswith("failed"):
                self._progress = "ready"
            await self.announce("ready")
            await self._pull_loop(subs)
        finally:
            for sub in subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # --- live model switch ------------------------------------------------------------

    def request_switch(self, profile_name: str) -> SwitchReply:
        """Accept (and start) a switch to another profile, or say why not; answers at once."""
        me = self.config.worker_id
        if self._switch_target is not None or self._switch_to is not None:
            return SwitchReply(False, "already_switching", f"worker {me} is already switching models")
        if self._shutting_down or self._engine_factory is None:
            return SwitchReply(False, "already_switching", f"worker {me} is stopping")
        profile = self.profiles.resolve(profile_name)
        if profile is None:
            return SwitchReply(False, "unknown_profile", f"worker {me} has no profile {profile_name!r}")
        if profile.id == self.model:
            return SwitchReply(False, "same_model", f"worker {me} already serves {profile.id}")
        refusal = self._fits(profile, True)
        if refusal is not None:
            return SwitchReply(False, "does_not_fit", refusal)
        log.info("switching from %s to %s: draining", self.model, profile.id)
        self._switch_target = profile
        self._switch_to = profile.id
        self._progress = "draining"
        self._stopping.set()
        self._slot_freed.set()
        self.spawn(self.announce("draining"))  # at once, not when the pull loop notices
        return SwitchReply(True, previous=self.model)

    async def _switch(self, target: Profile) -> None:
        """Drain, unload, check, load the target; on any failure load the previous model again."""
        old_engine, old_profile, old_model = self.engine, self.profile, self.model
        await self.announce("draining")
        await self._end_active(self.config.switch_grace_s, "model_switch")
        await old_engine.stop()
        gcfreeze.thaw()  # the old engine's objects may be collected now
        reason = self._fits(target, False)
        if reason is None:
            assert self._engine_factory is not None
            new_engine = self._engine_factory(target)
            self.engine, self.profile, self.model = new_engine, target, target.id
            self._labels = {"model": self.model}
            self._switch_to = None
            self._progress = "loading 0%"
            await self.announce("loading")
            try:
                await new_engine.start()
            except Exception as exc:  # any failure to load rolls back
                log.exception("loading %s failed; going back to %s", target.id, old_model)
                reason = str(exc) or type(exc).__name__
                with contextlib.suppress(Exception):
                    await new_engine.stop()
        if reason is None:
            log.info("switched from %s to %s", old_model, target.id)
            gcfreeze.freeze_startup_objects(f"engine {target.id}")
            self._progress = "ready"
            return
        log.warning("switch to %s failed: %s; loading %s again", target.id, reason, old_model)
        self.engine, self.profile, self.model = old_engine, old_profile, old_model
        self._labels = {"model": self.model}
        self._switch_to = None
        self._progress = "loading 0%"
        await self.announce("loading")
        # If the old model cannot come back either, the worker stops (and is restarted).
        await old_engine.start()
        gcfreeze.freeze_startup_objects(f"engine {old_model}")
        self._progress = f"failed: {reason}"

    async def _end_active(self, grace_s: float, reason: str) -> None:
        """Let running requests finish for grace_s, then end the rest.

        A request with no token yet goes back to its queue (another worker, or this one
        later, answers it); one that is streaming ends with the standard error, `reason`.
        A request still running cancel_wait_s after that is abandoned: logged, its task
        cancelled, its slot forgotten, so a stuck engine cannot hold up a switch or a
        shutdown (an unacked job is redelivered by JetStream after its ack wait).
        """
        if await self.wait_idle(grace_s):
            return
        for active in list(self.active.values()):
            started = active.acked or active.first_token_at is not None
            self.cancel(active.job.request_id, reason if started else "requeue")
        if await self.wait_idle(self.config.cancel_wait_s):
            return
        for rid, active in list(self.active.items()):
            log.error(
                "job %s still runs %g s after its cancel (%s); abandoning it",
                rid,
                self.config.cancel_wait_s,
                reason,
                extra={"request_id": rid},
            )
            if active.task is not None:
                active.task.cancel()
            self._forget(active)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs: True, or False if some still run after timeout seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _pull_loop(self, subs: dict[Priority, JetStreamContext.PullSubscription]) -> None:
        while not self._stopping.is_set():
            free = self.free_slots
            if free == 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            got = 0
            for priority in names.PRIORITIES:
                timeout = INTERACTIVE_POLL_S if priority == "interactive" else BACKGROUND_POLL_S
                try:
                    msgs = await subs[priority].fetch(batch=free, timeout=timeout)
                except (TimeoutError, NatsTimeout):
                    continue
                except (ConnectionClosedError, ServiceUnavailableError) as exc:
                    log.warning("fetch failed (%r); retrying", exc)
                    await asyncio.sleep(0.5)
                    break
                for msg in msgs:
                    self._start_job(msg)
                got += len(msgs)
                if got:
                    break  # interactive first, every time a slot frees up
            if self._stopping.is_set():
                break

    def stop_fetching(self) -> None:
        self._shutting_down = True
        self._stopping.set()
        self._slot_freed.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking jobs and end running ones as a switch does, then leave the workers bucket."""
        self.stop_fetching()
        self._progress = "draining"
        await self.announce("draining")
        await self._end_active(grace_s, "worker_shutdown")
        with contextlib.suppress(Exception):
            if self._kv is not None:
                await self._kv.delete(names.worker_key(self.config.worker_id))

    # --- jobs -----------------------------------------------------------------------

    def _start_job(self, msg: Msg) -> None:
        try:
            job = schemas.decode_job(msg.data)
        except Exception as exc:  # noqa: BLE001 - any malformed payload is dropped
            rid = (msg.headers or {}).get(REQUEST_ID_HEADER)
            log.error("dropping malformed job (%r)", exc, extra={"request_id": rid} if rid else None)
            self.spawn(msg.term())
            return
        now = time.time()
        metrics.QUEUE_WAIT.labels(**self._labels).observe(max(0.0, now - job.created))
        if job.request_id in self.active:
            # A redelivery of a job this worker already runs (it was slow to ack).
            self.spawn(msg.in_progress())
            return
        chunks = ChunkStream(
            functools.partial(self.bus.publish_stream, job.request_id),
            worker_id=self.config.worker_id,
            max_tokens=self.config.chunk_max_tokens,
            max_delay=self.config.chunk_max_delay_s,
        )
        active = ActiveRequest(job=job, msg=msg, chunks=chunks, fetched_at=time.monotonic())
        self.active[job.request_id] = active
        self._idle.clear()
        metrics.ACTIVE.labels(**self._labels).set(len(self.active))
        active.task = self.spawn(self._run_job(active))

    async def _ack(self, active: ActiveRequest) -> None:
        if not active.acked:
            active.acked = True
            try:
                await active.msg.ack()
            except Exception as exc:  # noqa: BLE001 - logged: the job may run a second time
                log.error(
                    "ack of %s failed (%r): JetStream may hand it to another worker after the ack wait",
                    active.job.request_id,
                    exc,
                )

    async def _run_job(self, active: ActiveRequest) -> None:
        job = active.job
        rid = job.request_id
        # This task's log lines (and those of the tasks it starts) name the request.
        logs.bind(rid, user_id=job.meta.user_id if job.meta else None, model=job.model)
        outcome = "completed"
        try:
            if job.deadline < time.time():
                await self._ack(active)
                await self._fail(active, "deadline_exceeded", "the request passed its deadline in the queue")
                outcome = "expired"
                return
            deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, job.deadline - time.time()), self.cancel, rid, "deadline"
            )
            try:
                outcome = await self._generate(active)
            finally:
                deadline_timer.cancel()
        except RequestRejected as exc:
            outcome = "rejected"
            await self._ack(active)
            await self._fail(active, exc.code, exc.message, status=exc.status, param=exc.param)
        except Exception:
            outcome = "failed"
            log.exception("job %s failed", rid)
            if not active.acked and _deliveries(active.msg) < topology.MAX_DELIVER:
                # Before the first token nothing reached the client: another worker may
                # succeed, so hand the job back.
                try:
                    await active.msg.nak(delay=1.0)
                except Exception as exc:  # noqa: BLE001 - JetStream redelivers after the ack wait
                    log.warning("nak of %s failed: %r", rid, exc)
                active.acked = True
            else:
                # Past its last try, or mid-stream: the client must hear it now.
                await self._ack(active)
                await self._fail(active, "engine_error", "the engine failed on this request")
        finally:
            # One line per job, so `./logs --request ID` follows a request through the worker:
            # at INFO when it did not complete; a completed one at DEBUG (at INFO it cost
            # ~1.5 % of a core at 100 req/s in the load test, and the API's line has it).
            ended = time.monotonic()
            ttft = active.first_token_at
            log.log(
                logging.DEBUG if outcome == "completed" else logging.INFO,
                "job %s in %.0f ms",
                outcome,
                (ended - active.fetched_at) * 1000,
                extra={
                    "outcome": outcome,
                    "worker_id": self.config.worker_id,
                    "ttft_ms": None if ttft is None else round((ttft - active.fetched_at) * 1000, 1),
                    "latency_ms": round((ended - active.fetched_at) * 1000, 1),
                },
            )
            active.chunks.close()
            metrics.JOBS.labels(outcome=outcome, **self._labels).inc()
            self._forget(active)

    def _forget(self, active: ActiveRequest) -> None:
        """Free a request's slot: it ended (or was abandoned)."""
        # An abandoned task that ends later must not remove a redelivery of its job.
        if self.active.get(active.job.request_id) is active:
            del self.active[active.job.request_id]
        metrics.ACTIVE.labels(**self._labels).set(len(self.active))
        if not self.active:
            self._idle.set()
        self._slot_freed.set()

    def _first_token(self, active: ActiveRequest) -> None:
        metrics.TTFT.labels(**self._labels).observe(time.monotonic() - active.fetched_at)
        active.first_token_at = time.monotonic()
        # Acked only now: a worker that dies before its first token leaves the job to
        # JetStream, which hands it to another worker.
        self.spawn(self._ack(active))

    async def _generate(self, active: ActiveRequest) -> str:
        job = active.job
        rid = job.request_id
        chunks = active.chunks
        progress = Progress(on_first_token=functools.partial(self._first_token, active))
        request = OpenAIRequest(request_id=rid, endpoint=job.endpoint, body=job.body, stream=job.stream)
        answer: Answer | None = None
        last = ""
        try:
            if active.cancel_reason is None:  # cancelled before it ever reached the engine
                active.in_engine = True
                answer = await self.engine.serve(request, progress)
                # Accepted by the engine: the API may now start its response.
                await self.bus.publish_stream(rid, schemas.Started(worker_id=self.config.worker_id))
            if isinstance(answer, str):
                last = answer
            elif answer is not None:
                sent = 0
                async for data in answer:
                    if data.startswith(_DONE):
                        last = data
                        continue
                    chunks.add(data, progress.completion_tokens - sent)
                    sent = progress.completion_tokens
        except asyncio.CancelledError:
            if active.cancel_reason is None:
                raise
            # Our own cancel (client gone, deadline): finish the stream normally.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            active.generated = True
            # Closing the iterator aborts the engine request if it is still running.
            if answer is not None and not isinstance(answer, str):
                aclose = getattr(answer, "aclose", None)
                if aclose is not None:
                    await aclose()
        if active.cancel_reason == "requeue" and not active.acked:
            # A switch ended it before its first token: nothing reached the client, so the
            # job goes back to its model's queue for another worker (or this one, later).
            active.acked = True
            try:
                await active.msg.nak()
            except Exception as exc:  # noqa: BLE001 - JetStream redelivers after the ack wait
                log.warning("nak of %s failed: %r", rid, exc)
            return "requeued"
        usage = schemas.Usage(
            prompt_tokens=progress.prompt_tokens, completion_tokens=progress.completion_tokens
        )
        metrics.TOKENS.labels(**self._labels).inc(progress.completion_tokens)
        metrics.PROMPT_TOKENS.labels(**self._labels).inc(progress.prompt_tokens)
        await self._ack(active)
        ttft = None if active.first_token_at is None else active.first_token_at - active.fetched_at
        if active.cancel_reason is not None:
            metrics.ABORTS.labels(reason=active.cancel_reason, **self._labels).inc()
            await chunks.finish("cancelled", usage)
            metrics.CHUNKS.labels(**self._labels).inc(chunks.seq)
            await self.bus.publish_event(
                schemas.Cancelled.for_job(
                    job,
                    worker_id=self.config.worker_id,
                    reason=active.cancel_reason,
                    text=progress.text,
                    usage=usage,
                )
            )
            return "cancelled"
        if progress.finish_reason == "cancelled":
            # The engine aborted it on its own (not a cancel of ours): say so, not "stop".
            await self._fail(active, "engine_error", "the engine aborted this request")
            return "failed"
        reason: FinishReason = "length" if progress.finish_reason == "length" else "stop"
        await chunks.finish(reason, usage, last)
        metrics.CHUNKS.labels(**self._labels).inc(chunks.seq)
        await self.bus.publish_event(
            schemas.Completed.for_job(
                job,
                worker_id=self.config.worker_id,
                text=progress.text,
                finish_reason=reason,
                usage=usage,
                ttft_s=ttft,
                duration_s=time.monotonic() - active.fetched_at,
            )
        )
        return "completed"

    async def _fail(
        self, active: ActiveRequest, code: str, message: str, *, status: int = 0, param: str | None = None
    ) -> None:
        job = active.job
        await active.chunks.flushed()  # the error follows whatever output went before it
        await self.bus.publish_stream(
            job.request_id,
            schemas.StreamError(
                worker_id=self.config.worker_id, code=code, message=message, status=status, param=param
            ),
        )
        await self.bus.publish_event(
            schemas.Failed.for_job(job, code=code, message=message, worker_id=self.config.worker_id)
        )

    # --- cancel and housekeeping ----------------------------------------------------

    def cancel(self, request_id: str, reason: str) -> bool:
        """Abort a running request; the engine frees its slot on its next step."""
        active = self.active.get(request_id)
        if active is None or active.cancel_reason is not None or active.task is None or active.generated:
            return False
        active.cancel_reason = reason
        # Interrupt only a request in the engine: a task cancelled before it first runs
        # would never run its clean-up (slot, ack); before the engine, the flag suffices.
        if active.in_engine:
            active.task.cancel()
        return True

    async def on_cancel(self, data: bytes) -> None:
        """Handle a chat.cancel.<id> message; malformed ones are ignored."""
        try:
            cancel = schemas.decode_cancel(data)
        except Exception:  # noqa: BLE001 - nothing a client sends may crash a worker
            log.warning("ignoring a malformed cancel message")
            return
        if self.cancel(cancel.request_id, cancel.reason):
            log.info(
                "cancelled %s (%s)", cancel.request_id, cancel.reason, extra={"request_id": cancel.request_id}
            )

    async def _housekeeping(self) -> None:
        """Stream heartbeats, in_progress for long prefills, and the KV status."""
        tick = min(self.config.heartbeat_s, self.config.ack_wait_s / 3, 1.0) / 2
        progress_every = self.config.ack_wait_s / 3
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            try:
                self._housekeeping_round(loop, progress_every)
            except Exception:
                log.exception("housekeeping failed")
                raise

    def _housekeeping_round(self, loop: asyncio.AbstractEventLoop, progress_every: float) -> None:
        now = time.monotonic()
        loop_now = loop.time()
        for active in list(self.active.values()):
            if not active.acked and now - active.last_progress >= progress_every:
                # A long prefill must not look like a dead worker to JetStream.
                active.last_progress = now
                self.spawn(active.msg.in_progress())
            chunks = active.chunks
            quiet_since = max(chunks.last_sent, active.last_beat)
            # From the first token on, silence means a lost worker to the API.
            if active.first_token_at is not None and loop_now - quiet_since >= self.config.heartbeat_s:
                active.last_beat = loop_now
                self.spawn(
                    self.bus.publish_stream(
                        active.job.request_id,
                        schemas.Heartbeat(worker_id=self.config.worker_id, next_seq=chunks.seq),
                    )
                )
        if now >= self._next_status:
            self._next_status = now + self.config.status_interval_s
            self.spawn(self.announce(self._state))
