"""chatq start (in the foreground or --detach) and stop: one supervisor per state folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from api.content_policy import load_policies
from catalog.profiles import settle_model_profile
from chatq.settings import Settings, load
from stack import state
from stack.credentials import ensure_api_key, ensure_jwt_secret
from stack.process_table import scaled_table
from stack.supervisor import Supervisor

HEALTH_TIMEOUT_S = 900.0


def cmd_start(s: Settings, detach: bool) -> int:
    pid = state.running_pid(s)
    if pid is not None:
        print(f"chatq is already running (pid {pid}) at {state.api_url(s)}; ./stop stops it")
        return 1
    s.home.mkdir(parents=True, exist_ok=True)
    new_key = ensure_api_key(s)
    if ensure_jwt_secret(s) or new_key is not None:
        s = load()  # re-read: the key and secret files are part of the settings
    settle_model_profile(s)  # a MODEL_PROFILE naming no profile stops here, before anything starts
    load_policies(s.content_policy_file)  # so does a bad CONTENT_POLICY_FILE
    from stack.web import ensure_built

    ensure_built()  # the web interface, when its sources changed (a failure only warns)
    if s.engine == "vllm" and not s.model_id:
        from catalog.model_prep import prepare_default_model

        path = prepare_default_model(s.models_dir, progress=True)
        print(f"chatq: model ready at {path}", flush=True)
    if detach:
        return _detach(s, new_key)
    return _run(s, new_key)


def _banner(s: Settings, new_key: str | None) -> None:
    print(f"chatq is up: {state.api_url(s)}  (OpenAI base_url {state.api_url(s)}/v1)", flush=True)
    if new_key:
        print(f"chatq: your API key (saved in {s.home / 'api_keys'}): {new_key}", flush=True)
    elif s.dev_mode and not s.api_keys:
        print("chatq: DEVELOPMENT MODE: calls without credentials act as admin", flush=True)
    else:
        print(f"chatq: service API keys are in {s.home / 'api_keys'} or CHATQ_API_KEYS", flush=True)
    if s.dev_mode:
        print("chatq: DEVELOPMENT MODE: test accounts admin/admin123 and test/test", flush=True)
    else:
        print(
            "chatq: accounts: create the first admin with\n"
            "         .venv/bin/chatq users add NAME --role admin\n"
            "       then log in with POST /api/auth/login (docs/accounts.md)",
            flush=True,
        )


def _run(s: Settings, new_key: str | None) -> int:
    state.pidfile(s).parent.mkdir(parents=True, exist_ok=True)
    state.pidfile(s).write_text(str(os.getpid()))
    sup = Supervisor(s)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    try:
        from catalog.hardware import read_gpus

        sup.start(scaled_table(s, gpus=len(read_gpus()) if s.inference_workers > 1 else 0))
        if not sup.wait_healthy(HEALTH_TIMEOUT_S):
            sup.stop()
            return 1
        _banner(s, new_key)
        return sup.supervise()
    finally:
        sup.stop()
        state.pidfile(s).unlink(missing_ok=True)


def _detach(s: Settings, new_key: str | None) -> int:
    state.logdir(s).mkdir(parents=True, exist_ok=True)
    log = open(state.logdir(s) / "chatq.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stack.cli", "start"],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"chatq failed to start; see {state.logdir(s) / 'chatq.log'}:", file=sys.stderr)
            tail = (state.logdir(s) / "chatq.log").read_text(errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            return 1
        health = state.health(state.api_url(s))
        if health and health.get("status") == "healthy":
            _banner(s, new_key)
            print("chatq: running in the background; ./status, ./logs, ./stop", flush=True)
            return 0
        time.sleep(0.5)
    print("chatq: not healthy in time; ./logs shows why, ./stop stops it", file=sys.stderr)
    return 1


def cmd_stop(s: Settings) -> int:
    pid = state.running_pid(s)
    if pid is None:
        print("chatq is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while state.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if state.alive(pid):
        print(f"chatq (pid {pid}) did not stop in time", file=sys.stderr)
        return 1
    print("chatq stopped")
    return 0
