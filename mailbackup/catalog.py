"""What is archived: folders, source ids, SHA-256, flags and dates (SQLAlchemy Core).

The catalog is the source of truth for metadata. A row is committed only after
its message is durable in the store, so a row never points at nothing.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from .errors import DiskFullError, StoreError
from .model import ArchivedFolder, Entry, Folder, Message

SCHEMA_VERSION = "1"

metadata = sa.MetaData()
# SQLite only aliases rowid for INTEGER PRIMARY KEY; elsewhere ids are 64-bit.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

folders = sa.Table(
    "folders",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("delimiter", sa.String(8)),
    sa.Column("attributes", sa.Text, nullable=False, server_default=""),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("uid_validity", sa.BigInteger),
    sa.Column("highest_modseq", sa.BigInteger),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("folder_id", BigId, sa.ForeignKey("folders.id"), nullable=False),
    sa.Column("uid", sa.BigInteger),
    sa.Column("uid_validity", sa.BigInteger),
    sa.Column("source_id", sa.Text),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("flags", sa.Text, nullable=False, server_default=""),
    # ISO 8601 text keeps the server's own UTC offset, which a TIMESTAMPTZ would drop.
    sa.Column("internal_date", sa.String(40)),
    sa.Column("date_source", sa.String(16)),
    sa.Column("fetched_at", sa.String(40), nullable=False),
    sa.Column("location", sa.Text, nullable=False),
    sa.Column("gone_at", sa.String(40)),
    sa.Index("ix_messages_folder_uid", "folder_id", "uid_validity", "uid", unique=True),
    sa.Index("ix_messages_folder_source_id", "folder_id", "source_id"),
    sa.Index("ix_messages_folder_location", "folder_id", "location"),
    sa.Index("ix_messages_sha256", "sha256"),
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def _date(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def engine_url(url: str) -> str:
    """Default postgresql:// to the psycopg 3 driver, which the postgres extra installs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or PostgreSQL's disk_full (53100)."""
    return getattr(exc, "sqlite_errorcode", None) == 13 or getattr(exc, "sqlstate", None) == "53100"


