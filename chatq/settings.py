"""One typed settings object, read from the environment once at start."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from chatq.env import Env
from chatq.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

EngineKind = Literal["vllm", "synthetic"]
Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
JWT_SECRET_MIN_LENGTH = 32


class RoleLimits(msgspec.Struct, frozen=True):
    """A role's rate limits, per user and per API key; 0 means no limit."""

    rpm: int
    tpm: int
    concurrency: int


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything chatq reads from the environment; see docs/configuration.md."""

    home: Path
    dev_mode: bool
    # LOG_PROMPTS: the API's request line carries the prompt's last message (masked).
    log_prompts: bool = False
    nats_url: str
    embedded_nats: bool
    # Who this process is on NATS (the embedded server's users are made by ./start).
    nats_user: str | None = None
    nats_password: str | None = None
    # An outside NATS server's users (a `user password` line per service, as ./start makes
    # for its own): ./start gives each process its service's login from it.
    nats_users_file: Path | None = None
    # The CA that signed a TLS NATS server's certificate (NATS_URL tls://…).
    nats_tls_ca_file: Path | None = None
    # How many servers of a NATS cluster keep each stream and the workers bucket (1: one
    # server; 3 on a cluster of 3). A stream already kept on more is not lowered.
    nats_stream_replicas: int = 1
    database_url: str | None
    # Persistence worker
    database_connect_timeout_s: int
    database_statement_timeout_ms: int
    persistence_max_deliver: int
    # Accounts
    jwt_secret: str | None
    jwt_expire_minutes: int
    api_key_cache_s: float
    conversation_wait_s: float
    title_jobs: bool
    api_db_pool_max: int
    # Rate limits (Redis)
    redis_url: str | None
    rate_limit_failure: Literal["open", "closed"]
    rate_limits: dict[str, RoleLimits]
    login_max_failures: int
    login_max_failures_per_client: int
    login_window_s: int
    # API
    host: str
    port: int
    # How long a client may take to send a request's head, then its body (api/deadlines.py).
    http_header_timeout_s: float
    http_body_timeout_s: float
    # FORWARDED_ALLOW_IPS: the proxies whose X-Forwarded-For/-Proto uvicorn believes.
    forwarded_allow_ips: tuple[str, ...]
    api_keys: frozenset[str]
    models: tuple[str, ...]
    queue_max: int
    request_timeout_s: float
    watchdog_s: float
    stream_buffer_bytes: int
    # Streams one API process relays at once; beyond, 429 api_busy (0: no cap).
    api_max_streams: int = 500
    max_request_bytes: int
    cors_origins: tuple[str, ...]
    max_tokens_limit: int
    default_max_tokens: int
    queue_depth_cache_s: float
    # api/admission.py: the bound is CHATQ_QUEUE_MAX (depth) or what the workers start
    # within admission_wait_target_s (latency).
    admission_policy: Literal["depth", "latency"]
    admission_wait_target_s: float
    # Message plane
    jobs_max_msgs: int
    ack_wait_s: float
    # Inference worker
    engine: EngineKind
    model_id: str | None
    model_name: str
    # Model profiles (docs/models.md)
    model_profile: str | None
    profiles_file: Path | None
    # CONTENT_POLICY_FILE: named banned words and patterns (api/content_policy.py)
    content_policy_file: Path | None = None
    require_gpu: bool
    unserved_model: Literal["wait", "reject"]
    switch_grace_s: float
    drain_grace_s: float
    worker_id: str
    worker_slots: int
    worker_metrics_port: int
    # ./start's process table: how many inference workers and API processes, and the
    # profile of each worker (WORKER_PROFILES, one per worker; empty: MODEL_PROFILE's).
    inference_workers: int = 1
    api_workers: int = 1
    worker_profiles: tuple[str, ...] = ()
    # The API binds its port with SO_REUSEPORT, beside its siblings (API_WORKERS > 1).
    api_reuse_port: bool = False
    chunk_max_tokens: int
    chunk_max_delay_s: float
    # workers/inference/pacing.py: take no job while one has waited for its first token
    # longer than this many times the engine's quickest recent one (0: off).
    worker_ttft_hold: float
    heartbeat_s: float
    # vLLM
    vllm_dtype: str
    vllm_gpu_memory_utilization: float | None
    vllm_enforce_eager: bool
    vllm_max_model_len: int
    vllm_tool_call_parser: str | None
    vllm_extra_args: str
    # Synthetic engine
    synth_tokens_per_s: float
    synth_ttft_s: float
    synth_start_s: float
    # Telemetry
    telemetry_port: int
    telemetry_interval_s: float

    @property
    def models_dir(self) -> Path:
        """Where prepared models live."""
        return self.home / "models"


def jwt_secret_problem(secret: str | None) -> str | None:
    """Why a JWT secret is unsafe, or None: unset, short, or a well-known placeholder."""
    if not secret:
        return "JWT_SECRET is not set"
    if len(secret) < JWT_SECRET_MIN_LENGTH:
        return f"JWT_SECRET is shorter than {JWT_SECRET_MIN_LENGTH} characters"
    lowered = secret.lower()
    if len(set(secret)) < 8 or any(
        word in lowered for word in ("secret", "changeme", "change-me", "change_me", "password", "default")
    ):
        return "JWT_SECRET looks like a placeholder, not a random value"
    return None


def trusted_proxies(env: Env) -> tuple[str, ...]:
    """FORWARDED_ALLOW_IPS as uvicorn reads it: addresses or networks, or `*` for any peer;
    unset, loopback only (uvicorn's default); set empty, none (the headers are ignored)."""
    if not env.given("FORWARDED_ALLOW_IPS"):
        return ("127.0.0.1",)
    proxies = tuple(env.items("FORWARDED_ALLOW_IPS"))
    for proxy in proxies:
        if proxy == "*":
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"FORWARDED_ALLOW_IPS must list IP addresses or networks (or *), got {proxy!r}"
            ) from None
    return proxies


