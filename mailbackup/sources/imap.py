"""IMAP source: folders, UIDs, flags and message bytes, read-only (EXAMINE, BODY.PEEK).

imapclient's dicts are turned into model records here and nowhere else.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from typing import Any

import imapclient
from imapclient import exceptions as imap_errors
from imapclient.datetime_util import parse_to_datetime
from imapclient.response_parser import gen_parsed_response

from ..errors import AuthError, ConnectionLost, HostileServer, ServerError, TLSError
from ..model import Folder, FolderState, Message
from ..net import Endpoint, connect_errors, retry_temporary, tls_context, warn_cleartext

FETCH_ITEMS = ["BODY.PEEK[]", "FLAGS", "INTERNALDATE", "RFC822.SIZE"]
SMALL_LITERAL = 1 << 20  # folder names and the like
BIG_LITERAL = 1 << 30  # a message whose size the server never told
# \Recent belongs to a session and cannot be set again on restore.
SESSION_FLAGS = {"\\recent"}


def decode_flags(flags: Sequence[bytes | str]) -> tuple[str, ...]:
    out = set()
    for flag in flags:
        text = flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)
        if text.lower() not in SESSION_FLAGS:
            out.add(text)
    return tuple(sorted(out))


def decode_date(value: datetime | None) -> datetime | None:
    """Keep the server's own UTC offset, as a plain datetime.timezone."""
    if value is None or value.tzinfo is None:
        return value
    offset = value.utcoffset() or timedelta(0)
    return value.replace(tzinfo=timezone(offset))


def as_folder(flags: Sequence[bytes], delimiter: bytes | str | None, name: str | bytes) -> Folder:
    if isinstance(delimiter, bytes):
        delimiter = delimiter.decode("ascii", "replace")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    attributes = frozenset(f.decode("ascii", "replace") if isinstance(f, bytes) else str(f) for f in flags)
    return Folder(name=str(name), delimiter=delimiter or None, attributes=attributes)


def literal_room(size: int) -> int:
    """The biggest literal to accept for a message of this RFC822.SIZE: room for a server
    whose size is a little off, not for one that lies wildly."""
    return 2 * size + (1 << 20)


def sequence_set(uids: Sequence[int]) -> str:
    """Compress ascending UIDs into an IMAP sequence set such as '1:5,7,9:12'."""
    if not uids:
        raise ValueError("empty UID set")
    parts = []
    start = prev = uids[0]
    for uid in uids[1:]:
        if uid != prev + 1:
            parts.append(f"{start}:{prev}" if prev != start else str(start))
            start = uid
        prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


# The common shapes of a FETCH reply, read with regexes instead of imapclient's
# byte-by-byte lexer; anything else falls back to that lexer.
_FAST_ITEM = re.compile(
    rb' *(?:(UID|RFC822\.SIZE) (\d+)|FLAGS \(([^()"{}]*)\)|INTERNALDATE "([^"\\]*)"|MODSEQ \((\d+)\))',
    re.IGNORECASE,
)
_FAST_WITH_BODY = re.compile(rb"\d+ \((.*)BODY\[\] \{(\d+)\}", re.DOTALL)
_FAST_PLAIN = re.compile(rb"\d+ \((.*)\)", re.DOTALL)


def _fast_items(text: bytes, data: dict[bytes, object]) -> bool:
    text = text.rstrip(b" ")
    pos = 0
    while pos < len(text):
        match = _FAST_ITEM.match(text, pos)
        if not match or match.end() == pos:
            return False
        number_key, number, flags, date, modseq = match.groups()
        if number_key is not None:
            data[number_key.upper()] = int(number)
        elif flags is not None:
            data[b"FLAGS"] = tuple(flags.split())
        elif date is not None:
            data[b"INTERNALDATE"] = date
        else:
            data[b"MODSEQ"] = (int(modseq),)
        pos = match.end()
    return True


