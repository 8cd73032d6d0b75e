"""The systems under test, each started on free loopback ports and stopped afterwards.

- chatq: one vLLM inference worker and the API, started by chatq's launcher
  (stack.supervisor) with nats-server, and PostgreSQL and Redis with accounts on.
- vllm-server: vLLM's own OpenAI server, with the same engine settings.
- synthetic: chatq with the synthetic engine (the pipeline alone, no model).
- external: a server that is already running (--url), only measured.

Every process is started by stack.processes in a session of its own, so stopping it
also stops its children (vLLM's engine core); only processes started here are ever
signalled.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chatq.errors import ChatqError, LaunchError
from loadtest.config import ADMISSION_TARGETS, API_KEY, EngineConfig, RunConfig, SynthConfig, scaled_shape
from stack import process_table
from stack.processes import Process, spawn, wait_http
from stack.servers import free_port
from stack.supervisor import Supervisor, launch, workers_ready

REPO_ROOT = Path(__file__).resolve().parent.parent


class TargetError(RuntimeError):
    """A target failed to start or died."""


@dataclass
class Target:
    """Base: a named server the client sends requests to."""

    name: str
    kind: str
    base_url: str = ""
    api_key: str | None = API_KEY
    model: str = ""
    procs: list[Process] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    start_seconds: float | None = None
    api_pids: list[int] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    worker_metrics_urls: list[str] = field(default_factory=list)
    synth: SynthConfig | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise TargetError(f"{p.name} exited with {p.proc.poll()}:\n{p.tail()}")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": self.base_url,
            "model": self.model,
            "start_seconds": self.start_seconds,
            "settings": self.settings,
            "logs": {p.name: str(p.log) for p in self.procs},
        }

    def __enter__(self) -> Target:
        started = time.monotonic()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = round(time.monotonic() - started, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ChatqTarget(Target):
    """An inference worker and the API from the launcher (stack.supervisor), with their
    servers, on free ports, state in a temp dir."""

    env_extra: dict[str, str] = field(default_factory=dict)
    logdir: Path = Path()
    start_timeout: float = 600.0
    # Accounts on: PostgreSQL and Redis run too, and requests carry a user's API key.
    accounts: bool = False
    # How many inference workers share the queue, and API processes share the port.
    workers: int = 1
    apis: int = 1
    _tmp: Path | None = None
    _stack: Supervisor | None = None

    def start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix=f"loadtest-{self.name}-"))
        env = stack_env(**self.env_extra)
        if self.accounts:
            env.update(
                # Limits far above the load, but on: every request runs every check.
                RATE_LIMIT_USER_RPM="100000000",
                RATE_LIMIT_USER_TPM="1000000000",
                RATE_LIMIT_USER_CONCURRENCY="100000",
            )
        workers = [
            replace(
                process_table.INFERENCE_WORKER, name=f"worker-{i}" if self.workers > 1 else "worker"
            ).with_env(WORKER_METRICS_PORT=str(free_port()), WORKER_ID=f"loadtest-{self.name}-{i}")
            for i in range(1, self.workers + 1)
        ]
        # Several API processes share one port as ./start --api-workers runs them.
        port = str(free_port())
        apis = [
            replace(process_table.API, name=f"api-{i}" if self.apis > 1 else "api").with_env(
                CHATQ_PORT=port, **({"CHATQ_REUSE_PORT": "1"} if self.apis > 1 else {})
            )
            for i in range(1, self.apis + 1)
        ]
        if not self.accounts:
            apis = [replace(api, needs=()) for api in apis]
        try:
            self._stack = sup = launch(
                self._tmp / "home",
                env,
                [*workers, *apis],
                ready=workers_ready(self.workers),
                timeout=self.start_timeout,
                logdir=self.logdir,
                cwd=REPO_ROOT,
            )
        except (ChatqError, RuntimeError, TimeoutError) as exc:
            raise TargetError(f"{self.name}: {exc}") from None
        self.procs = [sup.process(spec.name) for spec in [*workers, *apis]]
        self.base_url = sup.api_urls[0]
        self.worker_pids = [sup.process(spec.name).pid for spec in workers]
        self.api_pids = [sup.process(spec.name).pid for spec in apis]
        self.worker_metrics_urls = [f"http://127.0.0.1:{sup.port(spec)}/metrics" for spec in workers]
        env["CHATQ_HOME"] = str(sup.s.home)
        if self.accounts:
            assert sup.database_url and sup.redis_url
            env.update(DATABASE_URL=sup.database_url, REDIS_URL=sup.redis_url)
            self.api_key = _user_key(sup.database_url)
        self.settings = {"env": _public_env(env), "effective": _effective_settings(env)}

    def stop(self) -> None:
        # The API first (it stops taking requests), then the worker, then the servers.
        if self._stack is not None:
            self._stack.stop()
            self._stack = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def stack_env(**extra: str) -> dict[str, str]:
    """The settings of a launcher's stack for a load test: its own NATS port, secrets and keys."""
    return {
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "CHATQ_EMBEDDED_NATS": "1",
        "CHATQ_API_KEYS": API_KEY,
        "JWT_SECRET": secrets.token_urlsafe(48),
        "CHATQ_DEV": "0",
        "LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _user_key(dsn: str) -> str:
    """A user account and an API key of theirs, made in the target's database."""
    import asyncio

    import psycopg

    from database import accounts

    async def make() -> str:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            user = await accounts.create_user(conn, "loadtest", secrets.token_urlsafe(16))
            _, key = await accounts.create_key(conn, user.id, "loadtest")
            return key

    return asyncio.run(make())


@dataclass
class VllmServerTarget(Target):
    """vLLM's own OpenAI server (python -m vllm.entrypoints.openai.api_server)."""

    model_dir: Path = Path()
    engine: EngineConfig = field(default_factory=EngineConfig)
    logdir: Path = Path()
    start_timeout: float = 600.0

    def command(self, port: int) -> list[str]:
        e = self.engine
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.model,
            "--dtype",
            e.dtype,
            "--gpu-memory-utilization",
            str(e.gpu_memory_utilization),
            "--max-model-len",
            str(e.max_model_len),
            "--max-num-seqs",
            str(e.max_num_seqs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # chatq's API logs no access lines either; the engine still logs its stats.
            "--disable-uvicorn-access-log",
        ]
        if e.enforce_eager:
            argv.append("--enforce-eager")
        if self.api_key:
            argv += ["--api-key", self.api_key]
        return argv

    def start(self) -> None:
        port = free_port()
        argv = self.command(port)
        proc = spawn("vllm-server", argv, {"HF_HUB_OFFLINE": "1"}, self.logdir, cwd=REPO_ROOT)
        self.procs.append(proc)
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_pids = self.worker_pids = [proc.pid]
        try:
            wait_http(
                self.base_url + "/health",
                lambda r: r.status_code == 200,
                self.start_timeout,
                self.procs,
                "vLLM's server",
            )
        except LaunchError as exc:
            raise TargetError(str(exc)) from None
        shown = [a if a != self.api_key else "<key>" for a in argv[1:]]
        self.settings = {"command": ["python", *shown]}


@dataclass
class ExternalTarget(Target):
    """A server that is already running: nothing to start or stop."""

    def start(self) -> None:
        self.settings = {"note": "already running; not started by the load test"}

    def stop(self) -> None:
        return None


def _public_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("<secret>" if k in ("CHATQ_API_KEYS", "JWT_SECRET") else v) for k, v in sorted(env.items())}


