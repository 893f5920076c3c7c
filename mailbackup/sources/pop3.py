"""POP3 source: UIDL listing, RETR with exact bytes, DELE, and QUIT only on success.

poplib connects and authenticates; message bodies are read here instead, because
poplib strips line endings and refuses lines over 2048 bytes.
"""

from __future__ import annotations

import hashlib
import io
import poplib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, BinaryIO

from ..credentials import oauthbearer, sasl_b64, xoauth2
from ..errors import AuthError, ConnectionLost, ServerError, TLSError, UsageError, setting
from ..model import Folder, Message
from ..net import (
    Endpoint,
    connect_errors,
    greeting_errors,
    parse_url,
    retry_temporary,
    tls_context,
    warn_cleartext,
)
from . import (
    LIST_SLICE,
    POP3,
    Checkpoint,
    Connect,
    Fetched,
    Listed,
    OpenFolder,
    SourceId,
)

LINE_LIMIT = 1 << 16
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_RECEIVED = re.compile(rb"^Received:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE | re.IGNORECASE)
_DATE = re.compile(rb"^Date:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE | re.IGNORECASE)


MAILDROP = "INBOX"  # the one folder a maildrop lists; backup archives it under --into


@dataclass(frozen=True)
class Drop:
    """One message in the maildrop: its number this session, its size and its UIDL."""

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
        chunk = stream.peek(1 << 16)  # type: ignore[attr-defined]  # poplib's file is a BufferedReader
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
    import email.utils  # here, not at the top: a rerun with nothing new reads no message

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
    """A POP3 maildrop as a Source: one folder, ids are UIDLs (or the documented fallback)."""

    traits = POP3

    def __init__(self, conn: poplib.POP3, endpoint: Endpoint) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self._drop: dict[SourceId, Drop] = {}  # id -> this session's message, from the last open()
        try:  # capabilities may change at login (RFC 2449), so ask after it
            self.pipelining = "PIPELINING" in conn.capa()
        except (poplib.error_proto, OSError):
            self.pipelining = False

    @classmethod
    def open_url(cls, url: str, connect: Connect) -> Pop3Source:
        endpoint = parse_url(url, no_tls=connect.no_tls, schemes=("pop3", "pop3s"))
        return cls.connect(
            endpoint,
            connect.secret,
            ca_file=connect.ca_file,
            timeout=connect.timeout,
            auth=connect.auth,
            admin_user=connect.admin_user,
        )

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
        admin_user: str | None = None,
    ) -> Pop3Source:
        context = tls_context(ca_file) if endpoint.tls != "none" else None
        warn_cleartext(endpoint)
        with connect_errors(endpoint), greeting_errors(endpoint, poplib.error_proto):
            # poplib reads the greeting under the same timeout as the connect.
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
                        f"(use pop3s://, or {setting('no_tls')} to allow cleartext)"
                    )
                conn.stls(context)
        try:
            with connect_errors(endpoint):
                login(conn, endpoint, password, auth, admin_user)
        except poplib.error_proto as exc:
            conn.close()
            who = f"{endpoint.user} (admin {admin_user})" if admin_user else endpoint.user
            raise AuthError(f"login as {who} at {endpoint.host} failed: {_reason(exc)}") from exc
        return cls(conn, endpoint)

    def __str__(self) -> str:
        return str(self.endpoint)

    # the Source protocol

    def folders(self) -> list[Folder]:
        return [Folder(MAILDROP, "/")]

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        """LIST and UIDL the maildrop; messages get ids (UIDL, or TOP n 0 fallback), repeats dropped."""
        listing = self.listing_lines()
        notes: tuple[str, ...] = ()
        if any(m.uidl is None for m in listing):
            notes = ("server has no UIDL: messages are told apart by SHA-256 of their headers (TOP n 0) plus size",)
            listing = [m if m.uidl else replace(m, uidl=self.header_id(m)) for m in listing]
        self._drop = {}
        for m in listing:
            self._drop.setdefault(m.uidl or "", m)
        return OpenFolder(folder, Checkpoint(None), list(self._drop), notes)

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        for start in range(0, len(ids), LIST_SLICE):
            yield [Listed(i, self._drop[i].size) for i in ids[start : start + LIST_SLICE] if i in self._drop]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        """RETR each message; what arrived whole is yielded before a dropped line raises."""
        drops = [self._drop[item.id] for item in batch]
        for drop, outcome in self.retrieve_batch(drops):
            if isinstance(outcome, ServerError):
                yield Fetched(drop.uidl or "", None, f"{outcome}")
                continue
            when, how = message_date(outcome)
            message = Message(
                raw=outcome, internal_date=when or datetime.now(timezone.utc), source_id=drop.uidl, date_source=how
            )
            yield Fetched(drop.uidl or "", message)

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        return iter(())  # POP3 has no flags

    def before(self, cutoff: datetime) -> None:
        return None  # POP3 keeps no dates: the archive's are used

    def delete(self, ids: Sequence[SourceId]) -> None:
        """DELE; the server carries it out only at QUIT, that is close(commit=True)."""
        for i in ids:
            with command_errors():
                self.conn.dele(self._drop[i].number)

    def close(self, *, commit: bool = True) -> None:
        """QUIT (which carries out DELEs) only when commit; otherwise drop the line, so nothing is deleted."""
        try:
            if commit:
                with command_errors():
                    self.conn.quit()
        finally:
            self.conn.close()

    # POP3 commands

    def listing_lines(self) -> list[Drop]:
        """Every message with its size and UIDL (None for all when the server has no UIDL)."""
        with command_errors():
            sizes = parse_id_lines(self.conn.list()[1])
            try:
                uidls: dict[int, str] = parse_id_lines(self.conn.uidl()[1])
            except poplib.error_proto:
                uidls = {}
        try:
            return [Drop(n, int(size.split()[0]), uidls.get(n)) for n, size in sorted(sizes.items())]
        except (ValueError, IndexError):
            raise ServerError("malformed LIST reply from the POP3 server") from None

    def uidls(self) -> list[str] | None:
        """Every message's UIDL, in one read and without sizes (the rerun check needs no more);
        None unless the server gives exactly one plain 'n id' line per message."""
        with command_errors():
            try:
                count = self.conn.stat()[0]
            except (ValueError, IndexError):  # poplib parses "+OK n size" and takes anything else badly
                return None
        words = self._multiline("UIDL", 80 * count).decode("ascii", "replace").split()
        # The full listing (listing_lines) would see the same ids: each line is "n id", in order.
        if len(words) != 2 * count or words[0::2] != list(map(str, range(1, count + 1))):
            return None
        return words[1::2]

    def header_id(self, drop: Drop) -> str:
        """Fallback id without UIDL: SHA-256 of the headers (TOP n 0) plus the size."""
        head = self._multiline(f"TOP {drop.number} 0", drop.size)
        return f"top0:{hashlib.sha256(head).hexdigest()}:{drop.size}"

    def retrieve(self, drop: Drop) -> bytes:
        return self._multiline(f"RETR {drop.number}", drop.size)

    def retrieve_batch(self, batch: Sequence[Drop]) -> Iterator[tuple[Drop, bytes | ServerError]]:
        """RETR each message, yielding each as it arrives; with PIPELINING all commands go out at
        once, saving a round trip each. A refused message comes as its ServerError; a broken line raises.
        """
        if not self.pipelining:
            for drop in batch:
                try:
                    yield drop, self.retrieve(drop)
                except ServerError as exc:
                    yield drop, exc
            return
        with command_errors():
            assert self.conn.sock is not None and self.conn.file is not None
            self.conn.sock.sendall(b"".join(b"RETR %d\r\n" % m.number for m in batch))
            for drop in batch:
                yield drop, self._reply(drop)

    def _reply(self, drop: Drop) -> bytes | ServerError:
        assert self.conn.file is not None
        status = self.conn.file.readline(LINE_LIMIT)
        if status.startswith(b"+OK"):
            return read_multiline(self.conn.file, 2 * drop.size + (1 << 20))
        if status.startswith(b"-ERR"):
            return ServerError(f"POP3 server refused message {drop.number}: {status.decode('utf-8', 'replace').strip()}")
        if not status:
            raise ConnectionLost("the POP3 server closed the connection; rerun to finish")
        raise ServerError(f"unexpected POP3 reply: {status[:60]!r}")

    def _multiline(self, command: str, size: int) -> bytes:
        # poplib has no way to read a body with its line endings intact.
        with command_errors():
            # poplib has no public call for "send a command, read the status line"
            self.conn._putcmd(command)  # type: ignore[attr-defined]  # see above
            self.conn._getresp()  # type: ignore[attr-defined]  # see above
            assert self.conn.file is not None
            return read_multiline(self.conn.file, 2 * size + (1 << 20))


