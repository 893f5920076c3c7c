"""Look into an archive without restoring it: `mailbackup serve ARCHIVE --imap HOST:PORT`.

The IMAP server is read-only: the archive is opened with mode="read", and every
command that would change it is answered NO.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass

from ..errors import UsageError, setting
from ..stores import open_store


@dataclass(frozen=True)
class ServeSettings:
    archive: str
    user: str
    password: str
    mailbox: str | None = None  # the account, in an archive that holds several
    tls_cert: str | None = None
    tls_key: str | None = None
    implicit_tls: bool = False  # TLS from the first byte (imaps); else STARTTLS when a cert is given
    include_gone: bool = False  # show gone messages in virtual folders Gone/<folder>

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load TLS certificate {self.tls_cert}: {exc}") from exc
        return context


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad address {text!r}: want HOST:PORT, such as 127.0.0.1:1143")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def default_user(archive: str, mailbox: str | None = None) -> str:
    """The user name of the archive's account (user@host), or 'mailbackup' if it has none yet."""
    store = open_store(archive, mode="read", account=mailbox)
    try:
        account = store.catalog.account or ""
    finally:
        store.close()
    return account.rpartition("@")[0] or account or "mailbackup"


def start_imap(address: tuple[str, int], settings: ServeSettings) -> ImapServer:
    """Check the archive opens, bind, and serve in a background thread; stop with .shutdown()."""
    if not settings.tls_cert and not is_loopback(address[0]):
        raise UsageError(f"refusing to serve {address[0]} without TLS: give {setting('tls_cert')}/{setting('tls_key')}, or bind 127.0.0.1")
    if settings.implicit_tls and not settings.tls_cert:
        raise UsageError(f"{setting('implicit_tls')} needs {setting('tls_cert')}")
    open_store(settings.archive, mode="read", account=settings.mailbox).close()  # a bad archive fails now, not per client
    try:
        server = ImapServer(address, settings)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name="mailbackup-serve-imap", daemon=True)
    thread.start()
    return server


from .imap import ImapServer  # noqa: E402  imap.py imports ServeSettings from here

__all__ = ["ImapServer", "ServeSettings", "default_user", "parse_address", "start_imap"]
