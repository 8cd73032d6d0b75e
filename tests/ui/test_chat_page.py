"""The chat page, flow by flow, in chromium against the running service (synthetic engine).

Messages starting with `!say ` make the synthetic engine answer exactly the rest, word
by word (workers/inference/synthetic.py), so each test knows what the model says.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import Account, AccountsStack, auth, create_account, login
from tests.metrics import metric_value
from tests.ui.conftest import ADMIN_RPM, MODEL, shoot

pytestmark = pytest.mark.timeout(300)

# Records the answer's text length at every frame, to count the paints of a stream.
PAINTS = """() => {
  window.__paints = [];
  const tick = () => {
    const answers = document.querySelectorAll('article[data-role="assistant"]');
    const last = answers[answers.length - 1];
    window.__paints.push(last ? last.querySelector('.markdown')?.textContent.length ?? 0 : 0);
    window.__paintLoop = requestAnimationFrame(tick);
  };
  tick();
}"""


def open_page(browser: Any, stack: AccountsStack, account: Account, **context: Any) -> Any:
    page = browser.new_context(**context).new_page()
    page.goto(stack.url + "/")
    page.get_by_label("Username").fill(account.username)
    page.get_by_label("Password").fill(account.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).wait_for()
    return page


@pytest.fixture
def page(browser: Any, stack: AccountsStack, alice: Account) -> Iterator[Any]:
    page = open_page(browser, stack, alice)
    yield page
    page.context.close()


def send(page: Any, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def last_answer(page: Any) -> Any:
    return page.locator('article[data-role="assistant"]').last


def wait_answer_done(page: Any, timeout: float = 30_000) -> None:
    last_answer(page).locator('[data-testid="stats"]').wait_for(timeout=timeout)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_login_page_then_the_chat(browser: Any, stack: AccountsStack, alice: Account) -> None:
    page = browser.new_context().new_page()
    page.goto(stack.url + "/")
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_label("Username").fill(alice.username)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("alert").wait_for()
    assert "password" in page.get_by_role("alert").inner_text().lower()
    page.get_by_label("Password").fill(alice.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).wait_for()
    assert page.get_by_text(alice.username).is_visible()
    # The token lives in this tab only.
    assert page.evaluate("() => localStorage.length") == 0
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("Username").wait_for()
    page.context.close()


def test_the_page_runs_under_its_security_headers(browser: Any, stack: AccountsStack, alice: Account) -> None:
    """A CSP that forbids inline script, no framing, nosniff: the page still logs in and
    chats, and a script injected into it does not run."""
    page = browser.new_context().new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    response = page.goto(stack.url + "/")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"].split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    page.get_by_label("Username").fill(alice.username)
    page.get_by_label("Password").fill(alice.password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Message", exact=True).fill("!say under the policy")
    page.keyboard.press("Enter")
    last_answer(page).get_by_text("under the policy").wait_for()
    # The page itself breaks none of its rules while it loads, logs in and chats.
    assert problems == [], problems
    # An inline script, as an injected one would be, is refused.
    inject = (
        "s => { const e = document.createElement('script'); e.textContent = s; document.body.append(e); }"
    )
    page.evaluate(inject, "window.injected = 1")
    assert page.evaluate("() => window.injected") is None
    assert len(problems) == 1 and "inline script" in problems[0], problems
    page.context.close()


def test_a_message_streams_token_by_token_with_markdown(page: Any) -> None:
    page.evaluate(PAINTS)
    table = "| city | country |\n|---|---|\n| Paris | France |"
    send(page, f"!say # Capitals\n\n- one\n- two\n\n{table}\n\n```python\nprint('hi')\n```\n\n{words(30)}")
    wait_answer_done(page)
    paints = page.evaluate("() => { cancelAnimationFrame(window.__paintLoop); return window.__paints; }")
    final = max(paints)
    partial = {n for n in paints if 0 < n < final}
    assert len(partial) >= 2, f"the answer appeared in one piece: {sorted(set(paints))}"
    answer = last_answer(page)
    assert answer.locator("h1").inner_text() == "Capitals"
    assert answer.locator("li").count() == 2
    assert answer.locator("table td").first.inner_text() == "Paris"
    assert "print" in answer.locator("pre code").inner_text()
    assert answer.locator("pre code .hljs-built_in, pre code .hljs-string").count() >= 1  # highlighted
    assert answer.get_by_role("button", name="Copy code").is_visible()
    stats = answer.locator('[data-testid="stats"]').inner_text()
    assert re.search(r"\d+ tokens · first token [\d.]+ s · [\d.]+ tokens/s", stats), stats
    # Shift+Enter is a new line, not a send.
    box = page.get_by_label("Message", exact=True)
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert page.locator('article[data-role="user"]').count() == 1
    shoot(page, "chat-light")


def test_stop_cancels_the_answer_and_the_worker_aborts_it(page: Any, stack: AccountsStack) -> None:
    worker = next(p for p in stack.procs if p.name == "worker")
    metrics_url = f"http://127.0.0.1:{worker.env['WORKER_METRICS_PORT']}/metrics"

    def aborts() -> float:
        try:
            return metric_value(
                httpx.get(metrics_url, timeout=5).text, "chatq_engine_aborts_total", model=MODEL
            )
        except KeyError:
            return 0.0

    before = aborts()
    send(page, "!say " + words(400))
    answer = last_answer(page)
    page.wait_for_function(
        "() => (document.querySelector('article[data-role=assistant]')?.textContent ?? '').includes('w5')"
    )
    page.get_by_role("button", name="Stop").click()
    answer.get_by_text("Stopped").wait_for()
    shown = answer.locator(".markdown").inner_text()
    assert "w399" not in shown
    deadline = time.monotonic() + 15
    while aborts() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborts() > before, "the worker did not abort the stopped answer"
    time.sleep(0.5)
    assert answer.locator(".markdown").inner_text() == shown  # nothing more arrived
    # Enter works again, and regenerate is offered for the stopped answer.
    assert page.get_by_role("button", name="Regenerate").is_visible()


def test_regenerate_replaces_the_last_answer_on_the_page_and_in_the_conversation(
    page: Any, stack: AccountsStack, alice: Account
) -> None:
    send(page, "!say the first answer")
    wait_answer_done(page)
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    conversation_id = page.url.rsplit("/", 1)[1]
    headers = login(stack.url, alice.username, alice.password)

    def stored(unless_answered_by: str | None = None) -> list[dict[str, Any]]:
        """The stored messages, once there is a turn whose answer is not `unless_answered_by`'s."""
        deadline = time.monotonic() + 15
        while True:
            got = httpx.get(f"{stack.url}/api/conversations/{conversation_id}", headers=headers, timeout=10)
            messages: list[dict[str, Any]] = got.json()["messages"]
            answered_by = messages[-1]["request_id"] if len(messages) >= 2 else None
            if (answered_by is not None and answered_by != unless_answered_by) or time.monotonic() > deadline:
                return messages
            time.sleep(0.2)

    first = stored()
    assert len(first) == 2
    page.get_by_role("button", name="Regenerate").first.click()
    wait_answer_done(page)
    assert page.locator('article[data-role="user"]').count() == 1
    assert page.locator('article[data-role="assistant"]').count() == 1
    # The new turn is stored a moment after it ends: wait for the new answer's request.
    messages = stored(unless_answered_by=first[-1]["request_id"])
    assert messages[-1]["request_id"] != first[-1]["request_id"], messages
    assert [m["role"] for m in messages] == ["user", "assistant"], messages
    assert messages[0]["content"] == "!say the first answer"