def _effective_settings(env: dict[str, str]) -> dict[str, Any]:
    """chatq's own reading of the environment the processes got (keys left out)."""
    import msgspec

    from chatq.errors import ChatqError
    from chatq.settings import load

    try:
        settings = load(env)
    except (ChatqError, ValueError) as exc:  # recorded, never fatal: the processes started anyway
        return {"error": repr(exc)}
    raw: dict[str, Any] = msgspec.to_builtins(settings, enc_hook=str)
    raw.pop("api_keys", None)
    return raw


def make_target(kind: str, cfg: RunConfig) -> Target:
    """The target `kind` configured from the run's settings (not started yet)."""
    logdir = cfg.out_dir / "logs" / kind
    e = cfg.engine
    if kind == "vllm-server":
        return VllmServerTarget(
            name=kind,
            kind=kind,
            model=cfg.model_name,
            model_dir=cfg.model_dir,
            engine=e,
            logdir=logdir,
            start_timeout=cfg.start_timeout_s,
        )
    common = {
        "MODEL_ID": str(cfg.model_dir),
        "MODEL_NAME": cfg.model_name,
    }
    if cfg.scenario == "overload":
        common["CHATQ_QUEUE_MAX"] = str(cfg.overload_queue_max)
    elif cfg.queue_max is not None:
        common["CHATQ_QUEUE_MAX"] = str(cfg.queue_max)
    if cfg.admission_policy is not None:
        common["ADMISSION_POLICY"] = cfg.admission_policy  # the admission targets set their own below
    if cfg.admission_wait_target_s is not None:
        common["ADMISSION_WAIT_TARGET_S"] = f"{cfg.admission_wait_target_s:g}"
    synth = None
    shape = scaled_shape(kind) or (1, 1)  # (workers, API processes)
    if kind == "chatq":
        env = {
            **common,
            "INFERENCE_ENGINE": "vllm",
            "WORKER_SLOTS": str(e.max_num_seqs),
            "VLLM_DTYPE": e.dtype,
            "VLLM_GPU_MEMORY_UTILIZATION": str(e.gpu_memory_utilization),
            "VLLM_ENFORCE_EAGER": "1" if e.enforce_eager else "0",
            "VLLM_MAX_MODEL_LEN": str(e.max_model_len),
        }
    elif kind in ("synthetic", "synthetic-accounts", *ADMISSION_TARGETS) or shape != (1, 1):
        synth = cfg.synth
        slots = e.max_num_seqs if cfg.scenario in ("overload", "admission") else synth.slots
        env = {
            **common,
            "INFERENCE_ENGINE": "synthetic",
            "WORKER_SLOTS": str(slots),
            "SYNTH_TOKENS_PER_S": f"{synth.tokens_per_s:g}",
            "SYNTH_TTFT_MS": f"{synth.ttft_ms:g}",
        }
        if kind in ADMISSION_TARGETS:
            env["ADMISSION_POLICY"] = ADMISSION_TARGETS[kind]
    else:
        raise ValueError(f"unknown target {kind!r}; choose from chatq, vllm-server, synthetic")
    return ChatqTarget(
        name=kind,
        kind="synthetic" if kind.startswith("synthetic") else kind,
        # chatq as ./start runs it: accounts, a user's key, rate limits checked.
        accounts=kind in ("chatq", "synthetic-accounts"),
        model=cfg.model_name,
        env_extra=env,
        logdir=logdir,
        start_timeout=cfg.start_timeout_s,
        synth=synth,
        workers=shape[0],
        apis=shape[1],
    )


def external_target(cfg: RunConfig) -> Target:
    assert cfg.url is not None
    return ExternalTarget(
        name=cfg.label,
        kind="external",
        base_url=cfg.url.rstrip("/"),
        api_key=cfg.api_key,
        model=cfg.model_name,
        worker_metrics_urls=[cfg.metrics_url] if cfg.metrics_url else [],
    )