def parse_fetch_fast(lines: list[object]) -> dict[int, dict[bytes, object]] | None:
    """parse_fetch for replies made only of UID, RFC822.SIZE, FLAGS, INTERNALDATE,
    MODSEQ and one BODY[] literal; None when the reply has any other shape."""
    out: dict[int, dict[bytes, object]] = {}
    items = iter(lines)
    for item in items:
        data: dict[bytes, object] = {}
        if isinstance(item, tuple) and len(item) == 2:
            head, literal = item
            match = _FAST_WITH_BODY.fullmatch(head)
            trailer = next(items, None)
            if (
                match is None
                or int(match.group(2)) != len(literal)
                or not isinstance(trailer, bytes)
                or not trailer.endswith(b")")
                or not _fast_items(match.group(1), data)
                or not _fast_items(trailer[:-1], data)
            ):
                return None
            data[b"BODY[]"] = literal
        elif isinstance(item, bytes):
            match = _FAST_PLAIN.fullmatch(item)
            if match is None or not _fast_items(match.group(1), data):
                return None
        else:
            return None
        uid = data.get(b"UID")
        if isinstance(uid, int):
            out.setdefault(uid, {}).update(data)
    return out


def parse_fetch(lines: list[object]) -> dict[int, dict[bytes, object]]:
    """FETCH responses keyed by UID. Replies without a UID are unsolicited and dropped:
    keyed by sequence number they could be mistaken for another message's UID."""
    out: dict[int, dict[bytes, object]] = {}
    if lines == [None]:
        return out
    fast = parse_fetch_fast(lines)
    return fast if fast is not None else parse_fetch_general(lines)


def parse_fetch_general(lines: list[object]) -> dict[int, dict[bytes, object]]:
    """parse_fetch for any reply, through imapclient's lexer."""
    try:
        return _parse_fetch_general(lines)
    except (imap_errors.IMAPClientError, ValueError, TypeError) as exc:
        raise ServerError(f"malformed FETCH response: {exc}") from exc


def _parse_fetch_general(lines: list[object]) -> dict[int, dict[bytes, object]]:
    out: dict[int, dict[bytes, object]] = {}
    parsed = gen_parsed_response(lines)
    for _seq in parsed:
        attributes = next(parsed, None)
        if not isinstance(attributes, tuple) or len(attributes) % 2:
            raise ServerError(f"malformed FETCH response: {str(attributes)[:80]}")
        if not all(isinstance(key, bytes) for key in attributes[::2]):
            raise ServerError(f"malformed FETCH response: {str(attributes)[:80]}")
        data = {bytes(k).upper(): v for k, v in zip(attributes[::2], attributes[1::2])}
        uid = data.get(b"UID")
        if uid is None:
            continue
        try:
            out.setdefault(int(uid), {}).update(data)  # type: ignore[call-overload]
        except ValueError:
            raise ServerError(f"malformed UID in FETCH response: {uid!r}") from None
    return out


def login(client: imapclient.IMAPClient, endpoint: Endpoint, secret: str, auth: str) -> None:
    """LOGIN with a password, or SASL XOAUTH2/OAUTHBEARER with an access token."""
    if auth == "password":
        client.login(endpoint.user, secret)
    elif auth == "xoauth2":
        client.oauth2_login(endpoint.user, secret, mech="XOAUTH2")
    elif auth == "oauthbearer":
        client.oauthbearer_login(endpoint.user, secret)
    else:
        raise ValueError(f"unknown auth {auth!r}")


def lost(exc: BaseException) -> ConnectionLost:
    return ConnectionLost(f"connection to the IMAP server lost: {exc}; rerun to finish")


