"""The supervisor (`chatq start`) with real processes.

A child killed with SIGKILL is restarted, and nothing of its process group outlives it; a
chat request sent while the worker is down is answered once it is back; `chatq status`
shows the restart; SIGTERM stops every process the supervisor started; a child that keeps
crashing at start makes the supervisor give up with a non-zero exit.

Run as `python -m tests.integration.test_supervisor`, this module is a fake child with a
grandchild in its process group (see _fake_child).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from chatq.settings import DEFAULT_MODEL_NAME, load
from stack.servers import free_port
from stack.supervisor import Supervisor
from tests.helpers import API_KEY, ROOT, auth, wait_until
from tests.metrics import metric_value

pytestmark = pytest.mark.timeout(300)

# Settings from the caller's environment that would change what these tests start.
_CLEARED = (
    "DATABASE_URL",
    "MODEL_ID",
    "MODEL_NAME",
    "CHATQ_MODELS",
    "WORKER_ID",
    "CHATQ_HOST",
    "CHATQ_EMBEDDED_NATS",
    "CHATQ_DEV",
)


# --- process helpers ------------------------------------------------------------------


def gone(pid: int) -> bool:
    """No such process, or only a zombie nobody reaped yet."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def children(home: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((home / "run" / "children.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data


# --- the supervisor as a subprocess ----------------------------------------------------