def served_name(model_id: str | None) -> str:
    """The public model name for MODEL_ID: the default name, a directory's name, or the id."""
    if not model_id:
        return DEFAULT_MODEL_NAME
    path = Path(model_id)
    return path.name if path.is_dir() else model_id


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check the settings; raises ConfigError on a missing or unsafe value."""
    env = Env(os.environ if environ is None else environ)
    home = Path(env.text("CHATQ_HOME", str(REPO_ROOT / ".chatq"))).resolve()
    # DEVELOPMENT_MODE is the original plan's name; CHATQ_DEV an older alias.
    dev_mode = env.flag("DEVELOPMENT_MODE", env.flag("CHATQ_DEV", False))
    jwt_secret = env.optional("JWT_SECRET")
    secret_file = home / "jwt_secret"
    if jwt_secret is None and secret_file.is_file():
        jwt_secret = secret_file.read_text().strip() or None
    failure = env.text("RATE_LIMIT_FAILURE", "open")
    if failure not in ("open", "closed"):
        raise ConfigError(f"RATE_LIMIT_FAILURE must be 'open' or 'closed', got {failure!r}")
    defaults = {"user": RoleLimits(60, 100_000, 4), "admin": RoleLimits(600, 1_000_000, 32)}
    rate_limits = {
        role: RoleLimits(
            rpm=env.integer(f"RATE_LIMIT_{role.upper()}_RPM", limits.rpm),
            tpm=env.integer(f"RATE_LIMIT_{role.upper()}_TPM", limits.tpm),
            concurrency=env.integer(f"RATE_LIMIT_{role.upper()}_CONCURRENCY", limits.concurrency),
        )
        for role, limits in defaults.items()
    }
    model_id = env.optional("MODEL_ID")
    model_profile = env.optional("MODEL_PROFILE")
    admission_policy = env.text("ADMISSION_POLICY", "depth")
    if admission_policy not in ("depth", "latency"):
        raise ConfigError(f"ADMISSION_POLICY must be 'depth' or 'latency', got {admission_policy!r}")
    unserved_model = env.text("UNSERVED_MODEL", "wait")
    if unserved_model not in ("wait", "reject"):
        raise ConfigError(f"UNSERVED_MODEL must be 'wait' or 'reject', got {unserved_model!r}")
    profiles_file = env.optional("PROFILES_FILE")
    content_policy_file = env.optional("CONTENT_POLICY_FILE")
    # MODEL_PROFILE may be an alias; catalog.profiles.settle_model_profile names its id.
    model_name = model_profile or env.text("MODEL_NAME", served_name(model_id))
    engine = env.text("INFERENCE_ENGINE", "vllm")
    if engine not in ("vllm", "synthetic"):
        raise ConfigError(f"INFERENCE_ENGINE must be 'vllm' or 'synthetic', got {engine!r}")

    api_keys = frozenset(env.items("CHATQ_API_KEYS"))
    keys_file = home / "api_keys"
    if keys_file.is_file():
        api_keys |= {line.strip() for line in keys_file.read_text().splitlines() if line.strip()}
    if any(len(key) < 20 for key in api_keys):
        raise ConfigError("every API key must be at least 20 characters long")

    worker_profiles = tuple(env.items("WORKER_PROFILES"))
    inference_workers = env.integer("INFERENCE_WORKERS", len(worker_profiles) or 1)
    api_workers = env.integer("API_WORKERS", 1)
    if worker_profiles and len(worker_profiles) != inference_workers:
        raise ConfigError(
            f"WORKER_PROFILES names {len(worker_profiles)} profiles for {inference_workers} "
            "inference workers: name one per worker, or leave INFERENCE_WORKERS unset"
        )

    nats_user = env.optional("NATS_USER")
    nats_password = env.optional("NATS_PASSWORD")
    if nats_password is not None and nats_user is None:
        raise ConfigError("NATS_PASSWORD is set without NATS_USER: set both, or neither")

    watchdog_s = env.number("STREAM_WATCHDOG_S", 15.0)
    heartbeat_s = env.number("STREAM_HEARTBEAT_S", min(2.0, watchdog_s / 3))
    if heartbeat_s >= watchdog_s:
        raise ConfigError(
            f"STREAM_HEARTBEAT_S ({heartbeat_s}) must be shorter than STREAM_WATCHDOG_S "
            f"({watchdog_s}), or every quiet stream would be declared lost"
        )
    return Settings(
        home=home,
        dev_mode=dev_mode,
        log_prompts=env.flag("LOG_PROMPTS", False),
        nats_url=env.text("NATS_URL", "nats://127.0.0.1:4222"),
        embedded_nats=env.flag("CHATQ_EMBEDDED_NATS", True),
        nats_user=nats_user,
        nats_password=nats_password,
        nats_users_file=Path(users_file) if (users_file := env.optional("NATS_USERS_FILE")) else None,
        nats_tls_ca_file=Path(ca_file) if (ca_file := env.optional("NATS_TLS_CA_FILE")) else None,
        nats_stream_replicas=env.integer("NATS_STREAM_REPLICAS", 1),
        database_url=env.optional("DATABASE_URL"),
        database_connect_timeout_s=env.integer("DATABASE_CONNECT_TIMEOUT_S", 5),
        database_statement_timeout_ms=env.integer("DATABASE_STATEMENT_TIMEOUT_MS", 10_000),
        persistence_max_deliver=env.integer("PERSISTENCE_MAX_DELIVER", 5),
        jwt_secret=jwt_secret,
        jwt_expire_minutes=env.integer("JWT_EXPIRE_MINUTES", 30),
        api_key_cache_s=env.number("API_KEY_CACHE_S", 5.0),
        conversation_wait_s=env.number("CONVERSATION_WAIT_S", 10.0),
        title_jobs=env.flag("TITLE_JOBS", True),
        api_db_pool_max=env.integer("API_DB_POOL_MAX", 10),
        redis_url=env.optional("REDIS_URL"),
        rate_limit_failure=failure,  # type: ignore[arg-type]
        rate_limits=rate_limits,
        login_max_failures=env.integer("LOGIN_MAX_FAILURES", 10),
        login_max_failures_per_client=env.integer("LOGIN_MAX_FAILURES_PER_CLIENT", 100),
        login_window_s=env.integer("LOGIN_WINDOW_S", 900),
        host=env.text("CHATQ_HOST", "127.0.0.1"),
        port=env.integer("CHATQ_PORT", 8080),
        http_header_timeout_s=env.number("HTTP_HEADER_TIMEOUT_S", 10.0),
        http_body_timeout_s=env.number("HTTP_BODY_TIMEOUT_S", 30.0),
        forwarded_allow_ips=trusted_proxies(env),
        api_keys=api_keys,
        models=tuple(env.items("CHATQ_MODELS")) or (model_name,),
        queue_max=env.integer("CHATQ_QUEUE_MAX", 64),
        request_timeout_s=env.number("CHATQ_REQUEST_TIMEOUT_S", 600.0),
        watchdog_s=watchdog_s,
        stream_buffer_bytes=env.integer("STREAM_BUFFER_BYTES", 4 << 20),
        api_max_streams=env.integer("API_MAX_STREAMS", 500),
        max_request_bytes=env.integer("CHATQ_MAX_REQUEST_BYTES", 1 << 20),
        cors_origins=tuple(env.items("CORS_ORIGINS")),
        max_tokens_limit=env.integer("CHATQ_MAX_TOKENS", 4096),
        default_max_tokens=env.integer("CHATQ_DEFAULT_MAX_TOKENS", 512),
        queue_depth_cache_s=env.number("CHATQ_QUEUE_DEPTH_CACHE_S", 0.25),
        admission_policy=admission_policy,  # type: ignore[arg-type]
        admission_wait_target_s=env.number("ADMISSION_WAIT_TARGET_S", 2.0),
        jobs_max_msgs=env.integer("JOBS_MAX_MSGS", 10_000),
        ack_wait_s=env.number("JOBS_ACK_WAIT_S", 30.0),
        engine=engine,  # type: ignore[arg-type]
        model_id=model_id,
        model_name=model_name,
        model_profile=model_profile,
        profiles_file=None if profiles_file is None else Path(profiles_file).expanduser().resolve(),
        content_policy_file=(
            None if content_policy_file is None else Path(content_policy_file).expanduser().resolve()
        ),
        require_gpu=env.flag("REQUIRE_GPU", False),
        unserved_model=unserved_model,  # type: ignore[arg-type]
        switch_grace_s=env.number("SWITCH_GRACE_S", 30.0),
        drain_grace_s=env.number("DRAIN_GRACE_S", 30.0),
        worker_id=env.text("WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
        worker_slots=env.integer("WORKER_SLOTS", 0),
        worker_metrics_port=env.integer("WORKER_METRICS_PORT", 9101),
        inference_workers=inference_workers,
        api_workers=api_workers,
        worker_profiles=worker_profiles,
        api_reuse_port=env.flag("CHATQ_REUSE_PORT", False),
        chunk_max_tokens=env.integer("CHUNK_MAX_TOKENS", 16),
        chunk_max_delay_s=env.number("CHUNK_MAX_DELAY_MS", 15.0) / 1000,
        # With latency-aware admission the engine's own queue must stay short too: what
        # a worker does not take waits in JetStream, where admission sees it.
        worker_ttft_hold=env.number("WORKER_TTFT_HOLD", 2.0 if admission_policy == "latency" else 0.0),
        heartbeat_s=heartbeat_s,
        vllm_dtype=env.text("VLLM_DTYPE", "auto"),
        vllm_gpu_memory_utilization=env.optional_number("VLLM_GPU_MEMORY_UTILIZATION"),
        vllm_enforce_eager=env.flag("VLLM_ENFORCE_EAGER", True),
        vllm_max_model_len=env.integer("VLLM_MAX_MODEL_LEN", 4096),
        # The bundled model gets vLLM's Hermes parser (<tool_call> JSON), so tool calls work
        # out of the box; another model names its own parser (or none, to turn tools off).
        vllm_tool_call_parser=(
            env.optional("VLLM_TOOL_CALL_PARSER")
            if model_id or env.given("VLLM_TOOL_CALL_PARSER")
            else "hermes"
        ),
        vllm_extra_args=env.text("VLLM_EXTRA_ARGS", ""),
        synth_tokens_per_s=env.number("SYNTH_TOKENS_PER_S", 20.0),
        synth_ttft_s=env.number("SYNTH_TTFT_MS", 50.0) / 1000,
        synth_start_s=env.number("SYNTH_START_S", 0.0),
        telemetry_port=env.integer("TELEMETRY_PORT", 9102),
        telemetry_interval_s=env.number("TELEMETRY_INTERVAL_S", 5.0),
    )
