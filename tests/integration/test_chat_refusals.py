"""What a user sees when a request is refused or trimmed, through the HTTP API of the whole
service (NATS, PostgreSQL, Redis, synthetic worker): a body one NATS message cannot carry is
a 413 naming the limit and costs no tokens per minute, a refused turn leaves no empty
conversation behind, and a history is trimmed to the served model's own context."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import AccountsStack, accounts_stack, logged_in, sse_events

MODEL = "short-context"
CONTEXT = 256  # the profile's max_model_len; VLLM_MAX_MODEL_LEN stays at its 4096
TPM = 2000
# nats-server's default max_payload (1 MB) less what chatq keeps for the job's headers.
JOB_LIMIT = (1 << 20) - 1024
PROFILES = f"""
[[profile]]
id = "{MODEL}"
name = "A model with a short context"
cpu = true
engine = {{ max_model_len = {CONTEXT} }}
memory = {{ params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountsStack]:
    root = tmp_path_factory.mktemp("refusals")
    profiles = root / "profiles.toml"
    profiles.write_text(PROFILES)
    with accounts_stack(
        root,
        MODEL,
        PROFILES_FILE=str(profiles),
        MODEL_PROFILE=MODEL,
        SYNTH_TOKENS_PER_S="1000",
        SYNTH_TTFT_MS="5",
        RATE_LIMIT_USER_RPM="0",
        RATE_LIMIT_USER_TPM=str(TPM),
        RATE_LIMIT_USER_CONCURRENCY="0",
    ) as s:
        yield s


def user(stack: AccountsStack, name: str) -> dict[str, str]:
    return logged_in(stack.url, name)


def ask(stack: AccountsStack, headers: dict[str, str], messages: list[dict[str, str]]) -> httpx.Response:
    return httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 2},
        headers=headers,
        timeout=60,
    )


def turn(
    stack: AccountsStack, headers: dict[str, str], message: str, **extra: Any
) -> tuple[str, dict[str, Any]]:
    """One /api/chat turn: its conversation id and usage."""
    body = {"message": message, "max_tokens": 4, **extra}
    with httpx.stream("POST", stack.url + "/api/chat", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read().decode()
        events = list(sse_events(r.iter_lines()))
    assert events[0].event == "conversation", events[0]
    usage: dict[str, Any] = {}
    for event in events[1:]:
        assert event.event != "error", event.data
        if event.data != "[DONE]":
            usage = event.json().get("usage") or usage
    return events[0].json()["conversation_id"], usage


def conversations_of(stack: AccountsStack, username: str) -> int:
    with psycopg.connect(stack.dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM conversations c JOIN users u ON u.id = c.user_id WHERE u.username = %s",
            (username,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large", error
    assert str(JOB_LIMIT) in error["message"] and "max_payload" in error["message"], error


def test_a_prompt_one_nats_message_cannot_carry_is_a_413_and_costs_no_tokens(stack: AccountsStack) -> None:
    headers = user(stack, "big-prompt")
    # Under the 1 MiB HTTP limit, but the job carries the body and the messages read from it.
    assert_too_large(ask(stack, headers, [{"role": "user", "content": "x" * 600_000}]))
    # The refusal took nothing from the user's tokens per minute: a tiny request still runs.
    r = ask(stack, headers, [{"role": "user", "content": "hi"}])
    assert r.status_code == 200, r.text


def test_twenty_thousand_short_messages_are_a_413_too(stack: AccountsStack) -> None:
    headers = user(stack, "many-messages")
    assert_too_large(ask(stack, headers, [{"role": "user", "content": "hi"}] * 20_000))
    assert ask(stack, headers, [{"role": "user", "content": "hi"}]).status_code == 200


def test_a_turn_too_large_to_queue_leaves_no_conversation(stack: AccountsStack) -> None:
    headers = user(stack, "big-turn")
    r = httpx.post(stack.url + "/api/chat", json={"message": "x" * 600_000}, headers=headers, timeout=60)
    assert_too_large(r)
    assert conversations_of(stack, "big-turn") == 0


def test_a_failing_claim_leaves_no_empty_conversation(stack: AccountsStack) -> None:
    headers = user(stack, "claim-fails")
    # PostgreSQL refuses the claim (the UPDATE naming the turn) of this user's conversations.
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.system_prompt = 'claim fails' AND NEW.last_request_id IS NOT NULL THEN "
            "RAISE EXCEPTION 'claim refused'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_claim BEFORE UPDATE ON conversations "
            "FOR EACH ROW EXECUTE FUNCTION refuse_claim()"
        )
    try:
        r = httpx.post(
            stack.url + "/api/chat",
            json={"message": "hello", "system_prompt": "claim fails"},
            headers=headers,
            timeout=60,
        )
        assert r.status_code >= 500, r.text
        assert conversations_of(stack, "claim-fails") == 0
        listed = httpx.get(stack.url + "/api/conversations", headers=headers, timeout=30)
        assert "claim fails" not in listed.text
    finally:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER refuse_claim ON conversations")
            conn.execute("DROP FUNCTION refuse_claim()")


def test_a_history_is_trimmed_to_the_served_profiles_context(stack: AccountsStack) -> None:
    headers = user(stack, "long-history")
    long_question = "alpha " * 150  # ~300 tokens by chatq's estimate: more than the context holds
    conversation, first = turn(stack, headers, long_question)
    assert first["prompt_tokens"] == 150
    _, second = turn(stack, headers, "hi", conversation_id=conversation)
    # The profile's 256-token context cannot hold the first question: only the new turn is sent.
    assert second["prompt_tokens"] == 1, second
