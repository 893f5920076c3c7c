"""Full-text search: an SQLite FTS5 index beside the catalog, keyed by content SHA-256.

A message that sits in three folders is indexed once; hits are joined with the
catalog's `messages` table for folder, date and id. The index holds headers and
the decoded text of text/plain and text/html parts (HTML reduced to text), at most
BODY_CAP characters per message. It is an aid, not part of the backup: backup
indexes each committed batch and a failure only logs a warning (`reindex` catches up).

PostgreSQL archives have no FTS5; search there raises a clear error instead of
pretending, and backup skips indexing.
"""

from __future__ import annotations

import binascii
import email.header
import email.utils
import logging
import pickle
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy
from email.message import Message as EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any, BinaryIO

import sqlalchemy as sa

from .catalog import folders, messages
from .errors import StoreError, UsageError
from .model import Message
from .stores import Store, open_store

log = logging.getLogger("mailbackup")

BODY_CAP = 64 * 1024  # characters of body text indexed per message
PART_CAP = 1 << 20  # bytes of one decoded text part read at most
# Only the head of a big message is parsed: text parts come before attachments in
# practice, and parsing a 20 MB attachment to skip it would cost more than the backup.
PARSE_CAP = 128 * 1024
_PARSER = BytesParser(policy=policy.compat32)  # compat32: no header objects, several times faster

SCHEMA = (
    # One row per distinct message content; its id is the FTS5 rowid.
    """CREATE TABLE IF NOT EXISTS search_docs (
        id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        sent_at TEXT,
        sender TEXT NOT NULL,
        subject TEXT NOT NULL
    )""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS search_text USING fts5(
        sender, recipients, subject, body, tokenize = 'unicode61 remove_diacritics 2'
    )""",
)


@dataclass(frozen=True)
class Document:
    """What the index keeps of one message."""

    sha256: str
    sent_at: str | None  # UTC ISO 8601, from Date: or else INTERNALDATE
    sender: str
    recipients: str
    subject: str
    body: str


@dataclass(frozen=True)
class Hit:
    id: int
    sha256: str
    folder: str
    date: str | None
    sender: str
    subject: str
    uid: int | None
    gone: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "folder": self.folder,
            "date": self.date,
            "from": self.sender,
            "subject": self.subject,
            "uid": self.uid,
            "gone": self.gone,
        }


@dataclass(frozen=True)
class Filters:
    query: str = ""
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    since: datetime | None = None
    before: datetime | None = None
    folder: str | None = None
    limit: int | None = None


# extracting text


class _HtmlText(HTMLParser):
    """HTML reduced to its text: tags dropped, entities decoded, script and style skipped."""

    SKIP = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in ("br", "p", "div", "tr", "li"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser is lenient, but a pathological document must not stop indexing
        pass
    return re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))


def header_text(value: object) -> str:
    """A header decoded from RFC 2047; raw 8-bit bytes read as UTF-8, else Latin-1."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):  # compat32 wraps a header holding raw 8-bit bytes
        text = "".join(_unescape(str(chunk)) for chunk, _ in value._chunks)
    else:
        text = _unescape(str(value))
    try:
        decoded = email.header.decode_header(text)
    except Exception:
        return text
    out = []
    for piece, charset in decoded:
        if isinstance(piece, str):
            out.append(piece)
        elif charset is None:  # the unencoded stretches of a header with encoded words
            out.append(piece.decode("raw-unicode-escape"))
        else:
            out.append(_decode(piece, charset))
    return "".join(out)


def _unescape(text: str) -> str:
    """The parser keeps undecodable bytes as surrogates; SQLite cannot store those."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return _decode(text.encode("utf-8", "surrogateescape"), None)