def test_reload_and_continue_an_old_conversation(page: Any, stack: AccountsStack, alice: Account) -> None:
    send(page, "!say the first answer")
    wait_answer_done(page)
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    conversation_id = page.url.rsplit("/", 1)[1]
    headers = login(stack.url, alice.username, alice.password)
    deadline = time.monotonic() + 15  # the persistence worker stores the turn just after it ends
    while time.monotonic() < deadline:
        got = httpx.get(f"{stack.url}/api/conversations/{conversation_id}", headers=headers, timeout=10)
        if len(got.json()["messages"]) >= 2:
            break
        time.sleep(0.2)
    page.reload()
    page.locator('article[data-role="assistant"]').first.wait_for()
    assert "the first answer" in page.locator('article[data-role="assistant"]').first.inner_text()
    send(page, "!say the second answer")
    wait_answer_done(page)
    assert page.locator('article[data-role="assistant"]').count() == 2
    deadline = time.monotonic() + 15  # stored a moment after the answer ends
    while True:
        got = httpx.get(f"{stack.url}/api/conversations/{conversation_id}", headers=headers, timeout=10)
        contents = [m["content"] for m in got.json()["messages"]]
        if len(contents) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert contents[:2] == ["!say the first answer", "the first answer"]
    assert "the second answer" in contents
    # Opening it from the sidebar after starting a new chat shows it again.
    page.get_by_role("button", name="New chat").click()
    assert page.locator("article").count() == 0
    page.get_by_test_id("conversations").locator("button.open").first.click()
    page.wait_for_url(re.compile(conversation_id))
    page.get_by_text("the second answer").last.wait_for()


