"""The operator page (/admin) in chromium against the whole service.

The module's own stack: the synthetic worker starts on the bundled CPU profile
(SmolLM2-135M-Instruct, catalog/profiles.toml) so an admin can switch it to another CPU
profile (Qwen2.5-0.5B-Instruct; the synthetic engine loads nothing, in SYNTH_START_S),
and a telemetry worker writes the queues snapshot every 0.5 s.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stack.servers import free_port, wait_for_port
from tests.helpers import Account, AccountsStack, accounts_stack, login, no_rate_limits, spawn, wait_until
from tests.ui.conftest import off_the_browser_loop, shoot

pytestmark = pytest.mark.timeout(300)

FIRST = "SmolLM2-135M-Instruct"
SECOND = "Qwen2.5-0.5B-Instruct"
WORKER = "worker"  # tests/helpers.start_worker's WORKER_ID
# What the focused control is called: its aria-label, else its text.
FOCUSED = """() => {
  const e = document.activeElement;
  return (e?.getAttribute('aria-label') || e?.textContent) ?? '';
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, built_web: Path, browser: Any) -> Iterator[AccountsStack]:
    telemetry_port = free_port()
    with off_the_browser_loop(
        accounts_stack(
            tmp_path_factory.mktemp("ui-operator"),
            FIRST,
            CHATQ_WEB_DIST=str(built_web),
            MODEL_PROFILE=FIRST,
            SYNTH_TOKENS_PER_S="50",
            SYNTH_TTFT_MS="20",
            SYNTH_START_S="3",
            SWITCH_GRACE_S="2",
            WORKER_SLOTS="2",
            TELEMETRY_INTERVAL_S="0.5",
            **no_rate_limits("user", "admin"),
        )
    ) as s:
        env = {**s.env, "TELEMETRY_PORT": str(telemetry_port)}
        telemetry = spawn("telemetry", "workers.telemetry", env, s.logdir)
        s.procs.append(telemetry)
        wait_for_port("127.0.0.1", telemetry_port, 30, telemetry.proc)
        yield s


def open_operator(browser: Any, stack: AccountsStack, account: Account, **context: Any) -> Any:
    page = browser.new_context(accept_downloads=True, **context).new_page()
    page.goto(stack.url + "/login")
    page.get_by_label("Username").fill(account.username)
    page.get_by_label("Password").fill(account.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).wait_for()
    page.goto(stack.url + "/admin")
    page.get_by_test_id("operator-page").wait_for()
    return page


@pytest.fixture
def admin_page(browser: Any, stack: AccountsStack, root: Account) -> Iterator[Any]:
    page = open_operator(browser, stack, root)
    yield page
    page.context.close()


def worker_row(page: Any) -> Any:
    return page.get_by_test_id(f"worker-{WORKER}")


