"""Look into an archive without restoring it: `mailbackup serve ARCHIVE --imap HOST:PORT`.

The IMAP server is read-only: the archive is opened with mode="read", and every
command that would change it is answered NO. An encrypted archive is unlocked once, in the
caller's thread, before anything listens (a prompt never comes from a client's thread); the
server keeps that KeyRing and opens each client's store with it.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass

from .. import keys
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


def default_user(archive: str, mailbox: str | None = None, key_ring: keys.KeyRing | None = None) -> str:
    """The user name of the archive's account (user@host), or 'mailbackup' if it has none yet."""
    store = open_store(archive, mode="read", account=mailbox, key_ring=key_ring)
    try:
        account = store.catalog.account or ""
    finally:
        store.close()
    return account.rpartition("@")[0] or account or "mailbackup"


def start_imap(address: tuple[str, int], settings: ServeSettings, key_ring: keys.KeyRing | None = None) -> ImapServer:
    """Unlock and check the archive, bind, and serve in a background thread; stop with .shutdown().

    key_ring: the keys of an encrypted archive (default: those in force here, keys.using).
    """
    if not settings.tls_cert and not is_loopback(address[0]):
        raise UsageError(f"refusing to serve {address[0]} without TLS: give {setting('tls_cert')}/{setting('tls_key')}, or bind 127.0.0.1")
    if settings.implicit_tls and not settings.tls_cert:
        raise UsageError(f"{setting('implicit_tls')} needs {setting('tls_cert')}")
    key_ring = key_ring or keys.ring()
    # A bad archive or a wrong passphrase fails now, not per client; the ring keeps the opened slots.
    open_store(settings.archive, mode="read", account=settings.mailbox, key_ring=key_ring).close()
    try:
        server = ImapServer(address, settings, key_ring)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name="mailbackup-serve-imap", daemon=True)
    thread.start()
    return server


from .imap import ImapServer  # noqa: E402  imap.py imports ServeSettings from here

__all__ = ["ImapServer", "ServeSettings", "default_user", "parse_address", "start_imap"]
