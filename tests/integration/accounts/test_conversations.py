"""Accounts end to end (one stack for the package, tests/integration/accounts/conftest.py):
conversations continued from the stored history, titles, other users' things (404), usage.
Runs after test_auth.py and before test_resilience.py (the files run in name order)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.accounts import User, chat, make_user, words
from tests.helpers import (
    AccountsStack,
    auth,
    find_event,
    sse_events,
)

# --- conversations ----------------------------------------------------------------------------


def test_back_to_back_turns_each_see_the_whole_history(stack: AccountsStack, alice: User) -> None:
    """Each turn is sent the moment the previous answer ended, alternating API processes;
    the engine's prompt token count (words, for the synthetic engine) shows exactly which
    history it was given."""
    questions = ["tell me about queues", "and brokers", "why streams", "what about workers", "thanks a lot"]
    seen: list[str] = []
    conversation_id = None
    for i, question in enumerate(questions):
        turn = chat(stack.urls[i % 2], alice.headers, question, conversation_id, max_tokens=6)
        conversation_id = conversation_id or turn.conversation_id
        assert turn.conversation_id == conversation_id
        assert turn.usage["prompt_tokens"] == words(*seen, question), (
            f"turn {i} was not given the whole history"
        )
        assert turn.usage["completion_tokens"] == 6
        seen += [question, turn.text]
    stored = httpx.get(f"{stack.url}/api/conversations/{conversation_id}", headers=alice.headers).json()
    assert [m["content"] for m in stored["messages"]] == seen
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * len(questions)
    answer = stored["messages"][1]
    assert answer["token_out"] == 6 and answer["token_in"] == words(questions[0])


def test_regenerate_and_edit_replace_the_last_turn(stack: AccountsStack, alice: User) -> None:
    first = chat(stack.url, alice.headers, "one question", max_tokens=4)
    cid = first.conversation_id
    second = chat(stack.url, alice.headers, "second question", cid, max_tokens=4)
    # Regenerate: the same question again, without the old answer in the prompt.
    again = chat(stack.url, alice.headers, "second question", cid, max_tokens=5, replace_last=True)
    assert again.usage["prompt_tokens"] == words("one question", first.text, "second question")
    # Edit and resend: another question in its place.
    edited = chat(stack.url, alice.headers, "an edited question", cid, max_tokens=4, replace_last=True)
    assert edited.usage["prompt_tokens"] == words("one question", first.text, "an edited question")
    stored = httpx.get(f"{stack.url}/api/conversations/{cid}", headers=alice.headers).json()["messages"]
    assert [m["content"] for m in stored] == ["one question", first.text, "an edited question", edited.text]
    assert [m["position"] for m in stored] == [0, 1, 2, 3]
    assert second.text not in [m["content"] for m in stored] or second.text == edited.text
    r = httpx.post(
        stack.url + "/api/chat", json={"message": "x", "replace_last": True}, headers=alice.headers
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "replace_last"


def test_the_system_prompt_from_settings_is_used_and_kept(stack: AccountsStack, bob: User) -> None:
    system = "you are a terse assistant"
    r = httpx.put(
        stack.url + "/api/me/settings",
        json={"system_prompt": system, "params": {"max_tokens": 4}},
        headers=bob.headers,
    )
    assert r.status_code == 200, r.text
    assert httpx.get(stack.url + "/api/me/settings", headers=bob.headers).json()["system_prompt"] == system
    first = chat(stack.url, bob.headers, "hello")
    assert first.usage == {**first.usage, "prompt_tokens": words(system, "hello"), "completion_tokens": 4}
    second = chat(stack.url, bob.headers, "again", first.conversation_id)
    assert second.usage["prompt_tokens"] == words(system, "hello", first.text, "again")
    httpx.put(stack.url + "/api/me/settings", json={}, headers=bob.headers)


def test_the_title_appears_after_the_first_answer(stack: AccountsStack, alice: User) -> None:
    turn = chat(stack.url, alice.headers, "how do message queues work", max_tokens=5)
    deadline = time.monotonic() + 20
    title = None
    while time.monotonic() < deadline and not title:
        title = httpx.get(
            f"{stack.url}/api/conversations/{turn.conversation_id}", headers=alice.headers
        ).json()["title"]
        time.sleep(0.2)
    assert title, "no title within 20 s"
    listed = httpx.get(stack.url + "/api/conversations", headers=alice.headers).json()["conversations"]
    assert any(c["id"] == turn.conversation_id and c["title"] == title for c in listed)


def test_conversation_crud_and_pages(stack: AccountsStack) -> None:
    dave = make_user(stack, "dave")
    ids = []
    for i in range(5):
        r = httpx.post(stack.url + "/api/conversations", json={"title": f"topic {i}"}, headers=dave.headers)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    page = httpx.get(stack.url + "/api/conversations?limit=2", headers=dave.headers).json()
    seen = [c["id"] for c in page["conversations"]]
    while page["next"]:
        page = httpx.get(
            stack.url + "/api/conversations",
            params={"limit": 2, "before": page["next"]},
            headers=dave.headers,
        ).json()
        seen += [c["id"] for c in page["conversations"]]
    assert seen == list(reversed(ids))  # newest first, each once
    r = httpx.patch(
        f"{stack.url}/api/conversations/{ids[0]}", json={"title": "renamed"}, headers=dave.headers
    )
    assert r.json()["title"] == "renamed"
    found = httpx.get(stack.url + "/api/conversations?q=renam", headers=dave.headers).json()["conversations"]
    assert [c["id"] for c in found] == [ids[0]]
    assert httpx.delete(f"{stack.url}/api/conversations/{ids[0]}", headers=dave.headers).status_code == 204
    assert httpx.get(f"{stack.url}/api/conversations/{ids[0]}", headers=dave.headers).status_code == 404


def test_another_users_things_answer_404(stack: AccountsStack, alice: User, bob: User) -> None:
    turn = chat(stack.url, alice.headers, "a private question", max_tokens=3)
    key = httpx.post(stack.url + "/api/keys", json={"name": "alice's"}, headers=alice.headers).json()
    cid = turn.conversation_id
    attempts = {
        "read conversation": ("GET", f"/api/conversations/{cid}", None),
        "rename conversation": ("PATCH", f"/api/conversations/{cid}", {"title": "mine now"}),
        "delete conversation": ("DELETE", f"/api/conversations/{cid}", None),
        "continue conversation": ("POST", "/api/chat", {"message": "hi", "conversation_id": cid}),
        "revoke key": ("DELETE", f"/api/keys/{key['id']}", None),
        "read usage": ("GET", "/api/usage?user=alice", None),
        "not a conversation id": ("GET", "/api/conversations/not-a-uuid", None),
    }
    for name, (method, path, body) in attempts.items():
        r = httpx.request(method, stack.url + path, json=body, headers=bob.headers, timeout=30)
        assert r.status_code == 404, f"{name}: {r.status_code} {r.text}"
        assert "private" not in r.text
    # And nothing changed for alice.
    mine = httpx.get(f"{stack.url}/api/conversations/{cid}", headers=alice.headers).json()
    assert mine["title"] != "mine now" and mine["messages"][0]["content"] == "a private question"
    assert (
        httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code
        == 200
    )


def test_usage_rows_equal_what_the_engine_reported_cancelled_included(stack: AccountsStack) -> None:
    erin = make_user(stack, "erin")
    done = chat(stack.url, erin.headers, "count these four", max_tokens=7)
    # A stream the client drops half way: its partial tokens are billed.
    with httpx.stream(
        "POST",
        stack.url + "/api/chat",
        json={"message": "a long one please", "max_tokens": 4000},
        headers=erin.headers,
        timeout=60,
    ) as response:
        events = sse_events(response.iter_lines())
        dropped = next(events).json()["request_id"]
        for n, _ in enumerate(events):
            if n > 40:
                break
    cancelled_event = asyncio.run(find_event(stack.nats_url, dropped, "cancelled", timeout=20))
    assert 0 < cancelled_event.usage.completion_tokens < 4000
    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = httpx.get(stack.url + "/api/usage", headers=erin.headers).json()["rows"]
        statuses = {r["request_id"]: r["status"] for r in rows}
        if statuses.get(done.request_id) == "completed" and statuses.get(dropped) == "cancelled":
            break
        time.sleep(0.3)
    by_id = {r["request_id"]: r for r in rows}
    assert by_id[done.request_id]["completion_tokens"] == done.usage["completion_tokens"] == 7
    assert by_id[done.request_id]["prompt_tokens"] == done.usage["prompt_tokens"]
    assert by_id[dropped]["status"] == "cancelled"
    assert by_id[dropped]["completion_tokens"] == cancelled_event.usage.completion_tokens
    assert by_id[dropped]["prompt_tokens"] == cancelled_event.usage.prompt_tokens
    totals = httpx.get(stack.url + "/api/usage", headers=erin.headers).json()["totals"]
    assert totals["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)


def test_a_first_turn_refused_before_it_started_leaves_no_conversation(stack: AccountsStack) -> None:
    frank = make_user(stack, "frank")
    too_many = {"message": "hi", "max_tokens": 100_000}
    r = httpx.post(stack.url + "/api/chat", json=too_many, headers=frank.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert httpx.get(stack.url + "/api/conversations", headers=frank.headers).json()["conversations"] == []


def test_service_keys_have_no_conversations(stack: AccountsStack) -> None:
    r = httpx.post(stack.url + "/api/chat", json={"message": "hi", "conversation_id": "x"}, headers=auth())
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_required"


def test_a_model_alias_is_stored_as_its_profile_id(stack: AccountsStack, alice: User) -> None:
    # What /api/chat accepts, the defaults accept too; they keep the id, not the alias.
    r = httpx.put(stack.url + "/api/me/settings", json={"model": "qwen-0.5b"}, headers=alice.headers)
    assert r.status_code == 200, r.text
    got = httpx.get(stack.url + "/api/me/settings", headers=alice.headers).json()
    assert got["model"] == "Qwen2.5-0.5B-Instruct"
    httpx.put(stack.url + "/api/me/settings", json={}, headers=alice.headers)
    r = httpx.post(stack.url + "/api/conversations", json={"model": "qwen2.5-0.5b"}, headers=alice.headers)
    assert r.status_code == 201 and r.json()["model"] == "Qwen2.5-0.5B-Instruct", r.text
    r = httpx.patch(
        f"{stack.url}/api/conversations/{r.json()['id']}", json={"model": "qwen-0.5b"}, headers=alice.headers
    )
    assert r.status_code == 200 and r.json()["model"] == "Qwen2.5-0.5B-Instruct", r.text
    r = httpx.put(stack.url + "/api/me/settings", json={"model": "no-such-model"}, headers=alice.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_unknown_fields_and_bad_bodies_are_400(stack: AccountsStack, alice: User) -> None:
    r = httpx.post(
        stack.url + "/api/chat", json={"message": "hi", "conversation": "x"}, headers=alice.headers
    )
    assert r.status_code == 400
    r = httpx.put(stack.url + "/api/me/settings", json={"params": {"temperature": 9}}, headers=alice.headers)
    assert r.status_code == 400 and "temperature" in (r.json()["error"]["param"] or "")
    r = httpx.post(stack.url + "/api/auth/login", content=b"not json")
    assert r.status_code == 400