def create_engine(url: str) -> sa.Engine:
    url = engine_url(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///") :])
        if not path.exists():
            # SQLite gives its -wal and -shm files the mode of the database file.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        engine = sa.create_engine(url)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}") from exc
    where = engine.url.database if engine.dialect.name == "sqlite" else engine.url.render_as_string()

    @event.listens_for(engine, "handle_error")
    def _disk_full(context):  # type: ignore[no-untyped-def]
        # One error for a full disk wherever it strikes: store, catalog, journal, index.
        if disk_full(context.original_exception):
            raise DiskFullError(f"disk full while writing {where}; free space and rerun") from context.original_exception

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, so POP3 may DELE after it.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


class Catalog:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        try:
            metadata.create_all(engine)
            with engine.begin() as conn:
                version = conn.scalar(sa.select(meta.c.value).where(meta.c.key == "schema"))
                if version is None:
                    conn.execute(meta.insert().values(key="schema", value=SCHEMA_VERSION))
                elif version != SCHEMA_VERSION:
                    raise StoreError(f"catalog schema {version} is not supported (want {SCHEMA_VERSION})")
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open catalog: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()

    # folders

    def folders(self) -> list[ArchivedFolder]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(folders).order_by(folders.c.name)).all()
        return [self._folder(r) for r in rows]

    def folder(self, name: str) -> ArchivedFolder | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(folders).where(folders.c.name == name)).first()
        return self._folder(row) if row else None

    def ensure_folder(self, folder: Folder, path: str) -> ArchivedFolder:
        attributes = " ".join(sorted(folder.attributes))
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(folders).where(folders.c.name == folder.name)).first()
            if row is None:
                conn.execute(
                    folders.insert().values(
                        name=folder.name, delimiter=folder.delimiter, attributes=attributes, path=path
                    )
                )
            elif (row.delimiter, row.attributes) != (folder.delimiter, attributes):
                conn.execute(
                    folders.update()
                    .where(folders.c.id == row.id)
                    .values(delimiter=folder.delimiter, attributes=attributes)
                )
        found = self.folder(folder.name)
        assert found is not None
        return found

    def set_folder_state(self, folder_id: int, uid_validity: int | None, highest_modseq: int | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                folders.update()
                .where(folders.c.id == folder_id)
                .values(uid_validity=uid_validity, highest_modseq=highest_modseq)
            )

    # messages

    def live_uids(self, folder_id: int, uid_validity: int) -> array[int]:
        """UIDs held for this folder and UIDVALIDITY, ascending, as a compact array."""
        query = (
            sa.select(messages.c.uid)
            .where(
                messages.c.folder_id == folder_id,
                messages.c.uid_validity == uid_validity,
                messages.c.gone_at.is_(None),
            )
            .order_by(messages.c.uid)
        )
        with self.engine.connect() as conn:
            return array("q", conn.execute(query).scalars())

    def entries_for_uids(self, folder_id: int, uid_validity: int, uids: Sequence[int]) -> list[Entry]:
        query = sa.select(messages).where(
            messages.c.folder_id == folder_id,
            messages.c.uid_validity == uid_validity,
            messages.c.uid.in_(list(uids)),
            messages.c.gone_at.is_(None),
        )
        with self.engine.connect() as conn:
            return [self._entry(r) for r in conn.execute(query)]

    def stale_entry(self, folder_id: int, sha256: str, uid_validity: int) -> Entry | None:
        """A live entry with these bytes left over from an older UIDVALIDITY."""
        query = (
            sa.select(messages)
            .where(
                messages.c.folder_id == folder_id,
                messages.c.sha256 == sha256,
                messages.c.gone_at.is_(None),
                messages.c.uid_validity != uid_validity,  # NULL (a POP3 entry) never matches
            )
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return self._entry(row) if row else None

    def has_stale(self, folder_id: int, uid_validity: int) -> bool:
        query = sa.select(messages.c.id).where(
            messages.c.folder_id == folder_id,
            messages.c.uid_validity != uid_validity,
            messages.c.gone_at.is_(None),
        )
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def source_ids(self, folder_id: int) -> dict[str, str]:
        """POP3 ids held for this folder, with when each was first downloaded."""
        query = sa.select(messages.c.source_id, messages.c.fetched_at).where(
            messages.c.folder_id == folder_id,
            messages.c.source_id.is_not(None),
            messages.c.gone_at.is_(None),
        )
        with self.engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(query)}

    def mark_gone_ids(self, folder_id: int, source_ids: Sequence[str]) -> None:
        when = now_iso()
        with self.engine.begin() as conn:
            for start in range(0, len(source_ids), 500):
                conn.execute(
                    messages.update()
                    .where(
                        messages.c.folder_id == folder_id,
                        messages.c.source_id.in_(list(source_ids[start : start + 500])),
                        messages.c.gone_at.is_(None),
                    )
                    .values(gone_at=when)
                )

    def add(
        self,
        folder_id: int,
        uid_validity: int | None,
        stored: Sequence[tuple[Message, str]],
    ) -> None:
        """Record messages whose bytes are already durable, in one transaction."""
        if not stored:
            return
        fetched_at = now_iso()
        rows = [
            {
                "folder_id": folder_id,
                "uid": message.uid,
                "uid_validity": uid_validity,
                "source_id": message.source_id,
                "sha256": message.sha256,
                "size": message.size,
                "flags": flags_text(message.flags),
                "internal_date": message.internal_date.isoformat() if message.internal_date else None,
                "date_source": message.date_source,
                "fetched_at": fetched_at,
                "location": location,
            }
            for message, location in stored
        ]
        with self.engine.begin() as conn:
            conn.execute(messages.insert(), rows)

    def rekey(self, entry_id: int, message: Message, uid_validity: int, location: str) -> None:
        """Point an entry from an old UIDVALIDITY at the message's new UID."""
        with self.engine.begin() as conn:
            conn.execute(
                messages.update()
                .where(messages.c.id == entry_id)
                .values(
                    uid=message.uid,
                    uid_validity=uid_validity,
                    flags=flags_text(message.flags),
                    location=location,
                )
            )

    def update_flags(self, changes: Sequence[tuple[int, tuple[str, ...], str]]) -> None:
        """Apply (entry id, flags, location) changes in one transaction."""
        if not changes:
            return
        with self.engine.begin() as conn:
            for entry_id, flags, location in changes:
                conn.execute(
                    messages.update()
                    .where(messages.c.id == entry_id)
                    .values(flags=flags_text(flags), location=location)
                )

    def mark_gone(self, folder_id: int, uid_validity: int, uids: Sequence[int]) -> None:
        when = now_iso()
        with self.engine.begin() as conn:
            for start in range(0, len(uids), 500):
                conn.execute(
                    messages.update()
                    .where(
                        messages.c.folder_id == folder_id,
                        messages.c.uid_validity == uid_validity,
                        messages.c.uid.in_(list(uids[start : start + 500])),
                        messages.c.gone_at.is_(None),
                    )
                    .values(gone_at=when)
                )

    def mark_folder_gone(self, folder_id: int) -> int:
        """Every IMAP entry of a folder the server no longer has is gone from the server."""
        with self.engine.begin() as conn:
            result = conn.execute(
                messages.update()
                .where(messages.c.folder_id == folder_id, messages.c.uid.is_not(None), messages.c.gone_at.is_(None))
                .values(gone_at=now_iso())
            )
            return result.rowcount or 0

    def mark_stale_gone(self, folder_id: int, uid_validity: int) -> int:
        """Entries from an older UIDVALIDITY that no new UID claimed are gone from the server."""
        with self.engine.begin() as conn:
            result = conn.execute(
                messages.update()
                .where(
                    messages.c.folder_id == folder_id,
                    messages.c.uid_validity != uid_validity,
                    messages.c.gone_at.is_(None),
                )
                .values(gone_at=now_iso())
            )
            return result.rowcount or 0

    def last_location(self, folder_id: int) -> str | None:
        query = sa.select(sa.func.max(messages.c.location)).where(messages.c.folder_id == folder_id)
        with self.engine.connect() as conn:
            return conn.scalar(query)

    def entries(self, folder_id: int | None = None) -> Iterator[Entry]:
        """Every entry, streamed in id order."""
        query = sa.select(messages).order_by(messages.c.id)
        if folder_id is not None:
            query = query.where(messages.c.folder_id == folder_id)
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=500).execute(query)
            for row in result:
                yield self._entry(row)

    def stats(self) -> list[tuple[ArchivedFolder, int, int, int]]:
        """Per folder: (folder, live messages, bytes, gone messages)."""
        live = sa.case((messages.c.gone_at.is_(None), 1), else_=0)
        query = (
            sa.select(
                messages.c.folder_id,
                sa.func.sum(live),
                sa.func.sum(messages.c.size * live),
                sa.func.count() - sa.func.sum(live),
            )
            .group_by(messages.c.folder_id)
        )
        with self.engine.connect() as conn:
            counts = {r[0]: (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(query)}
        return [(f, *counts.get(f.id, (0, 0, 0))) for f in self.folders()]

    @staticmethod
    def _folder(row: sa.Row) -> ArchivedFolder:  # type: ignore[type-arg]
        return ArchivedFolder(
            id=row.id,
            name=row.name,
            delimiter=row.delimiter,
            attributes=frozenset(row.attributes.split()),
            path=row.path,
            uid_validity=row.uid_validity,
            highest_modseq=row.highest_modseq,
        )

    @staticmethod
    def _entry(row: sa.Row) -> Entry:  # type: ignore[type-arg]
        return Entry(
            id=row.id,
            folder_id=row.folder_id,
            uid=row.uid,
            uid_validity=row.uid_validity,
            source_id=row.source_id,
            sha256=row.sha256,
            size=row.size,
            flags=tuple(row.flags.split()),
            internal_date=_date(row.internal_date),
            location=row.location,
            gone=row.gone_at is not None,
            archived_at=_date(row.fetched_at),
            gone_at=_date(row.gone_at),
        )

    # reading and converting archives (verify, search, show, export)

    def entry(self, entry_id: int) -> Entry | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(messages).where(messages.c.id == entry_id)).first()
        return self._entry(row) if row else None

    def entries_with_sha256_prefix(self, prefix: str, limit: int = 50) -> list[Entry]:
        query = (
            sa.select(messages)
            .where(messages.c.sha256 >= prefix, messages.c.sha256 < prefix + "g")  # hex digits sort below 'g'
            .order_by(messages.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [self._entry(r) for r in conn.execute(query)]

    def has_location_prefix(self, folder_id: int, prefix: str) -> bool:
        """True if an entry's location starts with prefix (an index range, not a scan)."""
        query = sa.select(messages.c.id).where(
            messages.c.folder_id == folder_id,
            messages.c.location >= prefix,
            messages.c.location < prefix + "\U0010ffff",
        )
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def locations(self, folder_id: int) -> Iterator[str]:
        """Every location in a folder, ascending, streamed."""
        query = sa.select(messages.c.location).where(messages.c.folder_id == folder_id).order_by(messages.c.location)
        with self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=1000).execute(query).scalars()

    def records(self, folder_id: int) -> Iterator[EntryRecord]:
        """Every entry of a folder with all its metadata, streamed in id order."""
        query = sa.select(messages).where(messages.c.folder_id == folder_id).order_by(messages.c.id)
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=500).execute(query):
                yield EntryRecord(**{name: getattr(row, name) for name in EntryRecord.__dataclass_fields__})

    def import_records(self, folder_id: int, stored: Sequence[tuple[EntryRecord, str]]) -> None:
        """Record entries copied from another archive, metadata as it was, in one transaction."""
        if not stored:
            return
        rows = [{**asdict(record), "folder_id": folder_id, "location": location} for record, location in stored]
        for row in rows:
            del row["id"]
        with self.engine.begin() as conn:
            conn.execute(messages.insert(), rows)


@dataclass(frozen=True)
class EntryRecord:
    """A catalog entry with every stored column, as export copies it."""

    id: int
    uid: int | None
    uid_validity: int | None
    source_id: str | None
    sha256: str
    size: int
    flags: str
    internal_date: str | None
    date_source: str | None
    fetched_at: str
    location: str
    gone_at: str | None