def test_the_title_appears_in_the_sidebar(page: Any) -> None:
    send(page, "!say Paris is the capital of France.")
    wait_answer_done(page)
    active = page.locator(".conversations li.active button.open")
    active.wait_for()
    page.wait_for_function(
        "() => { const b = document.querySelector('.conversations li.active button.open');"
        " return b && !b.querySelector('em') && b.textContent.trim().length > 0; }",
        timeout=40_000,
    )
    title = active.inner_text()
    assert title and title != "New conversation"
    # Rename and search by title.
    page.locator(".conversations li.active").get_by_role("button", name=re.compile("^Rename")).click()
    page.get_by_label("New title").fill("Capitals quiz")
    page.get_by_label("New title").press("Enter")
    page.get_by_role("button", name="Capitals quiz", exact=True).wait_for()
    page.get_by_label("Search conversations by title").fill("quiz")
    page.wait_for_function("() => document.querySelectorAll('.conversations button.open').length === 1")
    assert page.locator(".conversations button.open").inner_text() == "Capitals quiz"


def test_html_and_script_in_model_output_are_shown_as_text(page: Any) -> None:
    evil = (
        '<script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2"> '
        "and [click me](javascript:window.__pwned=3)"
    )
    send(page, "!say " + evil)
    wait_answer_done(page)
    answer = last_answer(page)
    text = answer.locator(".markdown").inner_text()
    assert "<script>window.__pwned = 1</script>" in text
    assert "<img" in text
    assert answer.locator(".markdown script, .markdown img").count() == 0
    link = answer.get_by_text("click me")
    if link.count():
        href = link.first.get_attribute("href") or ""
        assert not href.lower().startswith("javascript:"), href
        link.first.click()
    time.sleep(0.3)
    assert page.evaluate("() => window.__pwned") is None
    shoot(page, "chat-html-as-text")


def test_queue_place_is_shown_while_waiting(page: Any, stack: AccountsStack) -> None:
    # Two long answers fill the worker's two slots; the page's turn waits in the queue.
    # Sent only once both are streaming (an earlier test's title job may still hold a slot).
    stop = threading.Event()
    streaming = threading.Semaphore(0)

    def hold() -> None:
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": 2000,
            "messages": [{"role": "user", "content": "x"}],
        }
        with httpx.stream(
            "POST", stack.url + "/v1/chat/completions", json=body, headers=auth(), timeout=60
        ) as r:
            assert r.status_code == 200, r.read()
            started = False
            for chunk in r.iter_bytes():
                if not started and b'"content"' in chunk:
                    started = True
                    streaming.release()
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in holders:
        t.start()
    try:
        for _ in holders:
            assert streaming.acquire(timeout=60), "the two long answers did not start"
        send(page, "!say out of the queue at last")
        waiting = page.get_by_test_id("waiting")
        waiting.filter(has_text="Waiting in the queue").wait_for(timeout=20_000)
        assert re.search(r"place 1 of \d+", waiting.inner_text()), waiting.inner_text()
        shoot(page, "chat-queued")
    finally:
        stop.set()
        for t in holders:
            t.join(10)
    wait_answer_done(page)
    assert "out of the queue at last" in last_answer(page).inner_text()


def test_a_429_shows_its_countdown(browser: Any, stack: AccountsStack, root: Account) -> None:
    page = open_page(browser, stack, root)
    try:
        for i in range(ADMIN_RPM):
            send(page, f"!say answer {i}")
            wait_answer_done(page)
        send(page, "!say one too many")
        banner = page.get_by_test_id("error")
        banner.wait_for()
        assert "Rate limited" in banner.inner_text() and "requests per minute" in banner.inner_text()
        first = int(re.search(r"Try again in (\d+) s", banner.inner_text()).group(1))  # type: ignore[union-attr]
        assert first > 0
        page.wait_for_function(
            f"() => /Try again in (\\d+) s/.exec(document.querySelector('[data-testid=countdown]')"
            f"?.textContent ?? '')?.[1] < {first}"
        )
        assert page.get_by_label("Retry when it ends").is_checked()
        shoot(page, "chat-rate-limited")
    finally:
        page.context.close()


