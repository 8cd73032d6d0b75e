"""One accounts stack for the package: real NATS, PostgreSQL, Redis, two API processes,
persistence and a synthetic worker; alice and bob."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.accounts import CACHE_S, MODEL, User, make_user
from tests.helpers import AccountsStack, accounts_stack, no_rate_limits


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    with accounts_stack(
        tmp_path_factory.mktemp("accounts"),
        MODEL,
        apis=2,
        API_KEY_CACHE_S=str(CACHE_S),
        SYNTH_TOKENS_PER_S="400",
        SYNTH_TTFT_MS="5",
        **no_rate_limits("user"),
    ) as s:
        yield s


@pytest.fixture(scope="package")
def alice(stack: AccountsStack) -> User:
    return make_user(stack, "alice")


@pytest.fixture(scope="package")
def bob(stack: AccountsStack) -> User:
    return make_user(stack, "bob")
