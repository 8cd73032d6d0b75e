"""Connecting to NATS: who a process is there (NatsLogin), and a connection that survives
a NATS restart but stops at once on a refused login."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import nats
import nats.errors
from faststream.security import BaseSecurity, SASLPlaintext
from nats.aio.client import Client

from broker import permissions
from chatq.errors import ConfigError
from chatq.logs import url_for_log

if TYPE_CHECKING:
    from chatq.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NatsLogin:
    """Who a process is on NATS: a user and password (NATS_USER, NATS_PASSWORD), or none.

    A user's replies arrive on its own inbox prefix, the only inbox its permissions let
    it read (broker/permissions.py). A user written in the URL (`nats://user:pw@host`)
    counts as well.
    """

    user: str | None = None
    password: str | None = None
    # NATS_TLS_CA_FILE: the CA that signed a TLS server's certificate (else the system's
    # CAs verify a `tls://` server).
    ca_file: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> NatsLogin:
        ca = settings.nats_tls_ca_file
        return cls(settings.nats_user, settings.nats_password, str(ca) if ca else None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context trusting `ca_file` (None: nats-py's default for `tls://`)."""
        return None if self.ca_file is None else ssl.create_default_context(cafile=self.ca_file)

    def _user(self, url: str) -> str | None:
        return self.user or urlparse(url.split(",")[0]).username

    def client_options(self, url: str) -> dict[str, Any]:
        """nats.connect() keywords."""
        user = self._user(url)
        options: dict[str, Any] = {} if user is None else {"inbox_prefix": permissions.inbox_prefix(user)}
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        if self.ca_file is not None:
            options["tls"] = self.ssl_context()
        return options

    def pull_inbox_prefix(self, url: str) -> bytes:
        """A FastStream pull subscriber's `inbox_prefix` (it does not take the broker's)."""
        user = self._user(url)
        return (permissions.inbox_prefix(user) if user else "_INBOX").encode() + b"."

    def broker_options(self, url: str) -> dict[str, Any]:
        """FastStream NatsBroker keywords."""
        options = self.client_options(url)
        options.pop("tls", None)
        for key in ("user", "password"):
            options.pop(key, None)
        if self.user is not None:
            options["security"] = SASLPlaintext(
                username=self.user, password=self.password or "", ssl_context=self.ssl_context()
            )
        elif self.ca_file is not None:
            options["security"] = BaseSecurity(ssl_context=self.ssl_context())
        return options


NO_LOGIN = NatsLogin()


def server_urls(url: str) -> list[str]:
    """The servers of NATS_URL, a comma-separated list (a cluster's members), as the
    clients take them: nats-py and FastStream read one string as one URL."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(url: str, name: str, login: NatsLogin = NO_LOGIN, *, attempts: int = -1) -> Client:
    """Connect to NATS, retrying forever (or `attempts` times per server) so a NATS
    restart is survived; on a cluster, to another of its servers when the one connected to
    goes.

    A server that refuses the login, or whose TLS certificate is not trusted, at the first
    connect is a setting to fix, not a server to wait for: ConfigError at once (nats-py
    would try again forever). Once connected, every error NATS reports (a permissions
    violation among them) is logged. A `nats://` URL of a server that asks for TLS is
    upgraded to TLS by nats-py.
    """
    connected = False

    async def on_error(exc: Exception) -> None:
        # At connect nats-py reports it as a plain Error naming the violation.
        refused = isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
        if not connected and refused:
            who = login.user or urlparse(url.split(",")[0]).username or "no user"
            raise ConfigError(
                f"NATS at {url_for_log(url)} refused the login ({who}): check NATS_USER and NATS_PASSWORD"
            ) from None
        if not connected and isinstance(exc, ssl.SSLCertVerificationError):
            raise ConfigError(
                f"NATS at {url_for_log(url)}: its TLS certificate is not trusted ({exc.verify_message}): "
                "name the CA that signed it in NATS_TLS_CA_FILE"
            ) from None
        log.error("NATS: %s", exc)

    nc = await nats.connect(
        server_urls(url),
        name=name,
        max_reconnect_attempts=attempts,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        **login.client_options(url),
    )
    connected = True
    return nc
