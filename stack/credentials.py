"""The secrets ./start makes once in the state folder: a service API key and the JWT secret."""

from __future__ import annotations

import os
import secrets

from chatq.settings import Settings


def ensure_api_key(s: Settings) -> str | None:
    """Outside development mode, make sure one API key exists; returns a new key once."""
    if s.dev_mode or s.api_keys:
        return None
    key = "cq-" + secrets.token_urlsafe(32)
    path = s.home / "api_keys"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key + "\n")
    return key


def ensure_jwt_secret(s: Settings) -> bool:
    """Make sure a random JWT signing secret exists (JWT_SECRET or the state folder's
    jwt_secret file, mode 0600); True when one was made now."""
    if s.jwt_secret:
        return False
    path = s.home / "jwt_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an empty file left by an interrupted start
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    return True
