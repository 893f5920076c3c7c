"""Server addresses and TLS: shared by every source and target."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import unquote

from .errors import AuthError, ConnectError, TLSError, UsageError, setting

log = logging.getLogger("mailbackup")

DEFAULT_PORTS = {"imap": 143, "imaps": 993, "pop3": 110, "pop3s": 995, "smtp": 587, "smtps": 465}


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: tls is 'implicit', 'starttls' or 'none'."""

    scheme: str
    user: str
    host: str
    port: int
    tls: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.user}@{self.host}:{self.port}"


def parse_url(
    url: str, *, no_tls: bool = False, schemes: tuple[str, ...] = ("imap", "imaps"), role: str = "source"
) -> Endpoint:
    """Parse scheme://user@host[:port]; the user part may itself contain '@'. role names the server in errors."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in schemes:
        raise UsageError(f"the {role} {url!r} must look like {' or '.join(s + '://user@host[:port]' for s in schemes)}", role=role)
    netloc = rest.split("/", 1)[0]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or not userinfo:
        raise UsageError(f"the {role} {url!r} has no user: write {scheme}://user@host", role=role)
    if ":" in userinfo:
        raise UsageError(
            f"never put a password in the URL; use {setting('password_file')}, {setting('password_command')} "
            "or the environment",
            role=role,
        )
    host, port_text = hostport, ""
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif ":" in hostport:
        host, _, port_text = hostport.rpartition(":")
    if not host:
        raise UsageError(f"the {role} {url!r} has no host", role=role)
    try:
        port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    except ValueError:
        raise UsageError(f"the {role} {url!r} has a bad port {port_text!r}", role=role) from None
    if not 0 < port < 65536:
        raise UsageError(f"the {role} {url!r} has a bad port {port}", role=role)
    if scheme.endswith("s"):
        if no_tls:
            raise UsageError(f"{setting('no_tls')} contradicts {scheme}://, which is implicit TLS", role=role)
        tls = "implicit"
    else:
        tls = "none" if no_tls else "starttls"
    return Endpoint(scheme=scheme, user=unquote(userinfo), host=host, port=port, tls=tls)


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verify against the system store, plus a private CA when given."""
    context = ssl.create_default_context()
    if ca_file:
        if not Path(ca_file).is_file():
            raise UsageError(f"{setting('ca_file')} {ca_file}: no such file")
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise UsageError(f"{setting('ca_file')} {ca_file}: not a PEM certificate ({exc.reason})") from exc
    return context


def warn_cleartext(endpoint: Endpoint) -> None:
    if endpoint.tls == "none":
        log.warning("no TLS: credentials and mail cross the network to %s in cleartext", endpoint.host)


@contextmanager
def connect_errors(endpoint: Endpoint) -> Iterator[None]:
    """Turn socket and TLS failures while connecting into errors a user can act on."""
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(
            f"certificate of {where} did not verify ({exc.verify_message}); "
            f"use {setting('ca_file')} for a private CA"
        ) from exc
    except ssl.SSLError as exc:
        hint = ""
        if endpoint.tls == "implicit" and exc.reason in PLAIN_PORT_REASONS:
            hint = f"; {endpoint.port} looks like a plain-text port: use {endpoint.scheme[:-1]}:// (STARTTLS)"
        raise TLSError(f"TLS with {where} failed: {exc.reason or exc}{hint}") from exc
    except socket.gaierror as exc:
        raise ConnectError(f"cannot resolve {endpoint.host}: {exc.strerror}") from exc
    except (TimeoutError, socket.timeout) as exc:
        raise ConnectError(f"timed out connecting to {where}{tls_hint(endpoint)}") from exc
    except OSError as exc:
        raise ConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


# What OpenSSL says when the other end answers a ClientHello in plain text.
PLAIN_PORT_REASONS = {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


def tls_hint(endpoint: Endpoint) -> str:
    """For a plain or STARTTLS URL that got no greeting: maybe the port expects TLS at once."""
    if endpoint.tls == "implicit" or endpoint.scheme.endswith("s"):
        return ""
    return f" (if {endpoint.port} is an implicit-TLS port, use {endpoint.scheme}s://)"


@contextmanager
def greeting_errors(endpoint: Endpoint, protocol_error: type[Exception]) -> Iterator[None]:
    """Before login: a closed line or a garbled greeting is a ConnectError, with the TLS hint."""
    try:
        yield
    except protocol_error as exc:
        raise ConnectError(f"{endpoint.host}:{endpoint.port} did not greet as expected: {exc}{tls_hint(endpoint)}") from exc


T = TypeVar("T")
# IMAP [UNAVAILABLE] (RFC 5530), POP3 [SYS/TEMP] and [IN-USE] (RFC 3206): try again later.
TEMPORARY = ("[UNAVAILABLE]", "[SYS/TEMP]", "[IN-USE]", "Temporary authentication failure")


def retry_temporary(connect: Callable[[], T], attempts: int = 3, delay: float = 2.0) -> T:
    """Log in again after a failure the server calls temporary; a wrong password fails at once."""
    for attempt in range(1, attempts + 1):
        try:
            return connect()
        except AuthError as exc:
            if attempt == attempts or not any(marker in str(exc) for marker in TEMPORARY):
                raise
            log.warning("%s; trying again in %.0f s", exc, delay * attempt)
            time.sleep(delay * attempt)
    raise AssertionError("unreachable")
