"""Reading an operator's TOML file (profiles, content policies) with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from chatq.errors import ConfigError


def read_toml(path: Path, variable: str) -> dict[str, Any]:
    """The file's TOML; ConfigError names the variable that points at it, or the TOML mistake."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{variable} {path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
