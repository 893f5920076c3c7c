"""POP3 source: UIDL listing, RETR with exact bytes, DELE, and QUIT only on success.

poplib connects and authenticates; message bodies are read here instead, because
poplib strips line endings and refuses lines over 2048 bytes.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import poplib
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Iterator

from ..credentials import oauthbearer, sasl_b64, xoauth2
from ..errors import AuthError, ConnectionLost, ServerError, TLSError
from ..net import Endpoint, connect_errors, retry_temporary, tls_context, warn_cleartext

LINE_LIMIT = 1 << 16
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_RECEIVED = re.compile(rb"^Received:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE | re.IGNORECASE)
_DATE = re.compile(rb"^Date:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Listed:
    """One message in the maildrop: its number this session, its size and its id."""

    number: int
    size: int
    uidl: str | None


_END_LINE = re.compile(rb"\n\.\r?\n")


def unstuff(body: bytes) -> bytes:
    """Drop the first '.' of every line that starts with one (RFC 1939 byte-stuffing)."""
    body = body.replace(b"\n.", b"\n")  # replace() runs in C; a (?m)^ regex tries every offset
    return body[1:] if body.startswith(b".") else body


def read_multiline(stream: BinaryIO, limit: int) -> bytes:
    """Read a dot-terminated POP3 body, undo dot-stuffing and keep line endings as sent.

    Reads block-wise with peek(), and consumes exactly up to the terminating
    '.' line, so a pipelined reply right behind it stays in the buffer. The body
    grows in a BytesIO, whose getvalue() hands its buffer over without a copy:
    a 50 MB message costs about 50 MB, not twice that.
    """
    body = io.BytesIO()
    tail = b"\n"  # the body starts a line, as if a LF came before it: that finds an empty body too
    while True:
        chunk = stream.peek(1 << 16)
        if not chunk:
            raise ConnectionLost("connection closed in the middle of a message; rerun to finish")
        window = tail + chunk
        found = _END_LINE.search(window)
        if found:
            piece = stream.read(found.end() - len(tail))
            keep = found.start() + 1 - len(tail)  # up to and with the LF that ends the last line
            if keep >= 0:
                body.write(piece[:keep])
            else:  # that LF and a bit more were written already
                body.seek(keep, io.SEEK_END)
                body.truncate()
            return unstuff(body.getvalue())
        piece = stream.read(len(chunk))
        body.write(piece)
        tail = (tail + piece)[-4:]
        if body.tell() > limit:
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
    # Only the newest (topmost) Received tells when this maildrop got the message.
    received = _RECEIVED.search(head)
    if received:
        when = _parse_date(_unfold(received.group(1)).rpartition(";")[2])
        if when is not None:
            return when, "received"
    date = _DATE.search(head)
    when = _parse_date(_unfold(date.group(1))) if date else None
    return (when, "date") if when is not None else (None, "download")


def _unfold(value: bytes) -> str:
    return re.sub(rb"\r?\n[ \t]", b" ", value).decode("latin-1")


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
        try:  # capabilities may change at login (RFC 2449), so ask after it
            self.pipelining = "PIPELINING" in conn.capa()
        except (poplib.error_proto, OSError):
            self.pipelining = False

    @classmethod
    def connect(cls, endpoint: Endpoint, password: str, **options: Any) -> Pop3Source:
        """Connect and log in; a login the server calls temporarily unavailable is tried again."""
        return retry_temporary(lambda: cls._connect(endpoint, password, **options))

    @classmethod
    def _connect(
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

    def retrieve_batch(self, batch: Sequence[Listed]) -> list[tuple[Listed, bytes | ServerError]]:
        """RETR each message; with PIPELINING all commands go out at once, saving a round trip each.

        A message the server refuses comes back as its ServerError; a broken line raises.
        """
        if not self.pipelining:
            out: list[tuple[Listed, bytes | ServerError]] = []
            for listed in batch:
                try:
                    out.append((listed, self.retrieve(listed)))
                except ServerError as exc:
                    out.append((listed, exc))
            return out
        with command_errors():
            assert self.conn.sock is not None and self.conn.file is not None
            self.conn.sock.sendall(b"".join(b"RETR %d\r\n" % m.number for m in batch))
            return [(listed, self._reply(listed)) for listed in batch]

    def _reply(self, listed: Listed) -> bytes | ServerError:
        assert self.conn.file is not None
        status = self.conn.file.readline(LINE_LIMIT)
        if status.startswith(b"+OK"):
            return read_multiline(self.conn.file, 2 * listed.size + (1 << 20))
        if status.startswith(b"-ERR"):
            return ServerError(f"POP3 server refused message {listed.number}: {status.decode('utf-8', 'replace').strip()}")
        if not status:
            raise ConnectionLost("the POP3 server closed the connection; rerun to finish")
        raise ServerError(f"unexpected POP3 reply: {status[:60]!r}")

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
            return read_multiline(self.conn.file, 2 * size + (1 << 20))


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