def login(conn: poplib.POP3, endpoint: Endpoint, secret: str, auth: str, admin_user: str | None = None) -> None:
    """USER/PASS, AUTH PLAIN as an admin for the user, or AUTH XOAUTH2/OAUTHBEARER (RFC 5034) with an access token."""
    if admin_user and auth != "password":
        raise UsageError(f"{setting('admin_user')} goes with the admin's password, not with OAuth2")
    if admin_user:
        response = f"{endpoint.user}\0{admin_user}\0{secret}".encode()  # authzid, authcid, password (RFC 4616)
        auth = "plain"
    elif auth == "password":
        conn.user(endpoint.user)
        conn.pass_(secret)
        return
    if auth == "xoauth2":
        response = xoauth2(endpoint.user, secret)
    elif auth == "oauthbearer":
        response = oauthbearer(endpoint.user, secret, endpoint.host, endpoint.port)
    elif auth != "plain":
        raise ValueError(f"unknown auth {auth!r}")
    # poplib has no AUTH: its private one-line command call is what its own user() uses
    reply = conn._shortcmd(f"AUTH {auth.upper()} {sasl_b64(response)}")  # type: ignore[attr-defined]  # see above
    if reply.startswith(b"+ "):  # a SASL error challenge: answer empty to get the final -ERR
        conn._shortcmd("")  # type: ignore[attr-defined]  # see above


def _reason(exc: poplib.error_proto) -> str:
    reason = exc.args[0] if exc.args else exc
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
