"""The web interface in a real browser: Playwright driving Debian's chromium, against the
whole service (API, NATS, PostgreSQL, Redis, persistence, a synthetic worker).

No browser is downloaded: the tests use the installed `chromium` (./test installs it
with apt-get when it runs as root). Without chromium, Playwright or a built interface
the tests are skipped with the reason, except under CI=true, where they must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import Account, AccountsStack, accounts_stack, create_account, no_rate_limits

MODEL = "ui-model"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
ADMIN_RPM = 3


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests must run under CI: {reason}")
    pytest.skip(reason)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Package scope: Playwright's sync API keeps its event loop running in this thread until it
# stops, which breaks the asyncio tests that run after tests/ui.
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        _unavailable("no chromium on this machine (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def built_web() -> Path:
    from stack.web import WebBuildError, build

    try:
        return build()
    except WebBuildError as exc:
        _unavailable(f"the web interface cannot be built: {exc}")
        raise


T = TypeVar("T")


@contextmanager
def off_the_browser_loop(manager: AbstractContextManager[T]) -> Iterator[T]:
    """Enter and leave `manager` in a thread of its own.

    Playwright's sync API keeps an asyncio loop running in the test thread, and the launcher
    calls asyncio.run() (it declares the JetStream streams), which refuses to run there.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="stack") as pool:
        value = pool.submit(manager.__enter__).result()
        try:
            yield value
        except BaseException as exc:
            if not pool.submit(manager.__exit__, type(exc), exc, exc.__traceback__).result():
                raise
        else:
            pool.submit(manager.__exit__, None, None, None).result()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, built_web: Path, browser: Any) -> Iterator[AccountsStack]:
    with off_the_browser_loop(
        accounts_stack(
            tmp_path_factory.mktemp("ui"),
            MODEL,
            CHATQ_WEB_DIST=str(built_web),
            SYNTH_TOKENS_PER_S="25",
            SYNTH_TTFT_MS="50",
            WORKER_SLOTS="2",
            **no_rate_limits("user"),
            RATE_LIMIT_ADMIN_RPM=str(ADMIN_RPM),
            RATE_LIMIT_ADMIN_TPM="0",
            RATE_LIMIT_ADMIN_CONCURRENCY="0",
        )
    ) as s:
        yield s


@pytest.fixture(scope="module")
def alice(stack: AccountsStack) -> Account:
    return create_account(stack.url, "alice")


@pytest.fixture(scope="module")
def root(stack: AccountsStack) -> Account:
    return create_account(stack.url, "root", role="admin")


def shoot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
