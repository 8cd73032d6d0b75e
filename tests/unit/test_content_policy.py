"""Content policies: what a policy matches and what it leaves alone, the start-up errors that
name the file, policy and pattern, the refusal a client sees, and a profile's system-prompt lock."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from api import metrics
from api.content_policy import ContentPolicies, OutputWatch, load_policies, parse_policies
from catalog.profiles import Profile
from chatq.errors import ConfigError, ContentRefused
from tests.helpers import run_python

POLICIES = r"""
[policy.pii]
words = ["social security number", "ssn"]
patterns = ['\b\d{3}-\d{2}-\d{4}\b', 'card:\s*\d{16}']

[policy.lang]
words = ["c++", "frobnicate"]
applies_to = ["input", "output"]

[policy.answers]
words = ["forbidden answer"]
applies_to = ["output"]
"""


@pytest.fixture(scope="module")
def policies() -> ContentPolicies:
    return parse_policies(msgspec.toml.decode(POLICIES), "policies.toml")


def refused_by(policies: ContentPolicies, *texts: str) -> str | None:
    """The name of the input policy that refuses these texts, or None."""
    where = ((f"messages.{i}.content", t) for i, t in enumerate(texts))
    refusal = policies.first_match(policies.input, where)
    return None if refusal is None else refusal.policy


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("my SSN is private", "pii"),
        ("what is a Social   Security\nNumber?", "pii"),  # any case, any whitespace
        ("call 123-45-6789 now", "pii"),
        ("CARD: 1234567812345678", "pii"),  # patterns match in any case too
        ("I write C++ daily", "lang"),  # a word ending in punctuation is still a whole word
        ("please FROBNICATE it", "lang"),
    ],
)
def test_a_banned_word_or_pattern_is_found(policies: ContentPolicies, text: str, policy: str) -> None:
    assert refused_by(policies, "hello", text) == policy


@pytest.mark.parametrize(
    "text",
    [
        "lessn is not a word we ban",  # inside another word
        "ssns",
        "frobnicated",
        "abc++",  # inside a word
        "1234-45-6789",
        "a forbidden answer in a question",  # an output-only policy
        "",
    ],
)
def test_ordinary_text_passes(policies: ContentPolicies, text: str) -> None:
    assert refused_by(policies, text) is None


def test_policies_split_by_direction(policies: ContentPolicies) -> None:
    assert [p.name for p in policies.input] == ["pii", "lang"]
    assert [p.name for p in policies.output] == ["lang", "answers"]


def test_each_policy_is_one_compiled_expression(policies: ContentPolicies) -> None:
    pii = policies.input[0]
    assert pii.regex.pattern.count("|") >= 2  # words and patterns in one alternation


def test_a_refusal_names_the_policy_and_where_never_the_text(
    policies: ContentPolicies, caplog: pytest.LogCaptureFixture
) -> None:
    before = metrics.POLICY_REFUSALS.labels(policy="pii", direction="input")._value.get()
    with pytest.raises(ContentRefused) as caught:
        policies.check_input([("messages.0.content", "hi"), ("messages.1.content", "ssn 123-45-6789")])
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "content_policy", "messages.1.content")
    assert error.message == "refused by input policy 'pii'"
    assert metrics.POLICY_REFUSALS.labels(policy="pii", direction="input")._value.get() == before + 1
    assert "pii" in caplog.text and "messages.1.content" in caplog.text
    assert "123-45-6789" not in caplog.text and "ssn" not in caplog.text.replace("'pii'", "")


def test_no_file_means_no_policies() -> None:
    none = load_policies(None)
    assert len(none) == 0
    none.check_input([("message", "ssn")])  # nothing to refuse


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[policy.p]\npatterns = ['(unclosed']", ["policy 'p'", "'(unclosed'", "not a valid regular"]),
        ("[policy.p]\npatterns = ['a*']", ["policy 'p'", "'a*'", "matches empty text"]),
        ("[policy.p]\npatterns = ['(a)\\1']", ["policy 'p'", "backreference"]),
        ("[policy.p]\npatterns = ['x', '(?x) y']", ["policy 'p'", "do not combine", "scoped"]),
        ("[policy.p]\nwords = []", ["policy 'p'", "`words` or `patterns`"]),
        ("[policy.p]\nwords = ['  ']", ["policy 'p'", "whitespace"]),
        ("[policy.p]\nwords = ['x']\napplies_to = ['both']", ["policy 'p'", "applies_to"]),
        ("[policy.p]\nword = ['x']", ["policy 'p'", "word"]),
        ("[policy.'bad name']\nwords = ['x']", ["policy 'bad name'"]),
        ("[policies.p]\nwords = ['x']", ["unknown top-level key(s) policies"]),
        ("", ["no policies"]),
        ("[policy.p", ["not valid TOML"]),
    ],
)
def test_a_mistake_stops_the_start_naming_policy_and_pattern(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policies(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for name in names:
        assert name in message, message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CONTENT_POLICY_FILE .*missing\.toml: cannot be read"):
        load_policies(tmp_path / "missing.toml")


def _profile(**fields: object) -> Profile:
    memory = {"params_b": 0.1, "layers": 2, "kv_heads": 1, "head_dim": 64}
    return msgspec.convert({"id": "m", "name": "M", "memory": memory, **fields}, Profile)


def test_a_profile_locks_the_system_prompt_for_everyone_or_for_roles() -> None:
    assert not _profile().locks_system_prompt("user")
    everyone = _profile(system_prompt="Be brief.", system_prompt_locked=True)
    assert everyone.locks_system_prompt("user") and everyone.locks_system_prompt("admin")
    users = _profile(system_prompt_locked=["user"])
    assert users.locks_system_prompt("user") and not users.locks_system_prompt("admin")
    with pytest.raises(msgspec.ValidationError):
        _profile(system_prompt_locked=["guest"])


def watch(policies: ContentPolicies, *chunks: str) -> int | None:
    """The index of the chunk at which the output policies stop the answer, or None."""
    watcher = OutputWatch(policies.output)
    for i, chunk in enumerate(chunks):
        try:
            watcher.check(chunk, last=i == len(chunks) - 1)
        except ContentRefused as exc:
            assert (exc.code, exc.param) == ("content_policy", None)
            assert exc.message in ("refused by output policy 'lang'", "refused by output policy 'answers'")
            return i
    return None


def test_an_output_policy_finds_a_phrase_split_across_chunks(policies: ContentPolicies) -> None:
    assert watch(policies, "here is the forb", "idden ans", "wer you wanted", ".") == 2
    assert watch(policies, "no such ", "thing here") is None


def test_an_output_word_at_a_chunks_end_waits_for_the_next_chunk(policies: ContentPolicies) -> None:
    assert watch(policies, "we frobnicate", "d it") is None  # "frobnicated" is another word
    assert watch(policies, "we frobnicate", " it") == 1
    assert watch(policies, "we frobnicate") == 0  # the last chunk: nothing more can follow


def test_an_output_watch_searches_only_the_recent_tail(policies: ContentPolicies) -> None:
    """Each chunk is searched with at most TAIL (plus a few) characters before it, so the
    cost per chunk does not grow with the answer, and a word cut by the tail is not found."""
    assert watch(policies, "c", "++" + " x" * OutputWatch.TAIL, "done") == 1  # found when it completed
    assert watch(policies, "xfrobnicate " + "y" * (OutputWatch.TAIL - 4), "more") is None


@pytest.mark.parametrize("command", [["-m", "stack.cli", "start"], ["-m", "api"]])
def test_start_stops_on_a_bad_pattern_with_one_line(tmp_path: Path, command: list[str]) -> None:
    """What `./start` and the API say: the file, the policy and the pattern, no traceback;
    nothing is started."""
    policies = tmp_path / "policies.toml"
    policies.write_text("[policy.pii]\npatterns = ['\\\\d{3', '(x']\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CHATQ_", "LOG_"))}
    environ |= {
        "CHATQ_HOME": str(tmp_path / "home"),
        "CONTENT_POLICY_FILE": str(policies),
        "DEVELOPMENT_MODE": "true",
    }
    done = run_python(*command, env=environ, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "policies.toml" in line]
    assert len(lines) == 1, output
    assert "policy 'pii': pattern '(x' is not a valid regular expression" in lines[0]
