"""POP3 source: UIDL listing, RETR with exact bytes, DELE, and QUIT only on success.

poplib connects and authenticates; message bodies are read here instead, because
poplib strips line endings and refuses lines over 2048 bytes.
"""

from __future__ import annotations

import email.utils
import hashlib
import poplib
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Iterator

from ..credentials import oauthbearer, sasl_b64, xoauth2
from ..errors import AuthError, ConnectionLost, ServerError, TLSError
from ..net import Endpoint, connect_errors, tls_context, warn_cleartext

LINE_LIMIT = 1 << 16
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Listed:
    """One message in the maildrop: its number this session, its size and its id."""

    number: int
    size: int
    uidl: str | None


def read_multiline(readline: Callable[[int], bytes], limit: int) -> bytes:
    """Read a dot-terminated POP3 body, undoing dot-stuffing and keeping line endings as sent."""
    parts: list[bytes] = []
    total = 0
    at_line_start = True
    while True:
        piece = readline(LINE_LIMIT)
        if not piece:
            raise ConnectionLost("connection closed in the middle of a message; rerun to finish")
        if at_line_start:
            if piece in (b".\r\n", b".\n"):
                return b"".join(parts)
            if piece.startswith(b"."):
                piece = piece[1:]
        at_line_start = piece.endswith(b"\n")
        parts.append(piece)
        total += len(piece)
        if total > limit:
            raise ServerError(f"message is larger than the {limit} bytes the server announced")


def parse_id_lines(lines: list[bytes]) -> dict[int, str]:
    """'n text' lines of LIST or UIDL, keyed by message number."""
    out = {}
    for line in lines:
        number, _, text = line.decode("ascii", "replace").strip().partition(" ")
        try:
            out[int(number)] = text.strip()
        except ValueError:
            raise ServerError(f"malformed listing line from server: {line[:60]!r}") from None
    return out


def message_date(raw: bytes) -> tuple[datetime | None, str]:
    """The date to restore with: the newest Received header's, else Date's. Says which."""
    match = _BLANK_LINE.search(raw)
    head = raw[: match.start()] if match else raw
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    for received in headers.get_all("Received") or []:
        when = _parse_date(str(received).rpartition(";")[2])
        if when is not None:
            return when, "received"
        break  # only the newest hop tells when this maildrop got it
    when = _parse_date(str(headers.get("Date", "")))
    return (when, "date") if when is not None else (None, "download")


def _parse_date(text: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else None


@contextmanager
def command_errors() -> Iterator[None]:
    try:
        yield
    except poplib.error_proto as exc:
        reason = _reason(exc)
        if "EOF" in reason:
            raise ConnectionLost("the POP3 server closed the connection; rerun to finish") from exc
        raise ServerError(f"POP3 server said: {reason}") from exc
    except OSError as exc:
        raise ConnectionLost(f"connection to the POP3 server lost: {exc}; rerun to finish") from exc


class Pop3Source:
    def __init__(self, conn: poplib.POP3, endpoint: Endpoint) -> None:
        self.conn = conn
        self.endpoint = endpoint

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        password: str,
        *,
        ca_file: str | None = None,
        timeout: float = 120.0,
        auth: str = "password",
    ) -> Pop3Source:
        context = tls_context(ca_file) if endpoint.tls != "none" else None
        warn_cleartext(endpoint)
        with connect_errors(endpoint):
            if endpoint.tls == "implicit":
                conn: poplib.POP3 = poplib.POP3_SSL(endpoint.host, endpoint.port, context=context, timeout=timeout)
            else:
                conn = poplib.POP3(endpoint.host, endpoint.port, timeout=timeout)
            if endpoint.tls == "starttls":
                try:
                    capabilities = conn.capa()
                except poplib.error_proto:
                    capabilities = {}
                if "STLS" not in capabilities:
                    conn.close()
                    raise TLSError(
                        f"{endpoint.host} does not offer STLS; no credentials were sent "
                        "(use pop3s://, or --no-tls to allow cleartext)"
                    )
                conn.stls(context)
        try:
            with connect_errors(endpoint):
                login(conn, endpoint, password, auth)
        except poplib.error_proto as exc:
            conn.close()
            raise AuthError(f"login as {endpoint.user} at {endpoint.host} failed: {_reason(exc)}") from exc
        return cls(conn, endpoint)

    def listing(self) -> list[Listed]:
        """Every message with its size and UIDL (None for all when the server has no UIDL)."""
        with command_errors():
            sizes = parse_id_lines(self.conn.list()[1])
            try:
                uidls: dict[int, str] = parse_id_lines(self.conn.uidl()[1])
            except poplib.error_proto:
                uidls = {}
        try:
            return [Listed(n, int(size.split()[0]), uidls.get(n)) for n, size in sorted(sizes.items())]
        except (ValueError, IndexError):
            raise ServerError("malformed LIST reply from the POP3 server") from None

    def header_id(self, listed: Listed) -> str:
        """Fallback id without UIDL: SHA-256 of the headers (TOP n 0) plus the size."""
        head = self._multiline(f"TOP {listed.number} 0", listed.size)
        return f"top0:{hashlib.sha256(head).hexdigest()}:{listed.size}"

    def retrieve(self, listed: Listed) -> bytes:
        return self._multiline(f"RETR {listed.number}", listed.size)

    def delete(self, number: int) -> None:
        with command_errors():
            self.conn.dele(number)

    def close(self, *, commit: bool) -> None:
        """QUIT (which carries out DELEs) only when commit; otherwise drop the line, so nothing is deleted."""
        try:
            if commit:
                with command_errors():
                    self.conn.quit()
        finally:
            self.conn.close()

    def _multiline(self, command: str, size: int) -> bytes:
        # poplib has no way to read a body with its line endings intact.
        with command_errors():
            self.conn._putcmd(command)
            self.conn._getresp()
            assert self.conn.file is not None
            return read_multiline(self.conn.file.readline, 2 * size + (1 << 20))


def login(conn: poplib.POP3, endpoint: Endpoint, secret: str, auth: str) -> None:
    """USER/PASS, or AUTH XOAUTH2/OAUTHBEARER (RFC 5034) with an access token."""
    if auth == "password":
        conn.user(endpoint.user)
        conn.pass_(secret)
        return
    if auth == "xoauth2":
        response = xoauth2(endpoint.user, secret)
    elif auth == "oauthbearer":
        response = oauthbearer(endpoint.user, secret, endpoint.host, endpoint.port)
    else:
        raise ValueError(f"unknown auth {auth!r}")
    reply = conn._shortcmd(f"AUTH {auth.upper()} {sasl_b64(response)}")
    if reply.startswith(b"+ "):  # a SASL error challenge: answer empty to get the final -ERR
        conn._shortcmd("")


def _reason(exc: poplib.error_proto) -> str:
    reason = exc.args[0] if exc.args else exc
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
