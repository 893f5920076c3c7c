"""IMAP target: re-create folders and APPEND messages with their flags and INTERNALDATE.

With MULTIAPPEND and LITERAL+ a batch goes out as one APPEND command
whose literals need no round trip, and a few such commands are kept in flight.
Dovecot commits a MULTIAPPEND as one transaction, which is where the speed comes
from. Without them it falls back to imapclient's MULTIAPPEND or to one APPEND per
message, each waiting for the server.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from imapclient import IMAPClient, imap_utf7
from imapclient import exceptions as imap_errors

from ..imapconn import SMALL_LITERAL, ImapSession, as_folder, literal_room
from ..imapconn import command_errors as session_errors
from ..model import SPECIAL_USE, Folder
from ..net import Endpoint
from . import Delivered, Destination, Outgoing, message_id

log = logging.getLogger("mailbackup")

SYSTEM_FLAGS = {"\\seen", "\\answered", "\\flagged", "\\deleted", "\\draft"}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ATOM_SPECIALS = re.compile(r'[\x00-\x20\x7f(){%*"\\\]]')
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([\d:,]+)\]", re.IGNORECASE)


def internal_date(when: datetime) -> bytes:
    """An IMAP date-time such as "01-Jul-2022 23:59:58 -0330" (naive means UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    offset = when.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    text = f'"{when.day:02d}-{MONTHS[when.month - 1]}-{when.year:04d} {when:%H:%M:%S} {sign}{hours:02d}{mins:02d}"'
    return text.encode("ascii")


def quote_mailbox(name: str) -> bytes:
    """A mailbox name in modified UTF-7 as an IMAP quoted string."""
    encoded = imap_utf7.encode(name)
    return b'"' + encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def uid_set(text: bytes) -> list[int]:
    """Expand an IMAP UID set such as b"4:6,9" into [4, 5, 6, 9]."""
    out: list[int] = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        start, end = int(low), int(high or low)
        out.extend(range(min(start, end), max(start, end) + 1))
    return out


def parse_appenduid(text: bytes) -> tuple[int | None, list[int]]:
    """UIDVALIDITY and UIDs from a tagged APPEND response (UIDPLUS), or (None, [])."""
    match = _APPENDUID.search(text)
    if not match:
        return None, []
    return int(match.group(1)), uid_set(match.group(2))


def acceptable_flags(flags: Sequence[str], permanent: frozenset[str] | None) -> tuple[str, ...]:
    """System flags always; keywords only when the mailbox takes them (PERMANENTFLAGS)."""
    out = []
    for flag in flags:
        if flag.lower() in SYSTEM_FLAGS:
            out.append(flag)
        elif not flag.startswith("\\") and not _ATOM_SPECIALS.search(flag) and flag.isascii():
            if permanent is None or "\\*" in permanent or flag in permanent:
                out.append(flag)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """How the target names folders: its delimiter, personal namespace prefix and special-use folders."""

    delimiter: str | None
    prefix: str = ""
    special: tuple[tuple[str, str], ...] = ()  # (role, folder name)


def map_folder(
    parts: Sequence[str], role: str | None, layout: Layout, *, automap: bool = True, into: str | None = None
) -> str:
    """The target's name for a folder given as its hierarchy parts and special-use role."""
    delimiter = layout.delimiter or "/"
    if into:
        parts = [p for p in into.split("/") if p] + list(parts)
    else:
        special = dict(layout.special)
        if automap and role in special:
            return special[role]
        if len(parts) == 1 and parts[0].upper() == "INBOX":
            return "INBOX"
    # A '.' inside a name that came from a '/' server would otherwise start a new level.
    cleaned = [p.replace(delimiter, "_") if layout.delimiter else p for p in parts]
    if cleaned and cleaned[0].upper() == "INBOX":
        cleaned[0] = "INBOX"
    name = delimiter.join(cleaned)
    prefix = layout.prefix
    if prefix and not (name + delimiter).upper().startswith(prefix.upper()) and not name.upper().startswith(prefix.upper()):
        name = prefix + name
    return name


@dataclass
class _Sent:
    tag: bytes | None
    batch: Sequence[Outgoing]
    destination: str
    done: list[Delivered] | None = None  # already known (synchronous fallback)


class ImapTarget:
    """One logged-in IMAP connection that receives messages."""

    window = 3  # MULTIAPPEND commands in flight

    def __init__(self, session: ImapSession, endpoint: Endpoint, *, automap: bool = True, into: str | None = None):
        self.session = session
        self.client = client = session.client
        self.endpoint = endpoint
        self.identity = f"imap://{endpoint.user}@{endpoint.host}:{endpoint.port}"
        self.automap = automap
        self.into = into
        self.multiappend = client.has_capability("MULTIAPPEND")
        # LITERAL- allows non-synchronising literals of 4 KB only: not enough for mail.
        self.literal_plus = client.has_capability("LITERAL+")
        self.uidplus = client.has_capability("UIDPLUS")
        self.unselect = client.has_capability("UNSELECT")
        # Cyrus gives no folder a role by its name: "Sent" is \Sent only if created so (RFC 6154).
        self.create_special_use = client.has_capability("CREATE-SPECIAL-USE")
        self._roles: dict[str, str] = {}  # folder to create -> special-use role to give it
        self.folders = self._list()
        self.layout = self._layout()
        self._permanent: dict[str, frozenset[str] | None] = {}
        self._sizes: dict[str, dict[int, list[int]]] = {}  # destination -> size -> UIDs
        self._hashes: dict[str, dict[str, list[int]]] = {}  # destination -> SHA-256 -> UIDs
        self._hashed: dict[str, set[int]] = {}
        self._in_flight: deque[_Sent] = deque()

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        password: str,
        *,
        ca_file: str | None = None,
        timeout: float = 120.0,
        automap: bool = True,
        into: str | None = None,
        auth: str = "password",
        admin_user: str | None = None,
    ) -> ImapTarget:
        session = ImapSession.connect(endpoint, password, ca_file=ca_file, timeout=timeout, auth=auth, admin_user=admin_user)
        try:
            return cls(session, endpoint, automap=automap, into=into)
        except BaseException:
            session.close()
            raise

    def close(self) -> None:
        _logout(self.client)

    # folders

    def _list(self) -> dict[str, Folder]:
        with command_errors():
            listed = self.client.list_folders()
        folders = [as_folder(*item) for item in listed]
        return {f.name: f for f in folders}

    def _layout(self) -> Layout:
        prefix, delimiter = "", None
        if self.client.has_capability("NAMESPACE"):
            with command_errors():
                personal = self.client.namespace().personal
            if personal:
                prefix, delimiter = personal[0][0], personal[0][1]
        if delimiter is None:
            delimiter = next((f.delimiter for f in self.folders.values() if f.delimiter), None)
        special: list[tuple[str, str]] = []
        for folder in sorted(self.folders.values(), key=lambda f: f.name):
            for role in sorted(folder.attributes & SPECIAL_USE):
                if role not in dict(special) and folder.selectable:
                    special.append((role, folder.name))
        return Layout(delimiter=delimiter, prefix=prefix or "", special=tuple(special))

    def destination(self, source_name: str, delimiter: str | None, attributes: frozenset[str]) -> str:
        source = Folder(name=source_name, delimiter=delimiter, attributes=attributes)
        name = map_folder(source.parts, source.special_use, self.layout, automap=self.automap, into=self.into)
        role = source.special_use
        if role and role not in dict(self.layout.special) and role not in self._roles.values():
            self._roles.setdefault(name, role)
        return name

    def _existing(self, name: str) -> str | None:
        if name.upper() == "INBOX":
            return "INBOX"
        return name if name in self.folders else None

    def open(self, name: str, *, create: bool = True, contents: bool = True) -> Destination:
        existing = self._existing(name)
        if existing is None:
            if not create:
                return Destination(name=name, uids=frozenset(), exists=False)
            with command_errors():
                try:
                    if not self._create_with_role(name):
                        self.client.create_folder(name)
                except imap_errors.IMAPClientError as exc:
                    if b"ALREADYEXISTS" not in str(exc).encode() and "exists" not in str(exc).lower():
                        raise
                try:
                    self.client.subscribe_folder(name)
                except imap_errors.IMAPClientError:
                    pass  # subscribing is a courtesy to mail clients
            self.folders[name] = Folder(name=name, delimiter=self.layout.delimiter)
        with command_errors():
            response = self.client.select_folder(name, readonly=not create)
        permanent = response.get(b"PERMANENTFLAGS")
        self._permanent[name] = (
            frozenset(f.decode("ascii", "replace") if isinstance(f, bytes) else str(f) for f in permanent)
            if permanent is not None
            else None
        )
        validity = response.get(b"UIDVALIDITY")
        where: dict[tuple[str | None, int], list[int]] = {}
        sizes: dict[int, list[int]] = {}
        uids: frozenset[int] = frozenset()
        if int(response.get(b"EXISTS", 0)):
            if contents:
                fetched = self._uid_fetch("1:*", ["RFC822.SIZE", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
                for uid, data in fetched.items():
                    size = int(data.get(b"RFC822.SIZE", 0))  # type: ignore[call-overload]  # FETCH items are untyped: RFC822.SIZE is an int
                    header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER")), b"")
                    where.setdefault((message_id(header) if isinstance(header, bytes) else None, size), []).append(uid)
                    sizes.setdefault(size, []).append(uid)
                uids = frozenset(fetched)
            else:
                with command_errors():
                    uids = frozenset(int(uid) for uid in self.client.search("ALL"))
        self._sizes[name] = sizes
        self._hashes[name] = {}
        self._hashed[name] = set()
        self._leave()
        return Destination(
            name=name,
            uid_validity=int(validity) if validity is not None else None,
            uids=uids,
            where={key: tuple(found) for key, found in where.items()},
            contents=contents,
            created=existing is None,
        )

    def _create_with_role(self, name: str) -> bool:
        """CREATE name (USE (role)) when the server takes it; False to create it plainly."""
        role = self._roles.get(name)
        if not (role and self.create_special_use):
            return False
        imap = self.client._imap
        status, _ = imap._simple_command("CREATE", self.client._normalise_folder(name), f"(USE ({role}))")
        return status == "OK"

    def _leave(self) -> None:
        """Deselect without expunging, so APPENDs draw no EXISTS noise."""
        if self.unselect:
            with command_errors():
                self.client.unselect_folder()

    def settle(self, name: str, quiet: float, limit: float) -> None:
        # A server runs the commands it has received even when the client is gone: watch
        # the folder's STATUS until it stops changing.
        if self._existing(name) is None:
            return
        start = seen_at = time.monotonic()
        seen: object = None
        while True:
            with command_errors():
                status = self.client.folder_status(name, ["MESSAGES", "UIDNEXT", "UIDVALIDITY"])
            now = time.monotonic()
            if status != seen:
                seen, seen_at = status, now
            elif now - seen_at >= quiet:
                return
            if now - start >= limit:
                log.warning("%s still changes after %.0f s; going on", name, limit)
                return
            time.sleep(min(0.1, quiet / 4))

    def copies(self, destination: Destination, size: int, sha256: str) -> list[int]:
        """The UIDs of the messages in the destination with exactly these bytes (fetched once, by size)."""
        name = destination.name
        todo = [u for u in self._sizes.get(name, {}).get(size, []) if u not in self._hashed[name]]
        if todo:
            with command_errors():
                self.client.select_folder(name, readonly=True)
            for start in range(0, len(todo), 50):
                part = todo[start : start + 50]
                fetched = self._uid_fetch(",".join(map(str, part)), ["BODY.PEEK[]"], literal_room(size))
                for uid, data in fetched.items():
                    raw = data.get(b"BODY[]")
                    if isinstance(raw, bytes):
                        self._hashes[name].setdefault(hashlib.sha256(raw).hexdigest(), []).append(uid)
                self._hashed[name].update(part)
            self._leave()
        return list(self._hashes[name].get(sha256, ()))

    # messages

    def send(self, destination: Destination, batch: Sequence[Outgoing]) -> None:
        name = destination.name
        permanent = self._permanent.get(name)
        if self.multiappend and self.literal_plus and len(batch) > 0:
            tag = _send_multiappend(self.client, name, batch, permanent)
            self._in_flight.append(_Sent(tag, batch, name))
            return
        if self.multiappend and len(batch) > 1:
            done = self._append_synchronously(name, batch, permanent, multi=True)
        else:
            done = self._append_synchronously(name, batch, permanent, multi=False)
        self._in_flight.append(_Sent(None, batch, name, done))

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self.window

    def collect(self) -> list[Delivered]:
        sent = self._in_flight.popleft()
        if sent.done is not None:
            return sent.done
        assert sent.tag is not None
        return _complete(self.client, sent.tag, sent.destination, sent.batch, self._permanent.get(sent.destination))

    def _append_synchronously(
        self, name: str, batch: Sequence[Outgoing], permanent: frozenset[str] | None, *, multi: bool
    ) -> list[Delivered]:
        if multi:
            items = []
            for m in batch:
                item: dict[str, object] = {"msg": m.raw, "flags": acceptable_flags(m.flags, permanent)}
                if m.internal_date is not None:
                    item["date"] = m.internal_date
                items.append(item)
            with command_errors():
                try:
                    text = self.client.multiappend(name, items)
                except imap_errors.IMAPClientError:
                    return self._append_synchronously(name, batch, permanent, multi=False)
            return _outcome(batch, _bytes(text))
        return _append_each(self.client, name, batch, permanent)

    def store_flags(self, name: str, changes: dict[tuple[str, ...], list[int]]) -> None:
        """Replace the flags of target UIDs, grouped by their new flag set."""
        if not changes:
            return
        with command_errors():
            response = self.client.select_folder(name)
            permanent = response.get(b"PERMANENTFLAGS")
            allowed = frozenset(f.decode() if isinstance(f, bytes) else str(f) for f in permanent) if permanent is not None else None
            for flags, uids in changes.items():
                for start in range(0, len(uids), 500):
                    self.client.set_flags(uids[start : start + 500], list(acceptable_flags(flags, allowed)), silent=True)
            self._leave()

    def _uid_fetch(self, uid_set_text: str, items: list[str], literal_limit: int = SMALL_LITERAL) -> dict[int, dict[bytes, object]]:
        return self.session.uid_fetch(uid_set_text, items, literal_limit=literal_limit)


def _outcome(batch: Sequence[Outgoing], text: bytes) -> list[Delivered]:
    validity, uids = parse_appenduid(text)
    if len(uids) != len(batch):
        uids = []
    return [Delivered(m.item, ok=True, uid=uids[i] if uids else None, uid_validity=validity) for i, m in enumerate(batch)]


def _send_multiappend(client: IMAPClient, name: str, batch: Sequence[Outgoing], permanent: frozenset[str] | None) -> bytes:
    """Send one APPEND of the whole batch with non-synchronising literals; its tag, to complete later."""
    imap = client._imap
    tag = imap._new_tag()
    imap.tagged_commands[tag] = None
    head = tag + b" APPEND " + quote_mailbox(name)
    with command_errors():
        for message in batch:
            imap.send(head + _flags_and_date(message, permanent) + b" {%d+}\r\n" % len(message.raw))
            imap.send(message.raw)  # not joined to its head: that would copy every message once more
            head = b""
        imap.send(b"\r\n")
    return tag


def _complete(
    client: IMAPClient, tag: bytes, name: str, batch: Sequence[Outgoing], permanent: frozenset[str] | None
) -> list[Delivered]:
    """Wait for a sent MULTIAPPEND's answer; after a NO, send the batch again a message at a time."""
    imap = client._imap
    with command_errors():
        try:
            status, data = imap._command_complete("APPEND", tag)
        except imap.abort:
            raise
        except imap.error as exc:  # BAD
            status, data = "BAD", [str(exc).encode()]
        finally:
            imap.untagged_responses.clear()
    text = data[-1] if data and isinstance(data[-1], bytes) else b""
    if status == "OK":
        return _outcome(batch, text)
    if len(batch) == 1:
        return [Delivered(batch[0].item, ok=False, detail=_reason(text))]
    # MULTIAPPEND is all or nothing: one refused message fails the batch, so find it.
    return _append_each(client, name, batch, permanent)


def _append_each(client: IMAPClient, name: str, batch: Sequence[Outgoing], permanent: frozenset[str] | None) -> list[Delivered]:
    """One APPEND per message, each waiting for the server: a refusal fails only its own message."""
    out = []
    for m in batch:
        with command_errors():
            try:
                text = client.append(name, m.raw, acceptable_flags(m.flags, permanent), m.internal_date)
            except imap_errors.IMAPClientError as exc:
                out.append(Delivered(m.item, ok=False, detail=_reason(str(exc).encode())))
                continue
        out.extend(_outcome([m], _bytes(text)))
    return out


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # the connection may be gone already; nothing to save
        try:
            client.shutdown()
        except Exception:
            pass


def _flags_and_date(message: Outgoing, permanent: frozenset[str] | None) -> bytes:
    flags = acceptable_flags(message.flags, permanent)
    out = b" (" + " ".join(flags).encode("ascii") + b")"
    if message.internal_date is not None:
        out += b" " + internal_date(message.internal_date)
    return out


def _bytes(text: object) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode()


def _reason(text: bytes | str) -> str:
    value = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return value.strip() or "refused"


@contextmanager
def command_errors() -> Iterator[None]:
    """Map imapclient and socket failures to our errors; a dropped link is ConnectionLost."""
    with session_errors("target"):
        yield
