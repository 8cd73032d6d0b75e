"""The embedded NATS lets only chatq in, each service only where its work is (issue #14).

One stack from the launcher (real nats-server, PostgreSQL, Redis, API, synthetic worker,
persistence). A client without a login, or with a wrong password, is refused at connect;
each service's user is refused what broker/permissions.py does not give it, and what a
service needs still works (the stack's own requests complete, an integrator reads events).
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import nats
import nats.errors
import pytest

from broker import names, permissions
from broker.connect import NatsLogin, connect
from chatq.errors import ConfigError
from examples.tokens_per_user import Tally, read_events
from stack import nats_auth
from tests.helpers import AccountsStack, accounts_stack, logged_in, no_rate_limits, wait_until

MODEL = "nats-auth-model"
JOBS_CONSUMER = names.jobs_consumer(MODEL)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("natsauth"), MODEL, CHATQ_MODELS=MODEL, **no_rate_limits("user")
    ) as stack:
        yield stack


def home(stack: AccountsStack) -> Path:
    return stack.logdir.parent / "home"


def address(stack: AccountsStack) -> str:
    url = urlparse(stack.nats_url)
    return f"nats://{url.hostname}:{url.port}"


def login(stack: AccountsStack, service: str) -> NatsLogin:
    user = permissions.user_name(service)
    return NatsLogin(user, nats_auth.read_passwords(home(stack))[user])


def test_the_logins_are_made_once_and_only_their_owner_can_read_them(stack: AccountsStack) -> None:
    passwords = nats_auth.read_passwords(home(stack))
    assert set(passwords) == {permissions.user_name(s) for s in permissions.SERVICES}
    assert len(set(passwords.values())) == len(passwords)  # one password each
    for name in (nats_auth.USERS_FILE, nats_auth.CONFIG_FILE):
        assert stat.S_IMODE((home(stack) / name).stat().st_mode) == 0o600, name
    # Asked again (the next ./start), the same passwords.
    assert nats_auth.ensure_passwords(home(stack)) == passwords


def test_no_process_has_a_password_on_its_command_line(stack: AccountsStack) -> None:
    """ps shows every local user the command lines: the logins travel in the environment
    (readable by the owner only) and the server's config file."""
    passwords = set(nats_auth.read_passwords(home(stack)).values())
    for proc in stack.procs:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not [p for p in passwords if p in cmdline], proc.name


@pytest.mark.parametrize("user", [None, "chatq-api", "nobody"])
async def test_a_client_without_the_right_login_is_refused_at_connect(
    stack: AccountsStack, user: str | None
) -> None:
    options = {} if user is None else {"user": user, "password": "not-the-password"}
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await nats.connect(address(stack), allow_reconnect=False, connect_timeout=5, **options)


async def test_a_service_with_a_wrong_password_stops_with_the_reason(stack: AccountsStack) -> None:
    """chatq's own connect() does not wait forever on a login the server refuses."""
    with pytest.raises(ConfigError, match=r"refused the login \(chatq-api\): check NATS_USER"):
        await asyncio.wait_for(connect(address(stack), "test", NatsLogin("chatq-api", "wrong")), 10)


