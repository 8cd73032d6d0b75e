"""Progress on stderr while a model is prepared: a step bar, byte bars and messages."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def byte_bar(desc: str, total: int | None, progress: bool) -> tqdm[Any]:
    """A bytes progress bar on stderr (silent when progress is off)."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def step(steps: tqdm[Any], name: str) -> None:
    steps.set_description_str(name, refresh=True)


def say(progress: bool, message: str) -> None:
    if progress:
        # tqdm.write keeps a running bar intact below the message.
        tqdm.write(f"chatq: {message}", file=sys.stderr)
