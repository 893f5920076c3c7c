"""Messages inside the database itself, content-addressed by SHA-256.

A message that sits in three folders is one blob and three catalog entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from ..catalog import RECOVERED_MARK, Catalog, create_engine
from ..errors import ArchiveLocked, CatalogDamaged, NotAnArchive, StoreError
from ..model import ArchivedFolder, Folder, Message
from . import Finding, Recovered
from .files import file_lock, header_date, require_writable

RECOVERED = "Recovered"  # where repair puts blobs no entry names: the database keeps no folder for them

LOCK_KEY = 0x6D61696C6261636B  # "mailback": one advisory lock per database
BIG = 1 << 20

blob_metadata = sa.MetaData()
blobs = sa.Table(
    "blobs",
    blob_metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),
)


def database_url(url: str) -> str:
    if "://" in url:
        return url
    path = Path(url).expanduser().absolute()
    return f"sqlite:///{path}"


def insert_for(dialect: str):  # type: ignore[no-untyped-def]
    """The dialect's INSERT (with ON CONFLICT); imported here, as PostgreSQL's pulls in its drivers' modules."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class SqlStore:
    kind = "sql"

    def __init__(self, url: str, *, mode: str = "read", account: str | None = None) -> None:
        self.url = database_url(url)
        self.writable = mode == "write"
        if self.url.startswith("sqlite:///"):
            path = Path(self.url[len("sqlite:///") :])
            if not self.writable and not path.exists():
                raise NotAnArchive(f"no archive at {path}")
            if not path.parent.is_dir():
                raise StoreError(f"directory {path.parent} does not exist")
            if self.writable:
                # WAL writes its -wal and -shm files beside the database.
                require_writable(path.parent, str(path))
                require_writable(path, str(path))
        engine = create_engine(self.url, read_only=not self.writable)
        try:
            # The catalog first: it refuses a database that is not a mailbackup archive.
            self.catalog = Catalog(engine, read_only=not self.writable)
            if self.writable:
                blob_metadata.create_all(engine)
            self.catalog.choose_account(account, claim=self.writable, several=True)
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open {self.url}: {exc}") from exc
        except BaseException:
            engine.dispose()
            raise
        self._insert = insert_for(engine.dialect.name)

    @staticmethod
    def accepts(url: str) -> str | None:
        return url if "://" in url or url.endswith((".sqlite", ".db", ".sqlite3")) else None

    def holds_messages(self) -> bool:
        with self.catalog.engine.connect() as conn:
            return conn.execute(sa.select(blobs.c.sha256).limit(1)).first() is not None

    def _orphans(self) -> Iterator[tuple[str, int]]:
        """Blobs no entry of any account names, by walking both sorted lists side by side."""
        referenced = self.catalog.stored_hashes()
        following = next(referenced, None)
        query = sa.select(blobs.c.sha256, blobs.c.size).order_by(blobs.c.sha256)
        with self.catalog.engine.connect() as conn:
            for sha256, size in conn.execution_options(yield_per=1000).execute(query):
                while following is not None and following < sha256:
                    following = next(referenced, None)
                if following != sha256:
                    yield sha256, size

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        raise CatalogDamaged(
            f"{where} is damaged, and its catalog and messages share the database; restore the file from a copy, "
            "or salvage it with sqlite3's .recover into a new file and run 'mailbackup repair' on that"
        )

    def unrecorded(self) -> Iterator[Finding]:
        for sha256, size in self._orphans():
            yield Finding(None, f"blob {sha256} ({size} bytes) that no entry references")

    def duplicates(self) -> Iterator[Finding]:
        return iter(())  # content-addressed: one blob per content, whatever the catalog says

    def recover(self) -> Iterator[Recovered]:
        """Blobs no entry names, rehashed; a blob whose bytes do not match its key is left out."""
        folder = Folder(RECOVERED, "/", frozenset({RECOVERED_MARK}))
        for sha256, _size in list(self._orphans()):
            raw = self.get(sha256)
            if hashlib.sha256(raw).hexdigest() == sha256:
                yield Recovered(folder, RECOVERED, sha256, sha256, sha256, len(raw), (), header_date(raw))

    def folder_path(self, folder: Folder) -> str:
        return folder.name

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        unique = {m.sha256: m for m in messages}
        # SQLite copies a bound blob twice on its way into a row: a big one is streamed instead.
        stream = self.catalog.engine.dialect.name == "sqlite"
        rows = [{"sha256": m.sha256, "size": m.size, "raw": m.raw} for m in unique.values() if not stream or m.size < BIG]
        big = [m for m in unique.values() if stream and m.size >= BIG]
        statement = self._insert(blobs).on_conflict_do_nothing(index_elements=["sha256"])
        try:
            with self.catalog.engine.begin() as conn:
                if rows:
                    conn.execute(statement, rows)
                for message in big:
                    self._stream_blob(conn, message)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot write to {self.url}: {exc.orig}") from exc
        return [m.sha256 for m in messages]

    @staticmethod
    def _stream_blob(conn: sa.Connection, message: Message) -> None:
        """Insert a zeroblob, then write the bytes into it a megabyte at a time."""
        cursor = conn.exec_driver_sql(
            "INSERT INTO blobs (sha256, size, raw) VALUES (?, ?, zeroblob(?)) ON CONFLICT (sha256) DO NOTHING",
            (message.sha256, message.size, message.size),
        )
        if cursor.rowcount != 1:
            return  # already stored: content-addressed
        raw_connection = conn.connection.driver_connection
        rowid = conn.exec_driver_sql("SELECT rowid FROM blobs WHERE sha256 = ?", (message.sha256,)).scalar()
        view = memoryview(message.raw)
        with raw_connection.blobopen("blobs", "raw", rowid) as blob:  # type: ignore[union-attr]
            for start in range(0, len(view), BIG):
                blob.write(view[start : start + BIG])

    def get(self, location: str) -> bytes:
        with self.catalog.engine.connect() as conn:
            raw = conn.scalar(sa.select(blobs.c.raw).where(blobs.c.sha256 == location))
        if raw is None:
            raise StoreError(f"blob {location} missing from {self.url}")
        return bytes(raw)

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        return location

    @contextmanager
    def lock(self) -> Iterator[None]:
        engine = self.catalog.engine
        if engine.dialect.name == "sqlite":
            with file_lock(Path(f"{engine.url.database}.lock"), self.url):
                yield
            return
        # Elsewhere a session-level advisory lock, held by one connection for the run.
        with engine.connect() as conn:
            if not conn.scalar(sa.select(sa.func.pg_try_advisory_lock(LOCK_KEY))):
                raise ArchiveLocked(f"another mailbackup run is writing {engine.url.render_as_string()}")
            try:
                yield
            finally:
                conn.scalar(sa.select(sa.func.pg_advisory_unlock(LOCK_KEY)))

    def close(self) -> None:
        self.catalog.close()
