"""What the web viewer shows, read from an archive opened read-only: no web framework in here."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from typing import Any

from .. import keys
from ..catalog import Headline
from ..errors import ArchiveCorrupt, UsageError
from ..mime import header_text
from ..model import Entry
from ..stores import Store, open_store, read_chunks
from ..stores.codec import content_name, encrypted
from . import parts

HEAD_CAP = 64 * 1024  # bytes of a message read for its headers when the search index has none
SORTS = ("date", "from", "subject", "size")
SHOWN_HEADERS = ("From", "To", "Cc", "Reply-To", "Date", "Subject", "Message-ID")


@dataclass(frozen=True)
class FolderCount:
    id: int | None  # None: a parent in the tree that the archive holds no folder for
    name: str
    depth: int  # how far below the top the folder sits in the tree
    label: str  # its own name, without its parents
    messages: int
    bytes: int
    gone: int


@dataclass(frozen=True)
class AccountTree:
    index: int
    name: str  # user@host, '' if the archive never recorded it
    folders: tuple[FolderCount, ...]


@dataclass(frozen=True)
class Row:
    entry: Entry
    date: str
    sender: str
    subject: str


@dataclass(frozen=True)
class Attachment:
    index: int  # the part's place in a walk over the message
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class MessageView:
    entry: Entry
    folder: str
    headers: tuple[tuple[str, str], ...]
    subject: str
    text: str | None
    html: str | None  # unsanitised: render.sanitise() makes it safe to show
    attachments: tuple[Attachment, ...]
    inline_images: dict[str, tuple[str, bytes]]  # Content-ID -> (type, bytes) for cid: references


@dataclass(frozen=True)
class Month:
    month: str  # YYYY-MM
    folder: str  # "account: folder" when the archive holds several accounts
    messages: int


def _decode(payload: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if candidate:
            try:
                return payload.decode(candidate)
            except (LookupError, UnicodeDecodeError):
                continue
    return payload.decode("latin-1")


def _headline(raw_head: bytes) -> Headline:
    parsed = BytesHeaderParser(policy=policy.compat32).parsebytes(raw_head)
    return Headline(header_text(parsed.get("Date")), header_text(parsed.get("From")), header_text(parsed.get("Subject")))


class Archive:
    """An archive opened read-only for the viewer: one store per account it holds."""

    def __init__(self, url: str, key_ring: keys.KeyRing | None = None) -> None:
        self.url = url
        # Unlocked here, in the caller's thread; requests run in worker threads and reopen
        # the archive (search) with this ring, never by prompting.
        self.key_ring = key_ring or keys.ring()
        first = open_store(url, mode="read", key_ring=self.key_ring)
        self.stores: list[Store] = []
        try:
            names = first.catalog.accounts()
            if len(names) <= 1:
                self.names = names or [""]
                self.stores = [first]
            else:
                first.close()
                self.names = names
                for name in names:
                    self.stores.append(open_store(url, mode="read", account=name, key_ring=self.key_ring))
        except BaseException:
            first.close()
            for store in self.stores:
                store.close()
            raise

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def store(self, account: int) -> Store:
        if not 0 <= account < len(self.stores):
            raise UsageError(f"no account {account} in {self.url}")
        return self.stores[account]

    def mailbox(self, account: int) -> str | None:
        """What search() takes as mailbox: None where the archive holds one account."""
        return self.names[account] if len(self.stores) > 1 else None

    # the folder tree

    def tree(self) -> list[AccountTree]:
        trees = []
        for index, store in enumerate(self.stores):
            counts: list[FolderCount] = []
            shown: set[tuple[str, ...]] = set()
            for folder, messages, size, gone in store.catalog.stats():
                parts = folder.name.split(folder.delimiter) if folder.delimiter else [folder.name]
                for depth in range(len(parts) - 1):  # a parent the archive holds no folder for still shows
                    if tuple(parts[: depth + 1]) not in shown:
                        shown.add(tuple(parts[: depth + 1]))
                        counts.append(FolderCount(None, (folder.delimiter or "").join(parts[: depth + 1]), depth, parts[depth], 0, 0, 0))
                shown.add(tuple(parts))
                counts.append(FolderCount(folder.id, folder.name, len(parts) - 1, parts[-1], messages, size, gone))
            trees.append(AccountTree(index, self.names[index], tuple(counts)))
        return trees

    def folder_name(self, account: int, folder_id: int) -> str:
        for folder in self.store(account).catalog.folders():
            if folder.id == folder_id:
                return folder.name
        raise UsageError(f"no folder {folder_id}")

    # a page of a folder

    def sorts(self, account: int) -> tuple[str, ...]:
        """What a folder can be sorted by: From and Subject come from the search index."""
        catalog = self.store(account).catalog
        indexed = catalog.engine.dialect.name == "sqlite" and catalog.has_search_index()
        return SORTS if indexed else ("date", "size")

    def page(self, account: int, folder_id: int, *, sort: str, descending: bool, page: int, per_page: int) -> tuple[list[Row], int]:
        """The rows of one page and the folder's size; only that page is read."""
        store = self.store(account)
        self.folder_name(account, folder_id)
        total = store.catalog.count(folder_id)
        found = store.catalog.page(folder_id, sort=sort, descending=descending, limit=per_page, offset=page * per_page)
        rows = []
        for entry, headline in found:
            if headline is None:  # not indexed (or a PostgreSQL archive): read the message's head
                try:
                    headline = _headline(store.get(entry.location)[:HEAD_CAP])
                except Exception:  # a damaged message still gets its row
                    headline = Headline(None, "", "")
            date = headline.sent_at or (entry.internal_date.isoformat() if entry.internal_date else "")
            rows.append(Row(entry, date[:16].replace("T", " "), headline.sender, headline.subject))
        return rows, total

    # one message

    def entry(self, account: int, entry_id: int) -> Entry:
        entry = self.store(account).catalog.entry(entry_id)
        if entry is None:
            raise UsageError(f"no message {entry_id}")
        return entry

    def raw(self, account: int, entry_id: int) -> tuple[Entry, bytes]:
        """The original bytes, checked against the catalog's SHA-256."""
        entry = self.entry(account, entry_id)
        store = self.store(account)
        raw = store.get(entry.location)
        if content_name(store, raw) != entry.sha256:
            raise ArchiveCorrupt(f"message {entry.id} does not match its SHA-256; run 'mailbackup verify'")
        return entry, raw

    def buffer(self, account: int, entry_id: int) -> bytearray:
        """The original bytes, checked, read into one buffer of their size (a Maildir's LF file and
        its CRLF copy, or a list of pieces and their join, would hold them twice)."""
        entry = self.entry(account, entry_id)
        store = self.store(account)
        buffer = bytearray(entry.size)
        digest, filled = _digest(store), 0
        for piece in read_chunks(store, entry.location):
            if filled + len(piece) > entry.size:
                break
            buffer[filled : filled + len(piece)] = piece
            digest.update(piece)
            filled += len(piece)
        else:
            if filled == entry.size and digest.hexdigest() == entry.sha256:
                return buffer
        raise ArchiveCorrupt(f"message {entry.id} does not match its SHA-256; run 'mailbackup verify'")

    def chunks(self, account: int, entry_id: int) -> tuple[Entry, Iterator[bytes]]:
        """The original bytes streamed from the store, for a download, checked against the SHA-256 on the way.

        The last piece is held back until the whole has been hashed: bytes that do not match end
        the download short of its Content-Length, so a browser never saves a damaged copy as whole.
        """
        entry = self.entry(account, entry_id)
        store = self.store(account)
        pieces = read_chunks(store, entry.location)
        first = next(pieces, b"")  # a missing file fails here, before any header is sent
        return entry, _checked(entry, first, pieces, _digest(store))

    def message(self, account: int, entry_id: int) -> MessageView:
        entry, raw = self.raw(account, entry_id)
        parsed = BytesParser(policy=policy.compat32).parsebytes(raw)
        headers = tuple(
            (name, header_text(value)) for name in SHOWN_HEADERS for value in parsed.get_all(name, [])
        )
        text = html = None
        attachments: list[Attachment] = []
        images: dict[str, tuple[str, bytes]] = {}
        leaves = [(index, part) for index, part in enumerate(parsed.walk()) if not part.is_multipart()]
        for (index, part), (role, filename) in zip(leaves, _roles([part for _, part in leaves])):
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                payload = b""
            content_id = _content_id(part)
            if content_id and part.get_content_maintype() == "image":
                images[content_id] = (part.get_content_type(), payload)
            if role == "text":
                text = _decode(payload, part.get_content_charset())
            elif role == "html":
                html = _decode(payload, part.get_content_charset())
            elif role == "attachment":
                attachments.append(Attachment(index, filename or f"part-{index}", part.get_content_type(), len(payload)))
        if text is None and html is None and not parsed.is_multipart() and parsed.get_content_maintype() == "text":
            text = ""  # an empty text body
        subject = header_text(parsed.get("Subject"))
        folder = self.folder_name(account, entry.folder_id)
        return MessageView(entry, folder, headers, subject, text, html, tuple(attachments), images)

    def attachment(self, account: int, entry_id: int, index: int) -> tuple[Attachment, Iterator[bytes]]:
        """One attachment's decoded bytes, a piece at a time: memory holds the message once, not its parse."""
        raw = self.buffer(account, entry_id)
        try:
            spans = parts.walk(raw)
            leaves = [span for span in spans if not span.container]
            for span, (role, filename) in zip(leaves, _roles([span.headers for span in leaves])):
                if span.index == index and role == "attachment":
                    size = span.body_end - span.body_start  # as stored (encoded): the decoded size is not known yet
                    found = Attachment(index, filename or f"part-{index}", span.headers.get_content_type(), size)
                    return found, parts.decoded(raw, span)
        except parts.Unsure:
            return self._attachment_parsed(account, entry_id, index, bytes(raw))
        raise UsageError(f"message {entry_id} has no attachment {index}")

    def _attachment_parsed(self, account: int, entry_id: int, index: int, raw: bytes) -> tuple[Attachment, Iterator[bytes]]:
        """The email package's reading, for a message parts.walk is not sure of (held whole: rare and odd mail)."""
        for attachment in self.message(account, entry_id).attachments:
            if attachment.index == index:
                part = list(BytesParser(policy=policy.compat32).parsebytes(raw).walk())[index]
                payload = part.get_payload(decode=True)
                return attachment, iter([payload if isinstance(payload, bytes) else b""])
        raise UsageError(f"message {entry_id} has no attachment {index}")

    # the archive over time

    def months(self) -> list[Month]:
        out = []
        for index, store in enumerate(self.stores):
            names = {f.id: f.name for f in store.catalog.folders()}
            prefix = f"{self.names[index] or '(unnamed)'}: " if len(self.stores) > 1 else ""
            for month, folder_id, messages in store.catalog.months():
                out.append(Month(month, prefix + names.get(folder_id, "?"), messages))
        return out


