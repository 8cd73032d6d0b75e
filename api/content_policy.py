"""Content policies: named banned words and patterns the API refuses in a request's text.

The operator lists them in a TOML file (CONTENT_POLICY_FILE), one `[policy.<name>]`
table each: `words` (whole words or phrases, any case, any run of whitespace between a
phrase's words) and `patterns` (Python regular expressions, also matched in any case;
`(?-i:...)` for a part that must match its case). Each policy is checked and compiled
once, at start, into one regular expression (an alternation of its words and patterns),
so a request costs one `search` per policy and text and allocates no pattern.

A match refuses the request with 400 `content_policy` naming the policy and where it
matched, never the matched text (nor is it logged). The check runs before admission, so
a refused request charges no limit and no job is ever queued for it.

A policy that applies to output is matched against the answer as it streams (OutputWatch,
from api/relay.py): the job asks the worker for each chunk's plain text, and a match ends
the answer with the same error (an `error` event, or the 400 of a non-streaming request)
and cancels the job. Each chunk is searched with the last TAIL characters before it, so a
match spanning chunks is found (if no longer than TAIL) without rescanning the answer; the
chunk that completes a match is not sent, the ones before it were.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from api import metrics
from chatq.config_file import read_toml
from chatq.errors import ConfigError, ContentRefused

log = logging.getLogger("chatq.api")

Direction = Literal["input", "output"]
PolicyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][\w.\-]{0,63}$")]
# A numbered or named backreference: its group number would shift inside the alternation.
_BACKREFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]|\(\?P=")


class PolicySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One `[policy.<name>]` table as the file writes it."""

    words: list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]] = []
    patterns: list[Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]] = []
    applies_to: Annotated[tuple[Direction, ...], msgspec.Meta(min_length=1)] = ("input",)


class Policy(msgspec.Struct, frozen=True):
    """A checked, compiled policy."""

    name: str
    regex: re.Pattern[str]
    directions: frozenset[str]


class Refusal(msgspec.Struct, frozen=True):
    """Which policy matched, where (a field path such as `messages.1.content`), how much."""

    policy: str
    where: str
    length: int


def _compile(name: str, spec: PolicySpec, source: str) -> Policy:
    """One alternation of the policy's words and patterns; ConfigError names what is wrong."""
    label = f"{source}: policy {name!r}"
    bad = f"{label}: pattern"
    if not spec.words and not spec.patterns:
        raise ConfigError(f"{label}: give `words` or `patterns` (or both)")
    alternatives: list[str] = []
    for pattern in spec.patterns:
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{bad} {pattern!r} is not a valid regular expression: {exc}") from None
        if compiled.fullmatch("") is not None:
            raise ConfigError(f"{bad} {pattern!r} matches empty text, so it would refuse everything")
        if _BACKREFERENCE.search(pattern):
            raise ConfigError(f"{bad} {pattern!r} uses a backreference, which policies do not support")
        alternatives.append(f"(?:{pattern})")
    words = [r"\s+".join(re.escape(part) for part in word.split()) for word in spec.words]
    if any(not word for word in words):
        raise ConfigError(f"{label}: a word is only whitespace")
    if words:
        # Longest first, so a phrase wins over the word it starts with. \b would fail for a
        # word that begins or ends with punctuation ("c++"); the lookarounds do not.
        alternatives.append(r"(?<!\w)(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")(?!\w)")
    try:
        regex = re.compile("|".join(alternatives), re.IGNORECASE)
    except re.error as exc:
        # Each pattern compiled alone: what fails is their combination (a global flag such
        # as (?x) not at the start, a group name used twice).
        raise ConfigError(
            f"{label}: its patterns do not combine into one expression ({exc}); use scoped "
            "flags such as (?x:...) and distinct group names"
        ) from None
    return Policy(name, regex, frozenset(spec.applies_to))


class ContentPolicies:
    """The policies of one file, split by what they apply to."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self.policies = tuple(policies)
        self.input = tuple(p for p in self.policies if "input" in p.directions)
        self.output = tuple(p for p in self.policies if "output" in p.directions)

    def __len__(self) -> int:
        return len(self.policies)

    @staticmethod
    def first_match(policies: tuple[Policy, ...], texts: Iterable[tuple[str, str]]) -> Refusal | None:
        """The first policy that matches one of the (where, text) pairs, or None."""
        for where, text in texts:
            for policy in policies:
                match = policy.regex.search(text)
                if match is not None:
                    return Refusal(policy.name, where, match.end() - match.start())
        return None

    def check_input(self, texts: Iterable[tuple[str, str]]) -> None:
        """Raise ContentRefused (400 content_policy) when an input policy matches a text."""
        if not self.input:
            return
        refusal = self.first_match(self.input, texts)
        if refusal is not None:
            raise refused(refusal, "input")


class OutputWatch:
    """One answer's text as it arrives, matched against the output policies."""

    TAIL = 256  # characters of earlier chunks searched again with each new one
    _CONTEXT = 8  # characters before the tail, seen only by a word's (?<!\w) lookbehind

    def __init__(self, policies: tuple[Policy, ...]) -> None:
        self._policies = policies
        self._tail = ""

    def check(self, text: str, *, last: bool) -> None:
        """Raise ContentRefused when an output policy matches the answer so far.

        A match that ends where the text so far ends waits for the next chunk (unless this
        is the `last`): "ssn" may yet become "ssns", which a whole-word policy allows.
        """
        window = self._tail + text
        start = max(0, len(self._tail) - self.TAIL)
        for policy in self._policies:
            match = policy.regex.search(window, start)
            if match is not None and (last or match.end() < len(window)):
                raise refused(Refusal(policy.name, "output", match.end() - match.start()), "output")
        self._tail = window[-(self.TAIL + self._CONTEXT) :]


def refused(refusal: Refusal, direction: Direction) -> ContentRefused:
    """Count and log a refusal (never the matched text) and make its client error."""
    metrics.POLICY_REFUSALS.labels(policy=refusal.policy, direction=direction).inc()
    log.warning(
        "refused by %s policy %r at %s (%d characters matched)",
        direction,
        refusal.policy,
        refusal.where,
        refusal.length,
        extra={"policy": refusal.policy, "where": refusal.where},
    )
    return ContentRefused(
        f"refused by {direction} policy {refusal.policy!r}",
        param=refusal.where if direction == "input" else None,
    )


def parse_policies(data: Mapping[str, Any], source: str) -> ContentPolicies:
    """Check the decoded TOML and compile its policies; ConfigError names file, policy and field."""
    unknown = sorted(set(data) - {"policy"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)}; expected [policy.<name>] tables"
        )
    raw = data.get("policy", {})
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: no policies; add [policy.<name>] tables")
    policies = []
    for name, entry in raw.items():
        try:
            msgspec.convert(name, PolicyName)
            spec = msgspec.convert(entry, PolicySpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: policy {name!r}: {exc}") from None
        policies.append(_compile(name, spec, source))
    return ContentPolicies(policies)


def load_policies(path: Path | None) -> ContentPolicies:
    """Read and compile CONTENT_POLICY_FILE (none: no policies); raises ConfigError."""
    if path is None:
        return ContentPolicies()
    return parse_policies(read_toml(path, "CONTENT_POLICY_FILE"), str(path))