class ImapSource:
    """One logged-in IMAP connection."""

    def __init__(self, client: imapclient.IMAPClient, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.broken = False
        self.literal_limit = SMALL_LITERAL
        self.known_sizes: dict[int, int] = {}  # RFC822.SIZE of the last slice asked for
        self._guard_literals()
        self.condstore = client.has_capability("CONDSTORE")
        if self.condstore and client.has_capability("ENABLE"):
            client.enable("CONDSTORE")

    @classmethod
    def connect(cls, endpoint: Endpoint, password: str, **options: Any) -> ImapSource:
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
    ) -> ImapSource:
        context = tls_context(ca_file) if endpoint.tls != "none" else None
        warn_cleartext(endpoint)
        with connect_errors(endpoint):
            client = imapclient.IMAPClient(
                endpoint.host,
                port=endpoint.port,
                ssl=endpoint.tls == "implicit",
                ssl_context=context,
                timeout=imapclient.SocketTimeout(connect=30.0, read=timeout),
            )
            client.normalise_times = False
            # imaplib at imapclient's debug level formats every literal with %r: slow,
            # and it would put message bodies in a debug log.
            client._imap.debug = 0
            if endpoint.tls == "starttls":
                if not client.has_capability("STARTTLS"):
                    client.shutdown()
                    raise TLSError(
                        f"{endpoint.host} does not offer STARTTLS; no credentials were sent "
                        "(use imaps://, or --no-tls to allow cleartext)"
                    )
                client.starttls(context)
        try:
            login(client, endpoint, password, auth)
        except imap_errors.LoginError as exc:
            client.shutdown()
            raise AuthError(f"login as {endpoint.user} at {endpoint.host} failed: {_text(exc)}") from exc
        except (imap_errors.IMAPClientAbortError, OSError) as exc:
            raise lost(exc) from exc
        return cls(client, endpoint)

    def _guard_literals(self) -> None:
        """Refuse a literal bigger than the reply can hold, before anything is allocated for it.

        imaplib reads a literal with one read(size), and a buffered read allocates
        size bytes up front: a server announcing {999999999999} must not get that far.
        """
        plain_read = self.client._imap.read

        def read(size: int) -> bytes:
            if size > self.literal_limit:
                self.broken = True
                raise HostileServer(
                    f"the server announced a {size}-byte literal where at most {self.literal_limit} "
                    "could be meant; refusing it (broken or hostile server)"
                )
            return plain_read(size)

        self.client._imap.read = read

    def close(self) -> None:
        if self.broken:  # mid-literal: a LOGOUT would read garbage
            self.client.shutdown()
            return
        try:
            self.client.logout()
        except Exception:  # the connection may be gone already; nothing to save
            try:
                self.client.shutdown()
            except Exception:
                pass

    def folders(self) -> list[Folder]:
        with command_errors():
            listed = self.client.list_folders()
        return [as_folder(*item) for item in listed]

    def personal_prefix(self) -> str:
        """The personal namespace's prefix: "INBOX." on Cyrus and Courier, "" on Dovecot or without NAMESPACE."""
        if not self.client.has_capability("NAMESPACE"):
            return ""
        with command_errors():
            personal = self.client.namespace().personal
        return str(personal[0][0]) if personal else ""

    def examine(self, folder: Folder, *, writable: bool = False) -> FolderState:
        """EXAMINE (read-only); SELECT only for the one command that deletes, prune-server."""
        with command_errors():
            response = self.client.select_folder(folder.name, readonly=not writable)
        if b"UIDVALIDITY" not in response:
            raise ServerError(f"{folder.name}: server sent no UIDVALIDITY")
        return FolderState(
            uid_validity=int(response[b"UIDVALIDITY"]),
            exists=int(response.get(b"EXISTS", 0)),
            uid_next=response.get(b"UIDNEXT"),
            highest_modseq=response.get(b"HIGHESTMODSEQ") if self.condstore else None,
        )

    def uids(self, criteria: str | list[str] = "ALL") -> array[int]:
        """The UIDs in the selected folder that match, ascending."""
        with command_errors():
            found = self.client.search(criteria)
        return array("q", sorted(int(u) for u in found))

    def expunge(self, uids: Sequence[int]) -> None:
        """Mark uids \\Deleted and expunge exactly them.

        Without UIDPLUS a plain EXPUNGE would also remove messages the user had
        marked \\Deleted, so it is only sent when none but ours are marked.
        """
        with command_errors():
            self.client.add_flags(list(uids), [b"\\Deleted"], silent=True)
            if self.client.has_capability("UIDPLUS"):
                self.client.uid_expunge(list(uids))
                return
            marked = set(self.client.search("DELETED"))
            if marked != set(uids):
                self.client.remove_flags(list(uids), [b"\\Deleted"], silent=True)
                raise ServerError(
                    "server lacks UIDPLUS and other messages are marked \\Deleted; "
                    "expunging would remove them too, so nothing was deleted"
                )
            self.client.expunge()

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        response = self.fetch_items(sequence_set(uids), ["RFC822.SIZE"])
        self.known_sizes = {uid: int(data.get(b"RFC822.SIZE", 0)) for uid, data in response.items()}  # type: ignore[call-overload]
        return self.known_sizes

    def flags(self, uids: Sequence[int]) -> dict[int, tuple[str, ...]]:
        response = self.fetch_items(sequence_set(uids), ["FLAGS"])
        return {uid: decode_flags(data.get(b"FLAGS", ())) for uid, data in response.items()}  # type: ignore[arg-type]

    def changed_flags(self, modseq: int) -> dict[int, tuple[str, ...]]:
        """Flags of the messages changed since modseq (CONDSTORE)."""
        response = self.fetch_items("1:*", ["FLAGS"], f"(CHANGEDSINCE {modseq})")
        return {uid: decode_flags(data.get(b"FLAGS", ())) for uid, data in response.items()}  # type: ignore[arg-type]

    def fetch(self, uids: Sequence[int]) -> tuple[list[Message], list[int]]:
        """Fetch a batch; returns the messages and the UIDs the server sent no body for."""
        sizes = [self.known_sizes.get(uid) for uid in uids]
        limit = literal_room(max(sizes)) if None not in sizes else BIG_LITERAL  # type: ignore[type-var]
        response = self.fetch_items(sequence_set(uids), FETCH_ITEMS, literal_limit=limit)
        messages, missing = [], []
        for uid in uids:
            data = response.get(uid, {})
            raw = data.get(b"BODY[]")
            if not isinstance(raw, bytes):
                missing.append(uid)
                continue
            date = data.get(b"INTERNALDATE")
            messages.append(
                Message(
                    raw=raw,
                    flags=decode_flags(data.get(b"FLAGS", ())),  # type: ignore[arg-type]
                    internal_date=decode_date(parse_to_datetime(date, normalise=False)) if isinstance(date, bytes) else None,
                    uid=uid,
                )
            )
        return messages, missing

    def fetch_items(
        self, uid_set: str, items: list[str], modifiers: str | None = None, *, literal_limit: int = SMALL_LITERAL
    ) -> dict[int, dict[bytes, object]]:
        """UID FETCH, parsed and keyed by UID; a literal over literal_limit is refused unread."""
        # imapclient.fetch() cannot take a range like 1:* and keys unsolicited replies by
        # sequence number, so send UID FETCH the way it does and parse replies ourselves.
        imap = self.client._imap
        self.literal_limit = literal_limit
        try:
            with command_errors():
                tag = imap._command("UID", "FETCH", uid_set, "(" + " ".join(items) + ")", modifiers)
                status, data = imap._command_complete("FETCH", tag)
                if status != "OK":
                    raise ServerError(f"UID FETCH {uid_set[:40]} refused: {_text(data[-1] if data else status)}")
                _, lines = imap._untagged_response(status, data, "FETCH")
                return parse_fetch(lines)
        finally:
            self.literal_limit = SMALL_LITERAL


@contextmanager
def command_errors() -> Iterator[None]:
    """Map imapclient and socket failures during a command to our errors."""
    try:
        yield
    except (imap_errors.IMAPClientAbortError, OSError) as exc:  # OSError covers timeouts and TLS
        raise lost(exc) from exc
    except imap_errors.IMAPClientError as exc:
        raise ServerError(f"server refused: {_text(exc)}") from exc


def _text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text