def _digest(store: Store) -> Any:
    """What the catalog's sha256 is computed with: SHA-256, or in an encrypted archive its keyed MAC."""
    codec = getattr(store, "codec", None)
    if encrypted(store) and codec is not None and codec.keys is not None and codec.keys.naming_key is not None:
        return hmac.new(codec.keys.naming_key, digestmod=hashlib.sha256)  # as crypto.mac_name
    return hashlib.sha256()


def _checked(entry: Entry, first: bytes, rest: Iterator[bytes], digest: Any) -> Iterator[bytes]:
    digest.update(first)
    size = len(first)
    held = first
    for piece in rest:
        yield held
        digest.update(piece)
        size += len(piece)
        held = piece
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise ArchiveCorrupt(f"message {entry.id} does not match its SHA-256; run 'mailbackup verify'")
    yield held


def _content_id(part: EmailMessage) -> str:
    return (part.get("Content-ID") or "").strip().strip("<>")


def _roles(leaves: list[EmailMessage]) -> list[tuple[str | None, str | None]]:
    """(role, filename) of each leaf part, from its headers alone: the first inline text/plain is
    "text", the first inline text/html "html", an image its HTML references "inline", others
    "attachment" (or None: a text part that is neither first nor an attachment)."""
    roles: list[tuple[str | None, str | None]] = []
    text = html = False
    for part in leaves:
        kind = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = _filename(part)
        inline = disposition != "attachment" and not filename
        role: str | None = None
        if _content_id(part) and part.get_content_maintype() == "image" and inline:
            role = "inline"  # shown in the HTML where it is referenced
        elif inline and kind == "text/plain" and not text:
            role, text = "text", True
        elif inline and kind == "text/html" and not html:
            role, html = "html", True
        elif not inline or part.get_content_maintype() not in ("text", "multipart"):
            role = "attachment"
        roles.append((role, filename))
    return roles


def _filename(part: EmailMessage) -> str | None:
    try:
        name = part.get_filename()
    except Exception:  # a malformed RFC 2231 parameter
        return None
    return header_text(name).replace("/", "_").replace("\\", "_").strip() or None if name else None