def chat(stack: AccountsStack, account: Account, text: str) -> None:
    headers = login(stack.url, account.username, account.password)
    answer = httpx.post(
        stack.url + "/v1/chat/completions",
        headers=headers,
        json={"model": "smollm2", "messages": [{"role": "user", "content": "!say " + text}]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


def test_a_non_admin_gets_the_refusal_and_no_data(browser: Any, stack: AccountsStack, alice: Account) -> None:
    page = browser.new_context().new_page()
    page.clock.install()  # to run the page's timers ahead instead of waiting for them
    calls: list[str] = []
    page.on(
        "request",
        lambda r: (
            calls.append(r.url)
            if any(p in r.url for p in ("/api/admin", "/api/users", "/api/usage", "/api/models"))
            else None
        ),
    )
    page.goto(stack.url + "/login")
    page.get_by_label("Username").fill(alice.username)
    page.get_by_label("Password").fill(alice.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).wait_for()
    assert page.get_by_role("link", name="Operator").count() == 0
    page.goto(stack.url + "/admin")
    refusal = page.get_by_test_id("operator-refusal")
    refusal.wait_for()
    assert "for administrators" in refusal.inner_text()
    page.clock.run_for(5000)  # the timers of two poll periods (2 s) fire: still no call
    assert page.locator("table").count() == 0
    assert calls == []
    # The API says the same to her token.
    headers = login(stack.url, alice.username, alice.password)
    for path in ("/api/admin/status", "/api/users", "/api/admin/workers"):
        assert httpx.get(stack.url + path, headers=headers, timeout=10).status_code == 403
    page.context.close()


def test_the_page_refuses_when_the_api_does(browser: Any, stack: AccountsStack, root: Account) -> None:
    """An admin token the API no longer honours as one (the role changed): refusal, not a broken table."""
    page = browser.new_context().new_page()
    forbidden = {"error": {"type": "permission_error", "code": "forbidden", "message": "admins only"}}
    page.route("**/api/admin/**", lambda route: route.fulfill(status=403, json=forbidden))
    page.goto(stack.url + "/login")
    page.get_by_label("Username").fill(root.username)
    page.get_by_label("Password").fill(root.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).wait_for()
    page.goto(stack.url + "/admin")
    page.get_by_test_id("operator-refusal").wait_for()
    assert page.get_by_test_id("workers").count() == 0
    page.context.close()


def test_an_admin_sees_workers_queues_and_gpus_refreshing(admin_page: Any) -> None:
    page = admin_page
    row = worker_row(page)
    row.wait_for()
    assert row.get_by_test_id("worker-model").inner_text() == FIRST
    assert row.get_by_test_id("worker-state").inner_text() == "ready"
    assert "2 / 2" in row.inner_text()  # free slots of slots
    assert "healthy" in page.get_by_test_id("health").inner_text()
    # The telemetry snapshot's queues: the served model, each priority.
    queues = page.get_by_test_id("queues")
    queues.get_by_role("rowheader", name=FIRST).first.wait_for()
    text = queues.inner_text()
    assert "interactive" in text or "background" in text
    assert "No GPU reported." in page.get_by_test_id("gpus").inner_text()  # no NVIDIA driver here
    # It refreshes on its own every 2 s while the tab shows, and not while it is hidden.

    def set_visibility(state: str) -> None:
        page.evaluate(
            """(state) => {
            Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));
        }""",
            state,
        )

    polls: list[float] = []
    page.on("request", lambda r: polls.append(time.monotonic()) if "/api/admin/status" in r.url else None)
    for _ in range(2):  # two polls on their own, however long the first took
        with page.expect_request(lambda r: "/api/admin/status" in r.url, timeout=10_000):
            pass

    def a_poll() -> Any:
        return page.expect_request(lambda r: "/api/admin/status" in r.url, timeout=5000)

    set_visibility("hidden")
    page.clock.install()  # the poll's interval, set again once the tab shows, runs on this clock
    with a_poll():  # a poll as soon as it shows again
        set_visibility("visible")
    with a_poll():  # and one a period later
        page.clock.run_for(2100)
    set_visibility("hidden")
    hidden_from = len(polls)
    page.clock.run_for(10_000)  # five periods while hidden: no poll
    assert len(polls) == hidden_from
    with a_poll():
        set_visibility("visible")


def test_usage_rows_after_a_chat_and_the_csv(admin_page: Any, stack: AccountsStack, alice: Account) -> None:
    page = admin_page
    chat(stack, alice, "counted in the usage table")
    filters = page.get_by_role("form", name="Usage filters")
    filters.get_by_label("User", exact=True).fill(alice.username)
    usage = page.get_by_test_id("usage")

    def shown() -> bool:
        with page.expect_response(lambda r: "/api/usage?" in r.url):
            filters.get_by_role("button", name="Show").click()
        return "completed" in usage.inner_text()

    wait_until("alice's request in the usage table", shown, 30)  # once persistence stored its end
    body = usage.locator("tbody tr").first.inner_text()
    assert FIRST in body and "completed" in body
    assert "1 requests" in page.get_by_test_id("usage-totals").inner_text()
    filters.get_by_label("Group by").select_option("model")
    filters.get_by_role("button", name="Show").click()
    usage.get_by_role("columnheader", name="Requests").wait_for()
    assert FIRST in usage.inner_text()
    filters.get_by_label("Group by").select_option("")
    with page.expect_download() as info:
        filters.get_by_role("button", name="Download CSV").click()
    download = info.value
    assert download.suggested_filename.startswith("chatq-usage-")
    assert download.suggested_filename.endswith(".csv")
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert rows[0][:5] == ["request_id", "created_at", "finished_at", "user", "model"]
    assert len(rows) == 2  # the filter went with it: alice's one request
    assert rows[1][3] == "alice" and rows[1][4] == FIRST


def create_user_on_page(page: Any, name: str) -> Any:
    """Create user `name` (password pw-NAME-12345) with the page's form; their table row."""
    form = page.get_by_role("form", name="New user")
    form.get_by_label("Username").fill(name)
    form.get_by_label("Password").fill(f"pw-{name}-12345")
    form.get_by_role("button", name="Create user").click()
    row = page.get_by_test_id(f"user-{name}")
    row.wait_for()
    return row


def test_create_a_user_see_their_keys_and_disable_them(admin_page: Any, stack: AccountsStack) -> None:
    page = admin_page
    row = create_user_on_page(page, "carol")
    assert row.get_by_test_id("user-state").inner_text() == "active"
    headers = login(stack.url, "carol", "pw-carol-12345")
    key = httpx.post(stack.url + "/api/keys", headers=headers, json={"name": "laptop"}, timeout=10)
    assert key.status_code == 201, key.text
    row.get_by_role("button", name="Keys of carol").click()
    keys = page.get_by_test_id("keys")
    keys.wait_for()
    assert "laptop" in keys.inner_text()
    assert key.json()["prefix"] in keys.inner_text()
    row.get_by_role("button", name="Disable carol").click()
    wait_until("carol disabled", lambda: row.get_by_test_id("user-state").inner_text() == "disabled", 10)
    refused = httpx.post(
        stack.url + "/api/auth/login", json={"username": "carol", "password": "pw-carol-12345"}, timeout=10
    )
    assert refused.status_code in (401, 403), refused.text
    # Reloaded from the server, she is still disabled.
    page.reload()
    page.get_by_test_id("user-carol").wait_for()
    assert page.get_by_test_id("user-carol").get_by_test_id("user-state").inner_text() == "disabled"


def test_make_a_user_admin_set_their_password_and_revoke_their_key(
    admin_page: Any, stack: AccountsStack
) -> None:
    page = admin_page
    row = create_user_on_page(page, "dave")
    headers = login(stack.url, "dave", "pw-dave-12345")
    made = httpx.post(stack.url + "/api/keys", headers=headers, json={"name": "ci"}, timeout=10)
    assert made.status_code == 201, made.text
    dave_key = {"Authorization": f"Bearer {made.json()['key']}"}
    assert httpx.get(stack.url + "/api/users", headers=dave_key, timeout=10).status_code == 403

    row.get_by_label("Role of dave").select_option("admin")
    page.get_by_role("status").filter(has_text="dave is now an admin").wait_for()
    # His key acts as an admin within the key cache's time.
    wait_until(
        "dave's key lists users",
        lambda: httpx.get(stack.url + "/api/users", headers=dave_key, timeout=10).status_code == 200,
        15,
    )

    row.get_by_role("button", name="Password of dave").click()
    reset = page.get_by_role("form", name="New password for dave")
    reset.get_by_label("New password").fill("pw-dave-new-67890")
    reset.get_by_role("button", name="Set password").click()
    page.get_by_role("status").filter(has_text="dave has a new password").wait_for()
    old = httpx.post(
        stack.url + "/api/auth/login", json={"username": "dave", "password": "pw-dave-12345"}, timeout=10
    )
    assert old.status_code == 401, old.text
    login(stack.url, "dave", "pw-dave-new-67890")

    row.get_by_role("button", name="Keys of dave").click()
    keys = page.get_by_test_id("keys")
    keys.get_by_role("button", name="Revoke key ci").click()
    page.get_by_role("status").filter(has_text="Revoked dave's key ci").wait_for()
    assert keys.get_by_test_id("key-revoked").inner_text() != "no"
    assert keys.get_by_role("button", name="Revoke key ci").count() == 0
    row.scroll_into_view_if_needed()
    shoot(page, "operator-users")
    wait_until(
        "dave's key refused",
        lambda: httpx.get(stack.url + "/api/users", headers=dave_key, timeout=10).status_code == 401,
        15,
    )


def test_switch_a_worker_and_watch_it_come_back_on_the_new_model(admin_page: Any) -> None:
    page = admin_page
    row = worker_row(page)
    row.wait_for()
    row.get_by_label(f"New model for {WORKER}").select_option(SECOND)
    row.get_by_role("button", name="Switch").click()
    seen: set[str] = set()

    def back_on_second() -> bool:
        state: str = row.get_by_test_id("worker-state").inner_text()
        seen.add(state.split(" ")[0])
        model: str = row.get_by_test_id("worker-model").inner_text()
        return model == SECOND and state == "ready"

    wait_until("the worker ready on the new model", back_on_second, 60)
    assert "loading" in seen  # 3 s of loading, polled every 2 s
    assert f"Now serving {SECOND}." in row.get_by_test_id("switch-note").inner_text()
    # Now the old model is offered to switch back to, and the one it serves is not.
    options = row.get_by_label(f"New model for {WORKER}").locator("option").all_inner_texts()
    assert any(o.startswith(FIRST) for o in options)
    assert not any(o.startswith(SECOND) for o in options)


def test_screenshots_light_dark_and_narrow(browser: Any, stack: AccountsStack, root: Account) -> None:
    for name, context in (
        ("operator-light", {"color_scheme": "light", "viewport": {"width": 1280, "height": 900}}),
        ("operator-dark", {"color_scheme": "dark", "viewport": {"width": 1280, "height": 900}}),
        ("operator-narrow", {"color_scheme": "light", "viewport": {"width": 375, "height": 740}}),
    ):
        page = open_operator(browser, stack, root, **context)
        worker_row(page).wait_for()
        page.get_by_test_id("usage").wait_for()
        page.get_by_test_id("users").wait_for()
        if name == "operator-dark":
            background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
            assert background != "rgb(255, 255, 255)"
        if name == "operator-narrow":
            # The page never scrolls sideways; wide tables scroll inside their own box.
            assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
            scroller = page.locator(".table-scroll").first
            assert scroller.evaluate("e => e.scrollWidth > e.clientWidth")
        shoot(page, name)
        page.context.close()


def test_keyboard_alone_reaches_the_switch_and_the_csv(admin_page: Any) -> None:
    page = admin_page
    worker_row(page).wait_for()
    reached: set[str] = set()
    for _ in range(80):
        page.keyboard.press("Tab")
        label = page.evaluate(FOCUSED)
        reached.add(label.strip())
    assert f"New model for {WORKER}" in reached
    assert "Download CSV" in reached
    assert "Create user" in reached
