"""Prompts of an exact token count, built with the model's own tokenizer from a seed.

A prompt is a run of whole-word vocabulary tokens (" apple", " river", ...): each word is
one token and the tokenizer splits on spaces, so N words make exactly N tokens; every
prompt is checked by encoding it. The chat template adds a fixed overhead (SmolLM2's
default system prompt and the turn markers), measured and recorded.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    tokens: int  # tokens of each prompt's text
    rendered_tokens: int  # tokens of the whole chat prompt (template included) for one prompt
    seed: int

    @property
    def template_overhead(self) -> int:
        return self.rendered_tokens - self.tokens

    def __getitem__(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def describe(self) -> dict[str, Any]:
        return {
            "count": len(self.prompts),
            "tokens": self.tokens,
            "rendered_tokens": self.rendered_tokens,
            "template_overhead": self.template_overhead,
            "seed": self.seed,
            "example_start": self.prompts[0][:120] if self.prompts else "",
        }


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, offline (models are never downloaded here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def word_tokens(tokenizer: Any) -> list[str]:
    """Lower-case ASCII words that are one token with a leading space, in a fixed order."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    words = sorted(
        token[1:]
        for token in vocab
        if token.startswith("Ġ")
        and token[1:].isascii()
        and token[1:].isalpha()
        and token[1:].islower()
        and 3 <= len(token) - 1 <= 10
    )
    # Keep the ones that really encode to their single token (checked on a sample is not
    # enough: BPE merges can split a vocabulary entry).
    return [w for w in words if _encode(tokenizer, " " + w) == [vocab["Ġ" + w]]]


def build_prompts(tokenizer: Any, *, tokens: int, count: int, seed: int) -> PromptSet:
    """`count` prompts of exactly `tokens` tokens each, the same for a given seed."""
    if tokens < 1 or count < 1:
        raise ValueError("prompt tokens and count must be at least 1")
    words = word_tokens(tokenizer)
    if len(words) < 100:
        raise RuntimeError("the tokenizer has too few whole-word tokens to build prompts")
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(count):
        text = _exact(tokenizer, words, rng, tokens)
        prompts.append(text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return PromptSet(tuple(prompts), tokens, len(list(rendered)), seed)


def _exact(tokenizer: Any, words: list[str], rng: random.Random, tokens: int) -> str:
    """Join random words (leading space each) and trim or extend until exactly `tokens`."""
    chosen = [rng.choice(words) for _ in range(tokens)]
    for _ in range(50):
        text = "".join(" " + w for w in chosen)
        count = len(_encode(tokenizer, text))
        if count == tokens:
            return text
        if count > tokens:
            chosen = chosen[: max(1, len(chosen) - (count - tokens))]
        else:
            chosen.extend(rng.choice(words) for _ in range(tokens - count))
    # Fall back to cutting the token ids (decode/encode can differ by a token or two).
    ids = _encode(tokenizer, "".join(" " + w for w in chosen))[:tokens]
    text = str(tokenizer.decode(ids))
    if len(_encode(tokenizer, text)) != tokens:
        raise RuntimeError(f"could not build a prompt of exactly {tokens} tokens")
    return text