def test_operator_page_is_for_admins_only(
    browser: Any, stack: AccountsStack, alice: Account, root: Account
) -> None:
    page = open_page(browser, stack, alice)
    assert page.get_by_role("link", name="Operator").count() == 0
    page.goto(stack.url + "/admin")
    page.get_by_test_id("operator-page").wait_for()
    assert "not one" in page.get_by_role("alert").inner_text()
    page.context.close()
    page = open_page(browser, stack, root)
    page.get_by_role("link", name="Operator").click()
    page.get_by_test_id("operator-page").wait_for()
    assert page.get_by_role("alert").count() == 0
    page.context.close()


def test_an_expired_session_goes_back_to_login_and_keeps_the_draft(page: Any, alice: Account) -> None:
    # The server's answer once the token has expired (tokens live JWT_EXPIRE_MINUTES).
    expired = {"error": {"type": "authentication_error", "code": "token_expired", "message": "expired"}}
    page.route("**/api/chat", lambda route: route.fulfill(status=401, json=expired))
    page.get_by_label("Message", exact=True).fill("my unsent question")
    page.get_by_role("button", name="Send").click()
    page.get_by_label("Username").wait_for()
    assert page.get_by_role("status").is_visible()  # says why
    page.get_by_label("Username").fill(alice.username)
    page.get_by_label("Password").fill(alice.password)
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_label("Message", exact=True).input_value() == "my unsent question"


def test_dark_theme_and_a_narrow_screen(browser: Any, stack: AccountsStack, alice: Account) -> None:
    page = open_page(browser, stack, alice, color_scheme="dark")
    send(page, "!say Dark **theme** with `code`:\n\n```js\nconst x = 1;\n```")
    wait_answer_done(page)
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background != "rgb(255, 255, 255)"
    shoot(page, "chat-dark")
    page.context.close()
    page = open_page(browser, stack, alice, viewport={"width": 375, "height": 740})
    send(page, "!say " + "a long line of words that has to wrap on a phone screen " * 3)
    wait_answer_done(page)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    assert page.get_by_label("Message", exact=True).is_visible()
    page.get_by_role("button", name="Conversations").click()
    page.get_by_role("button", name="New chat").wait_for(state="visible")
    # The drawer's slide-in: its CSS transition has ended.
    page.wait_for_function("() => document.getAnimations().every((a) => a.playState !== 'running')")
    shoot(page, "chat-narrow")
    page.context.close()


def test_keyboard_alone(page: Any) -> None:
    page.get_by_label("Message", exact=True).focus()
    page.keyboard.type("!say typed and sent by keyboard")
    page.keyboard.press("Enter")
    wait_answer_done(page)
    # Tab reaches the answer's tools and Enter on Copy works.
    for _ in range(40):
        page.keyboard.press("Shift+Tab")
        if page.evaluate("() => document.activeElement?.getAttribute('aria-label')") == "Copy answer":
            break
    else:
        pytest.fail("the Copy button of the answer is not reachable with the keyboard")
    page.keyboard.press("Enter")
    last_answer(page).get_by_text("Copied").wait_for()


def test_time_to_first_token_on_the_page(browser: Any, stack: AccountsStack) -> None:
    """The closing figure: Enter to the first token painted, p50 over 20 tries (printed)."""
    account = create_account(stack.url, "ttft")
    page = open_page(browser, stack, account)
    times = []
    for i in range(20):
        page.get_by_role("button", name="New chat").click()
        box = page.get_by_label("Message", exact=True)
        box.fill(f"!say try {i} done")
        took = page.evaluate(
            """() => new Promise((resolve) => {
              const box = document.getElementById('composer');
              const start = performance.now();
              const check = () => {
                const a = document.querySelector('article[data-role="assistant"] .markdown');
                if (a && a.textContent.length > 0) resolve(performance.now() - start);
                else requestAnimationFrame(check);
              };
              box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));
              requestAnimationFrame(check);
            })"""
        )
        times.append(float(took))
        wait_answer_done(page)
    p50 = statistics.median(times)
    print(
        f"\nUI time to first token (synthetic engine, TTFT 50 ms): p50 {p50:.0f} ms, max {max(times):.0f} ms"
    )
    assert p50 > 0
    page.context.close()