async def _refused(stack: AccountsStack, service: str, action: str, subject: str) -> bool:
    """Try `action` (sub, pub or request) on `subject` as `service`'s user: True when the
    server answers with a permissions violation naming the subject."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    url = address(stack)
    nc = await nats.connect(
        url, name=f"test-{service}", error_cb=on_error, **login(stack, service).client_options(url)
    )
    try:
        if action == "sub":
            await nc.subscribe(subject)
        elif action == "pub":
            await nc.publish(subject, b"{}")
        else:
            try:
                await nc.request(subject, b"{}", timeout=1)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                pass
        await nc.flush(timeout=5)
        try:
            await asyncio.wait_for(_until(lambda: errors), timeout=1)
        except TimeoutError:
            pass
        return any(
            "permissions violation" in str(e).lower() and subject.lower() in str(e).lower() for e in errors
        )
    finally:
        await nc.close()


async def _until(check: object) -> None:
    while not check():  # type: ignore[operator]
        await asyncio.sleep(0.02)


NEXT_JOB = f"$JS.API.CONSUMER.MSG.NEXT.{names.JOBS_STREAM}.{JOBS_CONSUMER}"
NEXT_EVENT = f"$JS.API.CONSUMER.MSG.NEXT.{names.EVENTS_STREAM}.{names.EVENTS_DURABLE}"
A_JOB = names.job_subject(MODEL)

# (service, action, subject, refused): what each service's user may and may not do.
TABLE = [
    # Nobody but a worker takes a job from a queue.
    ("api", "request", NEXT_JOB, True),
    ("persistence", "request", NEXT_JOB, True),
    ("telemetry", "request", NEXT_JOB, True),
    ("integration", "request", NEXT_JOB, True),
    # Nobody but the persistence worker takes from its consumer of the events.
    ("api", "request", NEXT_EVENT, True),
    ("inference", "request", NEXT_EVENT, True),
    ("integration", "request", NEXT_EVENT, True),
    ("integration", "pub", f"$JS.ACK.{names.EVENTS_STREAM}.{names.EVENTS_DURABLE}.1.1.1.1.0", True),
    ("integration", "request", f"$JS.API.CONSUMER.DELETE.{names.EVENTS_STREAM}.{names.EVENTS_DURABLE}", True),
    # Only the API reads the answers it relays.
    ("inference", "sub", names.STREAM_ALL, True),
    ("persistence", "sub", names.STREAM_ALL, True),
    ("telemetry", "sub", names.STREAM_ALL, True),
    ("integration", "sub", names.STREAM_ALL, True),
    ("api", "sub", names.STREAM_ALL, False),
    # A worker cannot read what users were answered, in the events either.
    ("inference", "sub", names.EVENTS_ALL, True),
    ("api", "sub", names.EVENTS_ALL, True),
    ("integration", "sub", names.EVENTS_ALL, False),
    # Nobody reads another's replies (a worker's pulled jobs arrive on its inbox).
    ("api", "sub", "_INBOX.>", True),
    ("integration", "sub", f"{permissions.inbox_prefix('chatq-inference')}.>", True),
    ("persistence", "sub", f"{permissions.inbox_prefix('chatq-api')}.>", True),
    # Only the API queues a user's job; persistence its title jobs (background) only.
    ("inference", "pub", A_JOB, True),
    ("telemetry", "pub", A_JOB, True),
    ("integration", "pub", A_JOB, True),
    ("persistence", "pub", A_JOB, True),
    # Only a worker writes a token stream; only the API or a worker an event.
    ("api", "pub", names.stream_subject("x"), True),
    ("persistence", "pub", names.stream_subject("x"), True),
    ("telemetry", "pub", names.event_subject("completed"), True),
    ("integration", "pub", names.event_subject("completed"), True),
    # Only the API cancels a request and switches a worker's model.
    ("inference", "pub", names.cancel_subject("x"), True),
    ("integration", "pub", names.cancel_subject("x"), True),
    ("persistence", "request", names.worker_control_subject("w"), True),
    # Nobody but the admin changes or deletes a stream.
    ("api", "request", f"$JS.API.STREAM.DELETE.{names.EVENTS_STREAM}", True),
    ("inference", "request", f"$JS.API.STREAM.UPDATE.{names.JOBS_STREAM}", True),
    ("persistence", "request", f"$JS.API.STREAM.PURGE.{names.EVENTS_STREAM}", True),
]


@pytest.mark.parametrize(
    ("service", "action", "subject", "refused"),
    TABLE,
    ids=[f"{s}-{a}-{subj}" for s, a, subj, _ in TABLE],
)
async def test_each_service_is_refused_what_is_not_its_work(
    stack: AccountsStack, service: str, action: str, subject: str, refused: bool
) -> None:
    assert await _refused(stack, service, action, subject) is refused


def test_a_chat_still_goes_through_every_service_and_is_stored(stack: AccountsStack) -> None:
    """The stack's own processes have just what they need: a chat streams, is stored, and
    no process logged a permissions violation (nats-server logs each one)."""
    headers = logged_in(stack.url, "natsauth-user")
    resp = httpx.post(
        stack.url + "/api/chat",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=headers,
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    (conversation,) = httpx.get(stack.url + "/api/conversations", headers=headers).json()["conversations"]

    def stored() -> list[str]:
        url = f"{stack.url}/api/conversations/{conversation['id']}"
        return [m["role"] for m in httpx.get(url, headers=headers).json()["messages"]]

    # The answer is written by the persistence worker, from the worker's events.
    assert wait_until("the answer stored", lambda: stored() == ["user", "assistant"], 20)
    # The line names the client (`python3:chatq-api`); this file's own are `python3:test-…`.
    nats_log = (stack.logdir / "nats.log").read_text(errors="replace").splitlines()
    ours = [line for line in nats_log if "Violation" in line and "python3:chatq-" in line]
    assert not ours, ours
    assert [line for line in nats_log if "Violation" in line and "python3:test-" in line]  # the table's


async def test_an_integrator_reads_the_events_as_the_integration_user(stack: AccountsStack) -> None:
    """docs/integrations.md's subscriber, logged in as `chatq-integration`, counts the
    tokens of a request made now."""
    async with httpx.AsyncClient() as client:
        resp = await client.post(
            stack.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3},
            headers={"Authorization": f"Bearer {stack.env['CHATQ_API_KEYS']}"},
            timeout=30,
        )
    assert resp.status_code == 200, resp.text
    nc = await connect(address(stack), "test-integrator", login(stack, "integration"))
    try:
        tally = Tally()
        await read_events(nc.jetstream(), tally, since="all", until_caught_up=True)
        assert sum(row.completion_tokens for row in tally.rows.values()) >= 3, tally.rows
    finally:
        await nc.close()


def test_the_server_config_names_every_service(stack: AccountsStack) -> None:
    text = (home(stack) / nats_auth.CONFIG_FILE).read_text()
    assert all(f'"{permissions.user_name(s)}"' in text for s in permissions.SERVICES)