@dataclass
class Service:
    """`python -m stack.cli start` and what it printed (stdout and stderr, line by line)."""

    proc: subprocess.Popen[str]
    env: dict[str, str]
    home: Path
    base_url: str
    worker_metrics_url: str
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.output)

    def logs(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.home / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return f"({name}.log: none)"
        return f"--- {name}.log ---\n" + "\n".join(text.splitlines()[-lines:])

    def health(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = httpx.get(self.base_url + "/health", timeout=2).json()
            return data
        except (httpx.HTTPError, ValueError):
            return None

    def status(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stack.cli", "status"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the supervisor exited with {self.proc.returncode}:\n{self.text()}")
            health = self.health()
            if health and health.get("status") == "healthy":
                return
            time.sleep(0.2)
        raise TimeoutError(f"not healthy after {timeout} s:\n{self.text()}\n{self.logs('worker')}")

    def terminate(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_everything(self) -> None:
        """After a failed test: stop it, and if it does not stop, kill it and its children."""
        pids = [int(c["pid"]) for c in children(self.home).values() if c.get("pid")]
        try:
            self.terminate(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for pid in pids:  # still ours: nothing reaped them while the supervisor hung
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def start_service(home: Path, **extra: str) -> Service:
    port = free_port()
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(
        CHATQ_HOME=str(home),
        INFERENCE_ENGINE="synthetic",
        CHATQ_API_KEYS=API_KEY,
        CHATQ_PORT=str(port),
        WORKER_METRICS_PORT=str(metrics_port),
        TELEMETRY_PORT=str(free_port()),
        NATS_URL=f"nats://127.0.0.1:{free_port()}",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stack.cli", "start"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    service = Service(proc, env, home, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            service.output.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return service


def worker_ready(service: Service) -> bool:
    """The worker's pull loop runs: it sets its slots gauge just before it announces itself."""
    try:
        text = httpx.get(service.worker_metrics_url, timeout=1).text
        return metric_value(text, "chatq_worker_slots") > 0
    except (httpx.HTTPError, KeyError):
        return False


# --- a killed worker -------------------------------------------------------------------


@dataclass
class Outage:
    """What happened around `kill -9` of the worker."""

    service: Service
    worker_pid: int
    new_worker_pid: int
    worker_back_s: float  # kill → the restarted worker pulls jobs and /health is healthy
    health: list[tuple[float, str]]  # (seconds after the kill, /health status)
    chat: dict[str, Any]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    # The engine takes 8 s to start, as a model load does (vLLM: ~25 s here), so the outage
    # outlasts the 5 s after which the API stops counting a silent worker.
    service = start_service(tmp_path_factory.mktemp("supervised") / "home", SYNTH_START_S="8")
    try:
        service.wait_healthy(120)
        wait_until("the worker pulls jobs", lambda: worker_ready(service), 30)
        worker_pid = int(children(service.home)["worker"]["pid"])

        chat: dict[str, Any] = {}

        def ask() -> None:
            started = time.monotonic()
            try:
                resp = httpx.post(
                    service.base_url + "/v1/chat/completions",
                    json={
                        "model": DEFAULT_MODEL_NAME,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5,
                    },
                    headers=auth(),
                    timeout=60,
                )
                chat.update(status=resp.status_code, text=resp.text)
            except httpx.HTTPError as exc:
                chat.update(status=None, text=repr(exc))
            chat["seconds"] = time.monotonic() - started

        os.kill(worker_pid, signal.SIGKILL)
        killed = time.monotonic()
        asker = threading.Thread(target=ask)
        asker.start()

        health: list[tuple[float, str]] = []
        back: float | None = None
        while time.monotonic() - killed < 30:
            h = service.health()
            health.append((time.monotonic() - killed, str(h.get("status")) if h else "no answer"))
            current = children(service.home).get("worker", {})
            if (
                back is None
                and current.get("pid") != worker_pid
                and current.get("state") == "running"
                and health[-1][1] == "healthy"
                and worker_ready(service)
            ):
                back = time.monotonic() - killed
            if back is not None and not asker.is_alive():
                break
            time.sleep(0.1)
        asker.join(60)
        new_pid = int(children(service.home).get("worker", {}).get("pid") or 0)
        print(
            f"\nkill -9 of the worker → restarted and healthy again after "
            f"{'(never)' if back is None else f'{back:.2f} s'}; the chat request sent right after "
            f"the kill was answered after {chat.get('seconds', float('nan')):.2f} s "
            f"(status {chat.get('status')})"
        )
        print("health after the kill:", _runs(health))
        yield Outage(service, worker_pid, new_pid, back if back is not None else float("inf"), health, chat)
    finally:
        service.kill_everything()


def _runs(samples: list[tuple[float, str]]) -> str:
    """The health timeline, one entry per change."""
    out: list[str] = []
    last = None
    for t, status in samples:
        if status != last:
            out.append(f"{t:.1f} s {status}")
            last = status
    return ", ".join(out)


def test_the_killed_worker_is_restarted_and_its_group_is_gone(outage: Outage) -> None:
    assert outage.new_worker_pid and outage.new_worker_pid != outage.worker_pid
    assert group_members(outage.worker_pid) == []
    lines = [line for line in outage.service.output if "restarting in" in line]
    assert lines == ["chatq: the worker exited with code -9; restarting in 1 s (restart 1)"]


def test_health_is_healthy_again_within_20_s(outage: Outage) -> None:
    assert outage.worker_back_s < 20, _runs(outage.health)
    assert outage.health[-1][1] == "healthy"


def test_health_is_degraded_while_the_worker_is_down(outage: Outage) -> None:
    statuses = [status for seconds, status in outage.health if seconds < outage.worker_back_s]
    assert "degraded" in statuses, _runs(outage.health)


def test_a_chat_request_sent_while_the_worker_was_down_is_answered(outage: Outage) -> None:
    assert outage.chat.get("status") == 200, (
        f"{outage.chat}\n{outage.service.logs('api')}\n{outage.service.logs('worker')}"
    )
    body = json.loads(outage.chat["text"])
    assert body["choices"][0]["message"]["content"]


def test_status_shows_the_restart(outage: Outage) -> None:
    result = outage.service.status()
    assert result.returncode == 0, result.stdout + result.stderr
    # The process table comes first; workers, queues and consumers follow after a blank line.
    processes = result.stdout.split("\n\n")[0]
    rows = {line.split()[0]: line.split() for line in processes.splitlines() if line.strip()}
    assert rows["PROCESS"][:4] == ["PROCESS", "PID", "STATE", "RESTARTS"]
    # worker  <pid>  running  1  -9  <uptime>
    assert rows["worker"][1:5] == [str(outage.new_worker_pid), "running", "1", "-9"], result.stdout
    for name in ("api", "persistence", "telemetry"):
        assert rows[name][2:5] == ["running", "0", "-"], result.stdout
    assert "status: healthy" in result.stdout


def test_sigterm_stops_every_process_it_started(outage: Outage) -> None:
    service = outage.service
    pids = {name: int(c["pid"]) for name, c in children(service.home).items()}
    assert set(pids) == {"worker", "api", "persistence", "telemetry"}
    supervisor = psutil.Process(service.proc.pid)
    descendants = [p.pid for p in supervisor.children(recursive=True)]  # NATS among them
    postmaster = int((service.home / "postgres" / "postmaster.pid").read_text().split()[0])
    assert not gone(postmaster)

    assert service.terminate() == 0, service.text()

    for name, pid in pids.items():
        assert gone(pid), f"the {name} (pid {pid}) is still running"
        assert group_members(pid) == [], f"the {name}'s process group {pid} is not empty"
    for pid in descendants:
        assert gone(pid), f"pid {pid} ({descendants}) is still running"
    assert gone(postmaster), "PostgreSQL is still running"
    assert not (service.home / "run" / "chatq.pid").exists()
    states = {name: c["state"] for name, c in children(service.home).items()}
    assert set(states.values()) == {"stopped"}, states
    result = service.status()
    assert result.returncode == 3 and "not running" in result.stdout


# --- a child that crashes at every start -----------------------------------------------


def test_the_supervisor_gives_up_on_a_child_that_keeps_crashing_at_start(tmp_path: Path) -> None:
    # Only the persistence worker uses DATABASE_URL: with nothing listening there it exits
    # at once at every start, while everything else comes up.
    service = start_service(
        tmp_path / "home", DATABASE_URL=f"postgresql://chatq@127.0.0.1:{free_port()}/chatq"
    )
    try:
        code = service.proc.wait(120)
    finally:
        service.kill_everything()
    out = service.text()
    assert code != 0, out
    restarts = re.findall(r"chatq: the persistence exited with code 1; restarting in (\d+) s", out)
    assert restarts == ["1", "2", "4", "8"], out
    log = tmp_path / "home" / "logs" / "persistence.log"
    assert (
        "chatq: giving up on the persistence: it exited 5 times in a row within 10 s of its start "
        f"(last exit code 1); stopping chatq. Its log, {log}, ends with:"
    ) in out
    assert "Connection refused" in out  # the log's last lines say why
    state = children(tmp_path / "home")
    assert state["persistence"]["state"] == "gave-up"
    assert state["persistence"]["restarts"] == 4
    for name, c in state.items():
        assert group_members(int(c["pid"])) == [], f"the {name} is still running"


# --- process groups, with a fake child -------------------------------------------------


def test_a_dead_child_takes_its_whole_process_group_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sup = Supervisor(load({"CHATQ_HOME": str(tmp_path / "home")}))
    pidfile = tmp_path / "fake.pids"

    def pids() -> tuple[int, int] | None:
        try:
            child, grandchild = map(int, pidfile.read_text().split())
        except (FileNotFoundError, ValueError):
            return None
        return child, grandchild

    try:
        sup.add(
            "fake",
            "tests.integration.test_supervisor",
            PYTHONPATH=str(ROOT),
            FAKE_CHILD_PIDFILE=str(pidfile),
        )
        child, grandchild = wait_until("the fake child starts", pids, 30)
        assert group_members(child) == sorted([child, grandchild])

        # Only the child is killed, as `kill -9 <pid>` does; its grandchild must go too.
        os.kill(child, signal.SIGKILL)
        pidfile.unlink()
        wait_until(
            "the supervisor notices", lambda: sup.tend() and sup.children["fake"].state != "running", 10
        )
        wait_until("the grandchild is gone", lambda: gone(grandchild), 5)  # SIGKILL is not instant
        assert group_members(child) == []
        assert "chatq: the fake exited with code -9; restarting in 1 s (restart 1)" in capsys.readouterr().out
        assert children(sup.s.home)["fake"]["state"] == "restarting"

        def restarted() -> tuple[int, int] | None:
            sup.tend()
            return pids()

        child2, grandchild2 = wait_until("the fake child restarts", restarted, 30)
        assert child2 != child
        state = children(sup.s.home)["fake"]
        assert (state["pid"], state["state"], state["restarts"], state["last_exit"]) == (
            child2,
            "running",
            1,
            -9,
        )

        # stop(): SIGTERM ends the child but not its grandchild, which the supervisor then
        # kills with the group.
        sup.stop()
        assert gone(child2)
        wait_until("the grandchild is gone", lambda: gone(grandchild2), 5)
        assert group_members(child2) == []
        assert children(sup.s.home)["fake"]["state"] == "stopped"
    finally:
        sup.stop()


def _fake_child() -> None:
    """A supervised child with a grandchild in its process group, as vLLM's engine core is."""
    grandchild = subprocess.Popen(["sleep", "300"])
    pidfile = Path(os.environ["FAKE_CHILD_PIDFILE"])
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {grandchild.pid}")
    tmp.replace(pidfile)
    time.sleep(300)


if __name__ == "__main__":
    _fake_child()
