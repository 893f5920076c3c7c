"""Full-text search: an SQLite FTS5 index beside the catalog, keyed by content SHA-256.

A message that sits in three folders is indexed once; the catalog gives each hit
its entries (folder, date, id) by content. The index holds headers and
the decoded text of text/plain and text/html parts (HTML reduced to text), at most
BODY_CAP characters per message. It is an aid, not part of the backup: backup
indexes each committed batch and a failure only logs a warning (`reindex` catches up).

PostgreSQL archives have no FTS5; search there raises a clear error instead of
pretending, and backup skips indexing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from . import mime
from .errors import StoreError, UsageError
from .mime import PARSE_CAP, SCHEMA, Document, _send, document
from .model import Message
from .stores import Store, open_store
from .stores.codec import encrypted

log = logging.getLogger("mailbackup")



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


# writing the index


def supported(store: Store) -> bool:
    # An encrypted archive keeps no index: its words would sit in the file in clear.
    return store.catalog.engine.dialect.name == "sqlite" and not encrypted(store)


def _ensure_schema(conn: sa.Connection) -> None:
    for statement in SCHEMA:
        conn.exec_driver_sql(statement)


def index_messages(store: Store, batch: Sequence[Message]) -> int:
    """Index the messages of a committed batch not yet indexed; returns how many were added."""
    if not batch or not supported(store):
        return 0
    with store.catalog.engine.begin() as conn:
        _ensure_schema(conn)
        fresh = mime.missing(conn.connection.driver_connection, [m.sha256 for m in batch])  # type: ignore[arg-type]  # the index is SQLite: sqlite3's connection
        # One message parsed at a time; its parsed form is dropped before the next.
        return _insert_many(conn, [document(m.raw, m.sha256, m.internal_date) for m in batch if m.sha256 in fresh])


def index_committed(store: Store, batch: Sequence[Message]) -> None:
    """Index a committed batch now; never fails the caller (export uses this)."""
    try:
        index_messages(store, batch)
    except Exception as exc:  # the index is a convenience; the backup is what matters
        log.warning("search index not updated (%s); run 'mailbackup reindex' to catch up", exc)


class Indexer:
    """Keeps the index up to date during backup without making backup wait for it.

    A helper process (a plain child, so nothing of this one's threads or sockets
    is copied into it) parses each committed batch and writes it into the index,
    while backup goes on; a full pipe is the only thing backup ever waits for.
    A failure leaves messages unindexed, never the backup undone: `mailbackup
    reindex` catches up.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.enabled = supported(store)
        self.worker: subprocess.Popen[bytes] | None = None

    def add(self, batch: Sequence[Message]) -> None:
        if not self.enabled or not batch:
            return
        try:
            if self.worker is None:
                database = self.store.catalog.sqlite_file()
                # Its own session: a Ctrl-C meant for backup must not kill the indexer mid-batch;
                # it finishes what it was sent when backup closes its stdin (or dies).
                self.worker = subprocess.Popen(
                    [sys.executable, "-c", mime.SERVE, mime.__file__, str(database)],
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                )
            assert self.worker.stdin is not None
            _send(self.worker.stdin, [(m.raw[:PARSE_CAP], m.sha256, m.internal_date) for m in batch])
        except Exception as exc:
            self._give_up(exc)

    def close(self) -> None:
        """Wait for the helper to write what it has; say so if it could not."""
        if self.worker is None:
            return
        worker, self.worker = self.worker, None
        try:
            if worker.stdin is not None:
                worker.stdin.close()
            code = worker.wait(timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            worker.kill()
            worker.wait()
            self._give_up(exc)
            return
        if code != 0:
            self._give_up(RuntimeError(f"the indexer process exited with {code}"))

    def _give_up(self, exc: Exception) -> None:
        log.warning("search index not updated (%s); run 'mailbackup reindex' to catch up", exc)
        self.enabled = False
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.kill()
            worker.wait()


def _insert_many(conn: sa.Connection, docs: Sequence[Document]) -> int:
    """Write documents the index lacks, inside the caller's transaction."""
    return mime.write_documents(conn.connection.driver_connection, docs)  # type: ignore[arg-type]  # the index is SQLite: sqlite3's connection


@dataclass(frozen=True)
class ReindexSummary:
    archive: str
    indexed: int
    failed: tuple[str, ...]
    elapsed: float


def reindex(archive: str, *, rebuild: bool = False, batch_size: int = 200) -> ReindexSummary:
    """Index every message content the catalog holds and the index lacks (all of it with rebuild)."""
    started = time.monotonic()
    store = open_store(archive, mode="write")
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
            contents = store.catalog.contents(after, batch_size)
            if not contents:
                break
            after = contents[-1][0]
            with engine.connect() as conn:
                fresh = mime.missing(conn.connection.driver_connection, [c[0] for c in contents])  # type: ignore[arg-type]  # the index is SQLite: sqlite3's connection
            page = [c for c in contents if c[0] in fresh]
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


# querying


def _require_sqlite(store: Store) -> None:
    if encrypted(store):
        raise UsageError(f"{store.url} is encrypted and keeps no search index (it would hold its words in clear)")
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


def search(archive: str, filters: Filters, *, mailbox: str | None = None) -> Iterator[Hit]:
    """Hits newest first, one per catalog entry (a message in three folders is three hits)."""
    store = open_store(archive, mode="read", account=mailbox)
    try:
        _require_sqlite(store)
        with store.catalog.engine.connect() as conn:
            if not sa.inspect(conn).has_table("search_docs"):
                return  # nothing indexed yet ('mailbackup reindex' builds it); a reader creates nothing
        found = 0
        for page in _documents(store, filters):
            by_content = {row[0]: row for row in page}
            entries = store.catalog.entries_with_contents(list(by_content), filters.folder)
            # Newest first, then in catalog order, as one query over both tables would give.
            entries.sort(key=lambda item: item[0].id)
            entries.sort(key=lambda item: by_content[item[0].sha256][1] or "", reverse=True)
            for entry, folder in entries:
                _, sent_at, sender, subject = by_content[entry.sha256]
                yield Hit(
                    id=entry.id,
                    sha256=entry.sha256,
                    folder=folder,
                    date=sent_at or (entry.internal_date.isoformat() if entry.internal_date else None),
                    sender=sender,
                    subject=subject,
                    uid=entry.uid,
                    gone=entry.gone,
                )
                found += 1
                if filters.limit is not None and found >= filters.limit:
                    return
    finally:
        store.close()


def unindexed(archive: str, *, mailbox: str | None = None) -> int:
    """Messages search cannot see yet: backed up with the index off, or while an indexer was cut short."""
    store = open_store(archive, mode="read", account=mailbox)
    try:
        _require_sqlite(store)
        return store.catalog.unindexed()
    finally:
        store.close()


PAGE = 500


def _documents(store: Store, filters: Filters) -> Iterator[list[tuple[str, str | None, str, str]]]:
    """Indexed documents that match, newest first, a page at a time (the index's own tables only)."""
    sql, params = _query(filters)
    offset = 0
    while True:
        with store.catalog.engine.connect() as conn:
            try:
                page = [tuple(row) for row in conn.exec_driver_sql(sql, (*params, PAGE, offset))]
            except sa.exc.OperationalError as exc:
                raise UsageError(f"bad search query: {exc.orig}") from exc
        if not page:
            return
        yield page
        offset += PAGE


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
    sql = f"""
        SELECT d.sha256, d.sent_at, d.sender, d.subject FROM search_docs d
        {"WHERE " + " AND ".join(where) if where else ""}
        ORDER BY d.sent_at DESC, d.sha256 LIMIT ? OFFSET ?
    """
    return sql, params


def _utc(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def indexed_hashes(store: Store, word: str) -> tuple[set[str], set[str]] | None:
    """(SHA-256s whose indexed text holds word, every SHA-256 the index covers); None without an index.

    For IMAP SEARCH TEXT/BODY in `mailbackup serve`; messages the index does not cover are matched otherwise.
    """
    if not supported(store):
        return None
    with store.catalog.engine.connect() as conn:
        if not sa.inspect(conn).has_table("search_docs"):
            return None
        try:
            found = {row[0] for row in conn.exec_driver_sql(
                "SELECT sha256 FROM search_docs WHERE id IN (SELECT rowid FROM search_text WHERE search_text MATCH ?)",
                (match_expression(Filters(query=word)),),
            )}
        except sa.exc.OperationalError:
            return None
        covered = {row[0] for row in conn.exec_driver_sql("SELECT sha256 FROM search_docs")}
    return found, covered
