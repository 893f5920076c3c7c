"""Messages inside the database itself, content-addressed by SHA-256.

A message that sits in three folders is one blob and three catalog entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..catalog import Catalog, create_engine
from ..errors import ArchiveLocked, StoreError
from ..model import ArchivedFolder, Folder, Message
from .files import file_lock

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


class SqlStore:
    kind = "sql"

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = database_url(url)
        if self.url.startswith("sqlite:///"):
            path = Path(self.url[len("sqlite:///") :])
            if not create and not path.exists():
                raise StoreError(f"no archive at {path}")
            if not path.parent.is_dir():
                raise StoreError(f"directory {path.parent} does not exist")
        engine = create_engine(self.url)
        try:
            blob_metadata.create_all(engine)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open {self.url}: {exc}") from exc
        self.catalog = Catalog(engine)
        self._insert = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert

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
