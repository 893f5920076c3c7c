"""Text of a message for the search index: headers decoded, text parts decoded, HTML reduced.

Kept free of SQLAlchemy and the rest of mailbackup, so the indexer process that
runs it starts in a fraction of the time.
"""

from __future__ import annotations

import binascii
import email.header
import email.utils
import pickle
import re
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy
from email.message import Message as EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import IO, Any, BinaryIO

BODY_CAP = 64 * 1024  # characters of body text indexed per message
PART_CAP = 1 << 20  # bytes of one decoded text part read at most
# Only the head of a big message is parsed: text parts come before attachments in
# practice, and parsing a 20 MB attachment to skip it would cost more than the backup.
PARSE_CAP = 128 * 1024
# The indexer process writes once this many documents wait (and at the end): fewer, bigger
# transactions take the archive's write lock from backup less often, and FTS5 merges less
# (20,000 messages: 1.7 CPU s of writes, against 2.0 at one write per backup batch of about 400).
COMMIT_DOCS = 1000
_PARSER = BytesParser(policy=policy.compat32)  # compat32: no header objects, several times faster


@dataclass(frozen=True)
class Document:
    """What the index keeps of one message."""

    sha256: str
    sent_at: str | None  # UTC ISO 8601, from Date: or else INTERNALDATE
    sender: str
    recipients: str
    subject: str
    body: str


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
        # Header has no public view of its chunks; str() would re-encode the raw bytes.
        text = "".join(_unescape(str(chunk)) for chunk, _ in value._chunks)  # type: ignore[attr-defined]  # see above
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


_SURROGATE = re.compile("[\udc80-\udcff]")


def _unescape(text: str) -> str:
    """The parser keeps undecodable bytes as surrogates; SQLite cannot store those."""
    if text.isascii() or not _SURROGATE.search(text):  # a scan in C, not a generator per character
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


def text_parts(part: EmailMessage | FastPart, depth: int = 0) -> Iterator[EmailMessage | FastPart]:
    """The leaf parts worth indexing; of a multipart/alternative only its text/plain if it has one."""
    if not part.is_multipart():
        yield part
        return
    if depth > 20:  # hostile nesting: the text of sane mail is far shallower
        return
    payload = part.get_payload()
    if not isinstance(payload, list):
        return
    children: list[Any] = payload  # parts, as the parser made them
    if part.get_content_type() == "multipart/alternative":
        plain = [c for c in children if c.get_content_type() == "text/plain"]
        children = plain[:1] or children  # the HTML twin says the same at several times the cost
    for child in children:
        yield from text_parts(child, depth + 1)


def body_text(parsed: EmailMessage | FastPart) -> str:
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
            _check(child, depth + 1)  # type: ignore[arg-type]  # children of a parsed multipart are parts
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


# the indexer process


def documents(items: Sequence[tuple[bytes, str, datetime | None]]) -> list[Document]:
    """The text of each (raw head, sha256, date)."""
    return [document(raw, sha256, when) for raw, sha256, when in items]


def _send(stream: IO[bytes], obj: object) -> None:
    # pickle.dump writes frame by frame: no second copy of a whole batch in memory.
    pickle.dump(obj, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    """One pickled object; pickle's own framing says where it ends. EOFError at the end."""
    return pickle.load(stream)


# The index: one row per distinct message content, whose id is the FTS5 rowid.
# The FTS5 table is contentless (content=''): searches only ask it for rowids, and search_docs
# keeps what a hit shows. Keeping a second copy of every message's text cost a third of the
# insert time and two thirds of the index's size; an index made before keeps its copy and
# works as it is (`reindex --rebuild` makes it contentless).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS search_docs (
        id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        sent_at TEXT,
        sender TEXT NOT NULL,
        subject TEXT NOT NULL
    )""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS search_text USING fts5(
        sender, recipients, subject, body, content = '', tokenize = 'unicode61 remove_diacritics 2'
    )""",
    # FTS5 merges a level's segments once 8 are there, not 4: a backup's index writes cost 28 %
    # less CPU (20,000 messages: 2.0 instead of 2.75 s), a search reads a few more segments.
    # The setting is kept in the index, so an older index takes it too.
    "INSERT INTO search_text (search_text, rank) VALUES ('automerge', 8)",
)
INSERT_DOC = "INSERT INTO search_docs (id, sha256, sent_at, sender, subject) VALUES (?, ?, ?, ?, ?)"
INSERT_TEXT = "INSERT INTO search_text (rowid, sender, recipients, subject, body) VALUES (?, ?, ?, ?, ?)"


def missing(conn: sqlite3.Connection, hashes: Sequence[str]) -> set[str]:
    """The contents among hashes that the index does not hold yet."""
    wanted = set(hashes)
    unique = list(wanted)
    for start in range(0, len(unique), 500):
        part = unique[start : start + 500]
        found = conn.execute(f"SELECT sha256 FROM search_docs WHERE sha256 IN ({','.join('?' * len(part))})", part)
        wanted.difference_update(sha256 for (sha256,) in found)
    return wanted


def write_documents(conn: sqlite3.Connection, docs: Sequence[Document]) -> int:
    """Add the documents the index lacks, in the caller's write transaction."""
    fresh = missing(conn, [d.sha256 for d in docs])
    wanted = {d.sha256: d for d in docs if d.sha256 in fresh}
    if not wanted:
        return 0
    first = conn.execute("SELECT coalesce(max(id), 0) FROM search_docs").fetchone()[0] + 1
    rows = list(zip(range(first, first + len(wanted)), wanted.values()))
    conn.executemany(INSERT_DOC, [(i, d.sha256, d.sent_at, d.sender, d.subject) for i, d in rows])
    conn.executemany(INSERT_TEXT, [(i, d.sender, d.recipients, d.subject, d.body) for i, d in rows])
    return len(rows)


def serve(database: str) -> None:
    """The indexer process: parse the batches that arrive on stdin and write them into
    the index of the SQLite catalog at database, until stdin ends.

    It says nothing on stderr, which it shares with backup; a failure is its exit
    status, and backup turns that into one warning.
    """
    try:
        _serve(database)
    except BaseException:
        sys.exit(1)


def _serve(database: str) -> None:
    conn = sqlite3.connect(database, timeout=60, isolation_level=None)
    # No fsync of its own: the backup's next catalog commit makes it durable, and a
    # lost index row only means `mailbackup reindex` has work to do.
    conn.execute("PRAGMA synchronous=NORMAL")
    for statement in SCHEMA:
        conn.execute(statement)
    pending: list[Document] = []
    while True:
        try:
            items = _receive(sys.stdin.buffer)
        except EOFError:
            break
        pending += documents(items)
        if len(pending) >= COMMIT_DOCS:
            _write(conn, pending)
            pending = []
    _write(conn, pending)
    conn.close()


def _write(conn: sqlite3.Connection, docs: Sequence[Document]) -> None:
    if not docs:
        return
    conn.execute("BEGIN IMMEDIATE")  # ids come from max(id): take the write lock first
    try:
        write_documents(conn, docs)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# Run as `python -c SERVE mime.py DATABASE`: this module without the package's __init__
# (SQLAlchemy and the rest), so the indexer process starts in a fraction of the time.
SERVE = (
    "import importlib.util, sys; spec = importlib.util.spec_from_file_location('mailbackup_mime', sys.argv[1]); "
    "module = sys.modules['mailbackup_mime'] = importlib.util.module_from_spec(spec); "
    "spec.loader.exec_module(module); module.serve(sys.argv[2])"
)