def _decode(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")  # every byte maps, so nothing is lost to the tokenizer


def text_parts(part: EmailMessage, depth: int = 0) -> Iterator[EmailMessage]:
    """The leaf parts worth indexing; of a multipart/alternative only its text/plain if it has one."""
    if not part.is_multipart():
        yield part
        return
    if depth > 20:  # hostile nesting: the text of sane mail is far shallower
        return
    children = part.get_payload()
    if not isinstance(children, list):
        return
    if part.get_content_type() == "multipart/alternative":
        plain = [c for c in children if c.get_content_type() == "text/plain"]
        children = plain[:1] or children  # the HTML twin says the same at several times the cost
    for child in children:
        yield from text_parts(child, depth + 1)


def body_text(parsed: EmailMessage) -> str:
    """Decoded text of the text parts, HTML reduced to text, capped at BODY_CAP characters."""
    pieces: list[str] = []
    length = 0
    for part in text_parts(parsed):
        if part.get_content_maintype() != "text" or part.get_content_disposition() == "attachment":
            continue
        try:
            payload = part.get_payload(decode=True)
            charset = part.get_content_charset()
        except Exception:  # a malformed part loses its text, not the whole message's
            continue
        if not isinstance(payload, bytes):
            continue
        text = _decode(payload[:PART_CAP], charset)
        if part.get_content_subtype() == "html":
            text = html_text(text)
        pieces.append(text[: BODY_CAP - length])
        length += len(pieces[-1])
        if length >= BODY_CAP:
            break
    return "\n".join(pieces)


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEADER = re.compile(rb"^([^\s:]+)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)
# Every line a "Name: value" header or a folded continuation of one.
_WELL_FORMED_HEAD = re.compile(rb"[^\s:]+[ \t]*:.*(?:\r?\n(?:[^\s:]+[ \t]*:|[ \t]).*)*")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class FastPart:
    """Just enough of email.message.Message for text_parts() and body_text(), read with
    regexes instead of the email package's line-by-line feed parser (several times
    faster). It raises ValueError on anything unusual; parse() then uses the email package."""

    def __init__(self, data: bytes) -> None:
        if data.startswith((b"\r\n", b"\n")):
            head, self.body = b"", data[2 if data.startswith(b"\r\n") else 1 :]
        else:
            end = _HEAD_END.search(data)
            head, self.body = (data[: end.start()], data[end.end() :]) if end else (data, b"")
        if head and not _WELL_FORMED_HEAD.fullmatch(head):
            raise ValueError("header block the email package reads differently")
        self.headers: list[tuple[str, str]] = [
            (name.decode("ascii", "surrogateescape").lower(), value.decode("ascii", "surrogateescape").rstrip("\r"))
            for name, value in _HEADER.findall(head)
        ]
        kind, _, params = (self.get("content-type") or "").partition(";")
        kind = kind.strip().lower()
        self.content_type = kind if kind.count("/") == 1 else "text/plain"
        if self.content_type.startswith("message/") or self.content_type == "multipart/digest":
            raise ValueError("nested message")
        self.params = {}
        for key, value in _PARAM.findall(";" + params):
            if key.endswith("*"):  # RFC 2231 continuations: leave those to the email package
                raise ValueError("RFC 2231 parameter")
            self.params[key.lower()] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value.strip()

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    def get_all(self, name: str, default: list[str] | None = None) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name] or (default if default is not None else [])

    def get_content_type(self) -> str:
        return self.content_type

    def get_content_maintype(self) -> str:
        return self.content_type.split("/")[0]

    def get_content_subtype(self) -> str:
        return self.content_type.split("/")[1]

    def get_content_charset(self) -> str | None:
        charset = self.params.get("charset")
        return charset.lower() if charset else None

    def get_content_disposition(self) -> str | None:
        value = self.get("content-disposition")
        return value.split(";")[0].strip().lower() or None if value else None

    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/") and "boundary" in self.params

    def get_payload(self, decode: bool = False) -> list[FastPart] | bytes:
        if self.is_multipart():
            return [FastPart(piece) for piece in split_multipart(self.body, self.params["boundary"].encode("latin-1"))]
        encoding = (self.get("content-transfer-encoding") or "").strip().lower()
        if encoding == "base64":
            return binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/]", b"", self.body) + b"==")
        if encoding == "quoted-printable":
            return binascii.a2b_qp(self.body)
        if encoding in ("", "7bit", "8bit", "binary"):
            return self.body
        raise ValueError(f"transfer encoding {encoding}")  # odd or misspelt: the email package


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts between '--boundary' lines, up to the closing '--boundary--'."""
    marker = b"--" + boundary
    parts: list[bytes] = []
    start: int | None = None
    found = body.find(marker)
    while found >= 0:
        line_end = body.find(b"\n", found)
        line_end = len(body) if line_end < 0 else line_end
        rest = body[found + len(marker) : line_end]
        closing = rest.startswith(b"--")
        # A delimiter starts a line and holds nothing but optional "--" and blanks.
        if (found == 0 or body[found - 1] == 0x0A) and not (rest[2:] if closing else rest).strip(b" \t\r"):
            if start is not None:
                end = found - 1 if found > 0 else 0
                parts.append(body[start : end - 1 if end > 0 and body[end - 1] == 0x0D else end])
            if closing:
                break
            start = line_end + 1
        found = body.find(marker, found + 1)
    return parts


def _check(part: FastPart, depth: int = 0) -> None:
    """Walk and decode every text part, raising where the fast reading is not sure."""
    if depth > 20:
        raise ValueError("deep nesting")
    if part.content_type.startswith("multipart/"):
        children = part.get_payload()
        if not part.is_multipart() or not children:
            raise ValueError("multipart without parts")
        for child in children:
            _check(child, depth + 1)  # type: ignore[arg-type]
    elif part.get_content_maintype() == "text":
        part.get_payload(decode=True)


def parse(raw: bytes) -> FastPart | EmailMessage:
    try:
        part = FastPart(raw)
        _check(part)
        return part
    except (ValueError, binascii.Error, UnicodeError):
        return _PARSER.parsebytes(raw)


def document(raw: bytes, sha256: str, internal_date: datetime | None) -> Document:
    parsed = parse(raw[:PARSE_CAP])
    sent_at = None
    try:
        when = email.utils.parsedate_to_datetime(header_text(parsed.get("Date")))
        if when is not None and when.tzinfo is not None:
            sent_at = when.astimezone(timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, IndexError, OverflowError):
        pass
    if sent_at is None and internal_date is not None and internal_date.tzinfo is not None:
        sent_at = internal_date.astimezone(timezone.utc).isoformat(timespec="seconds")
    recipients = " ".join(header_text(v) for name in ("To", "Cc", "Bcc") for v in parsed.get_all(name, []))
    return Document(
        sha256=sha256,
        sent_at=sent_at,
        sender=header_text(parsed.get("From")),
        recipients=recipients,
        subject=header_text(parsed.get("Subject")),
        body=body_text(parsed),
    )


# writing the index


def supported(store: Store) -> bool:
    return store.catalog.engine.dialect.name == "sqlite"


def _ensure_schema(conn: sa.Connection) -> None:
    for statement in SCHEMA:
        conn.exec_driver_sql(statement)


def index_messages(store: Store, batch: Sequence[Message]) -> int:
    """Index the messages of a committed batch not yet indexed; returns how many were added."""
    if not batch or not supported(store):
        return 0
    with store.catalog.engine.begin() as conn:
        _ensure_schema(conn)
        fresh = _not_indexed(conn, [m.sha256 for m in batch])
        # One message parsed at a time; its parsed form is dropped before the next.
        return _insert_many(conn, [document(m.raw, m.sha256, m.internal_date) for m in batch if m.sha256 in fresh])


def index_committed(store: Store, batch: Sequence[Message]) -> None:
    """Index a committed batch now; never fails the caller (export uses this)."""
    try:
        index_messages(store, batch)
    except Exception as exc:  # the index is a convenience; the backup is what matters
        log.warning("search index not updated (%s); run 'mailbackup reindex' to catch up", exc)


def documents(items: Sequence[tuple[bytes, str, datetime | None]]) -> list[Document]:
    """The text of each (raw head, sha256, date)."""
    return [document(raw, sha256, when) for raw, sha256, when in items]


def _send(stream: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("!Q", len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("indexer process ended")
    return pickle.loads(stream.read(struct.unpack("!Q", head)[0]))


def serve() -> None:
    """The indexer process: read batches on stdin, answer documents on stdout, until EOF."""
    while True:
        try:
            items = _receive(sys.stdin.buffer)
        except EOFError:
            return
        _send(sys.stdout.buffer, documents(items))


class Indexer:
    """Keeps the index up to date during backup without making backup wait for MIME parsing.

    Parsing runs in a helper process one batch behind the backup (a plain child
    process, so nothing of this one's threads or sockets is copied into it); this
    process only writes finished documents. A failure leaves messages unindexed,
    never the backup undone: `mailbackup reindex` catches up.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.enabled = supported(store)
        self.worker: subprocess.Popen[bytes] | None = None
        self.waiting = False
        self.schema_ready = False

    def add(self, batch: Sequence[Message]) -> None:
        if not self.enabled or not batch:
            return
        try:
            self._collect()
            if self.worker is None:
                code = "from mailbackup.search import serve; serve()"
                self.worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.worker.stdin is not None
            _send(self.worker.stdin, [(m.raw[:PARSE_CAP], m.sha256, m.internal_date) for m in batch])
            self.waiting = True
        except Exception as exc:
            self._give_up(exc)

    def close(self) -> None:
        try:
            if self.enabled:
                self._collect()
        except Exception as exc:
            self._give_up(exc)
        finally:
            self._stop()

    def _collect(self) -> None:
        if self.waiting and self.worker is not None:
            assert self.worker.stdout is not None
            self.waiting = False
            self._write(_receive(self.worker.stdout))

    def _stop(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    stream.close()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def _write(self, docs: list[Document]) -> None:
        with self.store.catalog.engine.connect() as conn:
            # No fsync of its own: the next catalog commit makes it durable, and a
            # lost index row only means reindex has work to do. The same pooled
            # connection goes back to FULL before anyone else can use it.
            try:
                with conn.begin():
                    conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                    if not self.schema_ready:
                        _ensure_schema(conn)
                        self.schema_ready = True
                    fresh = _not_indexed(conn, [d.sha256 for d in docs])
                    _insert_many(conn, [d for d in docs if d.sha256 in fresh])
            finally:
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()

    def _give_up(self, exc: Exception) -> None:
        log.warning("search index not updated (%s); run 'mailbackup reindex' to catch up", exc)
        self.enabled = False
        self._stop()


def _not_indexed(conn: sa.Connection, hashes: Sequence[str]) -> set[str]:
    wanted = set(hashes)
    for start in range(0, len(hashes), 500):
        part = list(hashes[start : start + 500])
        marks = ",".join("?" * len(part))
        found = conn.exec_driver_sql(f"SELECT sha256 FROM search_docs WHERE sha256 IN ({marks})", tuple(part))
        wanted.difference_update(row[0] for row in found)
    return wanted


def _insert_many(conn: sa.Connection, docs: Sequence[Document]) -> int:
    """Insert documents with two executemany calls; ids are taken inside this write transaction."""
    unique = list({d.sha256: d for d in docs}.values())
    if not unique:
        return 0
    first = (conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM search_docs").scalar() or 0) + 1
    ids = range(first, first + len(unique))
    conn.exec_driver_sql(
        "INSERT INTO search_docs (id, sha256, sent_at, sender, subject) VALUES (?, ?, ?, ?, ?)",
        [(i, d.sha256, d.sent_at, d.sender, d.subject) for i, d in zip(ids, unique)],
    )
    conn.exec_driver_sql(
        "INSERT INTO search_text (rowid, sender, recipients, subject, body) VALUES (?, ?, ?, ?, ?)",
        [(i, d.sender, d.recipients, d.subject, d.body) for i, d in zip(ids, unique)],
    )
    return len(unique)


@dataclass(frozen=True)
class ReindexSummary:
    archive: str
    indexed: int
    failed: tuple[str, ...]
    elapsed: float


def reindex(archive: str, *, rebuild: bool = False, batch_size: int = 200) -> ReindexSummary:
    """Index every message content the catalog holds and the index lacks (all of it with rebuild)."""
    started = time.monotonic()
    store = open_store(archive, create=False)
    try:
        _require_sqlite(store)
        engine = store.catalog.engine
        with engine.begin() as conn:
            if rebuild:
                conn.exec_driver_sql("DROP TABLE IF EXISTS search_text")
                conn.exec_driver_sql("DROP TABLE IF EXISTS search_docs")
            _ensure_schema(conn)
        indexed = 0
        failed: list[str] = []
        after = ""
        while True:
            # Keyset pages: no cursor stays open while the index is written.
            page = _unindexed(engine, after, batch_size)
            if not page:
                break
            after = page[-1][0]
            docs = []
            for sha256, location, internal_date in page:
                try:
                    raw = store.get(location)
                    docs.append(document(raw, sha256, datetime.fromisoformat(internal_date) if internal_date else None))
                except (StoreError, ValueError) as exc:
                    failed.append(f"{sha256}: {exc}")
            with engine.begin() as conn:
                indexed += _insert_many(conn, docs)
    finally:
        store.close()
    return ReindexSummary(store.url, indexed, tuple(failed), time.monotonic() - started)


def _unindexed(engine: sa.Engine, after: str, limit: int) -> list[tuple[str, str, str | None]]:
    query = """
        SELECT m.sha256, MIN(m.location), MIN(m.internal_date) FROM messages m
        WHERE m.sha256 > ? AND NOT EXISTS (SELECT 1 FROM search_docs d WHERE d.sha256 = m.sha256)
        GROUP BY m.sha256 ORDER BY m.sha256 LIMIT ?
    """
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(query, (after, limit))]  # type: ignore[misc]


# querying


def _require_sqlite(store: Store) -> None:
    if not supported(store):
        raise UsageError(
            f"search needs a SQLite catalog (SQLite FTS5); {store.url} keeps its catalog in "
            f"{store.catalog.engine.dialect.name}. Export it to a .sqlite archive to search it."
        )


def phrase(text: str) -> str:
    """Text as one FTS5 phrase: quoted, so punctuation is never query syntax."""
    return '"' + text.replace('"', '""') + '"'


def match_expression(filters: Filters) -> str:
    """QUERY words ANDed (a trailing * makes a prefix), plus column filters."""
    terms = []
    for word in filters.query.split():
        terms.append(phrase(word[:-1]) + "*" if word.endswith("*") and len(word) > 1 else phrase(word))
    for column, value in (("sender", filters.sender), ("recipients", filters.recipient), ("subject", filters.subject)):
        if value:
            terms.append(f"{column} : {phrase(value)}")
    return " AND ".join(terms)


def search(archive: str, filters: Filters) -> Iterator[Hit]:
    """Hits newest first, one per catalog entry (a message in three folders is three hits)."""
    store = open_store(archive, create=False)
    try:
        _require_sqlite(store)
        with store.catalog.engine.begin() as conn:
            _ensure_schema(conn)
        sql, params = _query(filters)
        with store.catalog.engine.connect() as conn:
            try:
                result = conn.exec_driver_sql(sql, tuple(params))
            except sa.exc.OperationalError as exc:
                raise UsageError(f"bad search query: {exc.orig}") from exc
            for row in result:
                yield Hit(
                    id=row.id,
                    sha256=row.sha256,
                    folder=row.folder,
                    date=row.sent_at or row.internal_date,
                    sender=row.sender,
                    subject=row.subject,
                    uid=row.uid,
                    gone=row.gone_at is not None,
                )
    finally:
        store.close()


def _query(filters: Filters) -> tuple[str, list[object]]:
    where: list[str] = []
    params: list[object] = []
    expression = match_expression(filters)
    if expression:
        where.append("d.id IN (SELECT rowid FROM search_text WHERE search_text MATCH ?)")
        params.append(expression)
    if filters.since is not None:
        where.append("d.sent_at >= ?")
        params.append(_utc(filters.since))
    if filters.before is not None:
        where.append("d.sent_at < ?")
        params.append(_utc(filters.before))
    if filters.folder is not None:
        where.append("f.name = ?")
        params.append(filters.folder)
    sql = f"""
        SELECT m.id, m.sha256, m.uid, m.internal_date, m.gone_at, f.name AS folder, d.sent_at, d.sender, d.subject
        FROM search_docs d
        JOIN {messages.name} m ON m.sha256 = d.sha256
        JOIN {folders.name} f ON f.id = m.folder_id
        {"WHERE " + " AND ".join(where) if where else ""}
        ORDER BY d.sent_at DESC, m.id
    """
    if filters.limit is not None:
        sql += " LIMIT ?"
        params.append(filters.limit)
    return sql, params


def _utc(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")
