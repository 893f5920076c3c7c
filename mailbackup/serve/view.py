"""The archive as an IMAP client sees it: folders, and each folder's messages with UIDs and a UIDVALIDITY."""

from __future__ import annotations

import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import ArchiveCorrupt, MailbackupError
from ..model import ArchivedFolder, Entry
from ..stores import Store
from ..stores.codec import content_name

GONE = "Gone"  # virtual folders "Gone/<folder>" hold gone messages when asked for
HIERARCHY = frozenset({"\\haschildren", "\\hasnochildren", "\\noinferiors", "\\marked", "\\unmarked"})


@dataclass(frozen=True)
class Mailbox:
    """A folder as served: its name, attributes and where its messages come from."""

    name: str
    attributes: tuple[str, ...]
    folder: ArchivedFolder | None  # None: a parent that holds no messages (\\Noselect)
    gone: bool = False  # the Gone/ twin of folder


@dataclass(frozen=True)
class Snapshot:
    """A mailbox's messages at SELECT time, in UID order (sequence number = index + 1)."""

    uid_validity: int
    uids: list[int]
    entries: list[Entry]

    @property
    def uid_next(self) -> int:
        return (self.uids[-1] + 1) if self.uids else 1

    def by_uid_ranges(self, ranges: list[tuple[int, int]]) -> Iterator[int]:
        """Indexes of the messages whose UID falls in ranges, ascending, each once."""
        seen = -1
        for low, high in ranges:
            for index in range(max(bisect_left(self.uids, low), seen + 1), bisect_right(self.uids, high)):
                seen = index
                yield index

    def by_seq_ranges(self, ranges: list[tuple[int, int]]) -> Iterator[int]:
        seen = -1
        for low, high in ranges:
            for index in range(max(low - 1, seen + 1, 0), min(high, len(self.uids))):
                seen = index
                yield index


def derived_uid_validity(folder: ArchivedFolder, gone: bool) -> int:
    """A stable UIDVALIDITY for UIDs that are catalog entry ids: never the archive's own by chance."""
    value = zlib.crc32(f"mailbackup-entry-ids:{gone}:{folder.id}:{folder.name}".encode()) or 1
    return value if value != folder.uid_validity else (value + 1) & 0xFFFFFFFF or 1


def snapshot(store: Store, folder: ArchivedFolder, gone: bool) -> Snapshot:
    """Archived UIDs where every message has one under the folder's UIDVALIDITY; else entry ids."""
    entries = [e for e in store.catalog.entries(folder.id) if e.gone == gone]
    uids = [e.uid for e in entries if e.uid is not None and e.uid_validity == folder.uid_validity]
    if not gone and folder.uid_validity and len(uids) == len(entries) and len(set(uids)) == len(uids):
        entries.sort(key=lambda e: e.uid or 0)
        return Snapshot(folder.uid_validity, [e.uid or 0 for e in entries], entries)
    entries.sort(key=lambda e: e.id)  # entry ids grow as messages are archived: stable, ascending UIDs
    return Snapshot(derived_uid_validity(folder, gone), [e.id for e in entries], entries)


def mailboxes(store: Store, delimiter: str, include_gone: bool) -> list[Mailbox]:
    """Every folder, missing parents as \\Noselect, the Gone/ twins if asked for, with \\Has(No)Children."""
    found: dict[str, Mailbox] = {}
    gone_counts = {f.id: g for f, _, _, g in store.catalog.stats()} if include_gone else {}
    for folder in store.catalog.folders():
        name = served_name(folder, delimiter)
        attributes = tuple(a for a in sorted(folder.attributes) if a.lower() not in HIERARCHY)
        found[name] = Mailbox(name, attributes, folder)
        if gone_counts.get(folder.id):
            twin = GONE + delimiter + name
            found[twin] = Mailbox(twin, (), folder, gone=True)
    for name in list(found):
        parts = name.split(delimiter)
        for cut in range(1, len(parts)):
            parent = delimiter.join(parts[:cut])
            if parent not in found:
                found[parent] = Mailbox(parent, ("\\Noselect",), None)
    names = sorted(found, key=lambda n: (n != "INBOX", n))
    served = []
    for name in names:
        box = found[name]
        children = any(other.startswith(name + delimiter) for other in found)
        served.append(Mailbox(name, (*box.attributes, "\\HasChildren" if children else "\\HasNoChildren"), box.folder, box.gone))
    return served


def served_name(folder: ArchivedFolder, delimiter: str) -> str:
    """The folder's name with the archive's one delimiter (folders from a '.' server keep their tree)."""
    if folder.name.upper() == "INBOX":
        return "INBOX"
    if folder.delimiter and folder.delimiter != delimiter:
        return delimiter.join(folder.name.split(folder.delimiter))
    return folder.name


def archive_delimiter(store: Store) -> str:
    delimiters = [f.delimiter for f in store.catalog.folders() if f.delimiter]
    return max(set(delimiters), key=delimiters.count) if delimiters else "/"


def message_bytes(store: Store, entry: Entry, raw: bytes | None = None) -> bytes:
    """The archived bytes, refused if they no longer match their SHA-256 (never serve damage as mail).

    An encrypted archive records a keyed MAC instead (content_name), and AES-GCM has checked the object too.
    """
    raw = store.get(entry.location) if raw is None else raw
    if content_name(store, raw) != entry.sha256:
        raise ArchiveCorrupt(f"message {entry.id} does not match its SHA-256; run 'mailbackup verify'")
    return raw


BATCH_MESSAGES = 64  # a SQL store reads this many messages per query (one query each costs ~0.3 ms)
BATCH_BYTES = 4 << 20  # or fewer, so that a batch of big messages does not grow the server's memory


def read_messages(store: Store, indexed: Iterable[tuple[int, Entry]]) -> Iterator[tuple[int, Entry, bytes | MailbackupError]]:
    """Each entry's checked bytes, or the error that one message met, in the order given.

    A store with get_many (SQL) reads a batch of messages in one query; others read one at a time.
    """
    get_many = getattr(store, "get_many", None)
    if get_many is None:
        for index, entry in indexed:
            yield index, entry, _checked(store, entry, None)
        return
    batch: list[tuple[int, Entry]] = []
    size = 0
    for index, entry in indexed:
        batch.append((index, entry))
        size += entry.size
        if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
            yield from _read_batch(store, get_many, batch)
            batch, size = [], 0
    yield from _read_batch(store, get_many, batch)


def _read_batch(store: Store, get_many: Callable[[list[str]], dict[str, bytes]], batch: list[tuple[int, Entry]]) -> Iterator[tuple[int, Entry, bytes | MailbackupError]]:
    if not batch:
        return
    try:
        found: dict[str, bytes] | None = get_many([entry.location for _, entry in batch])
    except MailbackupError:
        found = None  # one message is missing or damaged: read one at a time, and say which
    for index, entry in batch:
        yield index, entry, _checked(store, entry, None if found is None else found[entry.location])


def _checked(store: Store, entry: Entry, raw: bytes | None) -> bytes | MailbackupError:
    try:
        return message_bytes(store, entry, raw)
    except MailbackupError as exc:
        return exc
