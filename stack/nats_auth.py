"""The embedded NATS server's users: one per service, passwords made once in the state folder.

`nats_users` (mode 0600) holds a line `user password` per service; `nats-server.conf`
(0600) gives each user its permissions from broker/permissions.py. A state folder from
before there were users gets them at its next start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from broker import permissions
from chatq.errors import ConfigError

USERS_FILE = "nats_users"
CONFIG_FILE = "nats-server.conf"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_passwords(home: Path) -> dict[str, str]:
    """user → password, as the state folder has them (empty when it has none)."""
    try:
        return _parse((home / USERS_FILE).read_text())
    except FileNotFoundError:
        return {}


def _parse(text: str) -> dict[str, str]:
    pairs = (
        line.split(maxsplit=1) for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    return {pair[0]: pair[1].strip() if len(pair) > 1 else "" for pair in pairs}


def outside_passwords(path: Path) -> dict[str, str]:
    """An outside server's users from NATS_USERS_FILE (the format of `nats_users`): every
    service's user must be in it with a password, or ConfigError names what is missing."""
    try:
        found = _parse(path.read_text())
    except OSError as exc:
        raise ConfigError(f"NATS_USERS_FILE {path}: {exc.strerror or exc}") from None
    wanted = {permissions.user_name(service) for service in permissions.SERVICES}
    missing = sorted(user for user in wanted if not found.get(user))
    if missing:
        raise ConfigError(
            f"NATS_USERS_FILE {path} has no password for {', '.join(missing)}: one line "
            "`user password` per service (docs/deploy.md#nats-users-and-tls)"
        )
    return found


def ensure_passwords(home: Path) -> dict[str, str]:
    """Every service's user and password, making the missing ones now."""
    found = read_passwords(home)
    wanted = {permissions.user_name(service) for service in permissions.SERVICES}
    if wanted <= found.keys():
        return found
    for user in sorted(wanted - found.keys()):
        found[user] = secrets.token_urlsafe(24)
    _write_private(home / USERS_FILE, "".join(f"{u} {p}\n" for u, p in sorted(found.items())))
    return found


def write_config(home: Path, passwords: dict[str, str]) -> Path:
    """nats-server.conf with each service's user and permissions; returns its path."""
    users = permissions.server_users(lambda service: passwords[permissions.user_name(service)])
    # The server's config format reads JSON; `$JS...` inside quotes is not a variable.
    text = "# Made by ./start from broker/permissions.py: edits are overwritten.\n"
    text += permissions.server_config(users)
    path = home / CONFIG_FILE
    _write_private(path, text)
    return path


def admin_login(passwords: dict[str, str]) -> tuple[str, str]:
    """The admin user and its password (the launcher declares the streams as it)."""
    user = permissions.user_name("admin")
    return user, passwords[user]
