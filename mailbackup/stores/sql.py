"""Messages inside the database itself, content-addressed by SHA-256.

A message that sits in three folders is one blob and three catalog entries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..catalog import RECOVERED_MARK, Catalog, create_engine
from ..errors import ArchiveLocked, CatalogDamaged, NotAnArchive, StoreError, UsageError, setting
from ..model import ArchivedFolder, Folder, Message
from . import Finding, Recovered
from .blobs import Blob, BlobBackend, Bucket, S3Blobs
from .codec import Codec, content_name, open_codec
from .files import file_lock, header_date, require_writable

RECOVERED = "Recovered"  # where repair puts blobs no entry names: the database keeps no folder for them

LOCK_KEY = 0x6D61696C6261636B  # "mailback": one advisory lock per database
ACCOUNT_LOCK = 0x6D61696C  # "mail": with an account's id, one advisory lock per account
SETUP_LOCK = 0x6D62736574757021  # "mbsetup!": one writer at a time creates tables and first settings
BIG = 1 << 20
# A new SQLite archive's pages: a message of typical size then spans two or three pages, not
# seven, and the WAL writes and checkpoints a quarter of the frames (20,000 messages: 2.0
# instead of 3.3 s of system time). The catalog's small rows don't mind. Its page cache stays
# near 1 MB: at SQLite's default of 2 MB, 16 KiB pages cost a backup 6 MB more peak memory.
PAGE_SIZE = 16384
CACHE_KIB = 1024

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


def insert_for(dialect: str) -> Any:
    """The dialect's INSERT (with ON CONFLICT); imported here, as PostgreSQL's pulls in its drivers' modules."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


@contextmanager
def setup_lock(engine: sa.Engine, writable: bool) -> Iterator[None]:
    """Writers opening one PostgreSQL archive take turns creating its tables, accounts and first settings.

    Queue workers starting on a fresh archive at once otherwise both ran CREATE TABLE
    (a unique violation in pg_type) or both recorded the bucket. SQLite's own write
    lock already serializes them.
    """
    if not writable or engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_lock(SETUP_LOCK)))
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(SETUP_LOCK)))
            conn.commit()


class SqlStore:
    kind = "sql"

    external_blobs = True  # takes open_store(..., blobs=Bucket)

    def __init__(self, url: str, *, mode: str = "read", account: str | None = None, blobs: Bucket | None = None) -> None:
        self.url = database_url(url)
        self.bucket: BlobBackend | None = None
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
        engine = create_engine(self.url, read_only=not self.writable, page_size=PAGE_SIZE, cache_kib=CACHE_KIB)
        try:
            with setup_lock(engine, self.writable):
                # The catalog first: it refuses a database that is not a mailbackup archive.
                self.catalog = Catalog(engine, read_only=not self.writable)
                if self.writable:
                    blob_metadata.create_all(engine)
                # Bytes pass through the codec: as they are, zstd, or zstd then AES-256-GCM (stores/codec.py).
                self.codec: Codec = open_codec(engine, self.catalog.where, writable=self.writable, fresh=self.writable and not self.holds_messages())
                self.catalog.choose_account(account, claim=self.writable, several=True)
                self.bucket = self._bucket(blobs)
                if self.writable:  # a mailbackup that cannot read these bytes must refuse the archive
                    self.catalog.require({"codec"} if self.codec.sealed or self.codec.compress else set())
                    self.catalog.require({"blobs"} if self.bucket is not None else set())
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open {self.url}: {exc}") from exc
        except BaseException:
            engine.dispose()
            raise
        self._insert = insert_for(engine.dialect.name)

    def _bucket(self, wanted: Bucket | None) -> BlobBackend | None:
        """Where message bytes live: the archive records it once, so later commands need no flag."""
        recorded = self.catalog.setting("blobs")
        if wanted is not None and recorded is None:
            if self.holds_messages():
                raise UsageError(f"{self.url} keeps its messages in the database; {setting('blobs')} is for a new archive")
            if not self.writable:
                raise UsageError(f"{setting('blobs')} is given when the archive is written")
            bucket = S3Blobs(wanted.url, wanted.endpoint)
            self.catalog.set_setting("blobs", wanted.url)
            if wanted.endpoint:
                self.catalog.set_setting("s3_endpoint", wanted.endpoint)
            return bucket
        if wanted is not None and recorded != wanted.url:
            raise UsageError(f"{self.url} keeps its messages in {recorded}, not {wanted.url}")
        if recorded is None:
            return None
        # --s3-endpoint, then AWS_ENDPOINT_URL (boto3 reads it), then the one recorded at the first backup.
        endpoint = wanted.endpoint if wanted is not None and wanted.endpoint else None
        if endpoint is None and not os.environ.get("AWS_ENDPOINT_URL"):
            endpoint = self.catalog.setting("s3_endpoint")
        return S3Blobs(recorded, endpoint)

    @staticmethod
    def accepts(url: str) -> str | None:
        return url if "://" in url or url.endswith((".sqlite", ".db", ".sqlite3")) else None

    def holds_messages(self) -> bool:
        if self.bucket is not None:
            return self.bucket.any()
        with self.catalog.engine.connect() as conn:
            return conn.execute(sa.select(blobs.c.sha256).limit(1)).first() is not None

    def _orphans(self) -> Iterator[tuple[str, int]]:
        """Blobs no entry of any account names, by walking both sorted lists side by side."""
        referenced = self.catalog.stored_hashes()
        following = next(referenced, None)
        for sha256, size in self._held():
            while following is not None and following < sha256:
                following = next(referenced, None)
            if following != sha256:
                yield sha256, size

    def _held(self) -> Iterator[tuple[str, int]]:
        if self.bucket is not None:
            yield from self.bucket.keys()
            return
        query = sa.select(blobs.c.sha256, blobs.c.size).order_by(blobs.c.sha256)
        with self.catalog.engine.connect() as conn:
            yield from conn.execution_options(yield_per=1000).execute(query)

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        raise CatalogDamaged(
            f"{where} is damaged, and its catalog and messages share the database; restore the file from a copy, "
            "or salvage it with sqlite3's .recover into a new file and run 'mailbackup repair' on that"
        )

    def unrecorded(self) -> Iterator[Finding]:
        for sha256, size in self._orphans():
            where = f"object {self.bucket.address(sha256)}" if self.bucket else f"blob {sha256}"
            yield Finding(None, f"{where} ({size} bytes) that no entry references")

    def duplicates(self) -> Iterator[Finding]:
        return iter(())  # content-addressed: one blob per content, whatever the catalog says

    def recover(self) -> Iterator[Recovered]:
        """Blobs no entry names, rehashed; a blob whose bytes do not match its key is left out."""
        folder = Folder(RECOVERED, "/", frozenset({RECOVERED_MARK}))
        for sha256, _size in list(self._orphans()):
            raw = self.get(sha256)
            if content_name(self, raw) == sha256:
                yield Recovered(folder, RECOVERED, sha256, sha256, sha256, len(raw), (), header_date(raw))

    def folder_path(self, folder: Folder) -> str:
        return folder.name

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        # Callers name messages as the codec does (codec.named): in an encrypted archive
        # m.sha256 is already the keyed MAC, so it is not computed twice.
        unique = {m.sha256: m for m in messages}
        # Bytes -> codec (as they are, zstd, or zstd then AES-GCM) -> where they live (a table or a bucket).
        self.codec.learn([m.raw for m in unique.values()])  # a zstd dictionary from the first small messages
        encoded = {name: self.codec.encode(name, m.raw) for name, m in unique.items()}
        if self.bucket is not None:
            self.bucket.put([Blob(name, data) for name, data in encoded.items()])
            return [m.sha256 for m in messages]
        # SQLite copies a bound blob twice on its way into a row: a big one is streamed instead.
        stream = self.catalog.engine.dialect.name == "sqlite"
        rows = [{"sha256": name, "size": len(data), "raw": data} for name, data in encoded.items() if not stream or len(data) < BIG]
        big = [(name, data) for name, data in encoded.items() if stream and len(data) >= BIG]
        statement = self._insert(blobs).on_conflict_do_nothing(index_elements=["sha256"])
        try:
            with self.catalog.engine.begin() as conn:
                if rows:
                    conn.execute(statement, rows)
                for name, data in big:
                    self._stream_blob(conn, name, data)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot write to {self.url}: {exc.orig}") from exc
        return [m.sha256 for m in messages]

    @staticmethod
    def _stream_blob(conn: sa.Connection, name: str, data: bytes) -> None:
        """Insert a zeroblob, then write the bytes into it a megabyte at a time."""
        cursor = conn.exec_driver_sql(
            "INSERT INTO blobs (sha256, size, raw) VALUES (?, ?, zeroblob(?)) ON CONFLICT (sha256) DO NOTHING",
            (name, len(data), len(data)),
        )
        if cursor.rowcount != 1:
            return  # already stored: content-addressed
        raw_connection = conn.connection.driver_connection
        rowid = conn.exec_driver_sql("SELECT rowid FROM blobs WHERE sha256 = ?", (name,)).scalar()
        view = memoryview(data)
        with raw_connection.blobopen("blobs", "raw", rowid) as blob:  # type: ignore[union-attr]  # the SQLite branch: sqlite3's connection has blobopen
            for start in range(0, len(view), BIG):
                blob.write(view[start : start + BIG])

    def get(self, location: str) -> bytes:
        if self.bucket is not None:
            return self.codec.decode(location, self.bucket.get(location))
        with self.catalog.engine.connect() as conn:
            raw = conn.scalar(sa.select(blobs.c.raw).where(blobs.c.sha256 == location))
        if raw is None:
            raise StoreError(f"blob {location} missing from {self.url}")
        return self.codec.decode(location, bytes(raw))

    def get_many(self, locations: Sequence[str]) -> dict[str, bytes]:
        """get() of several messages in one query (serve reads a FETCH's messages a batch at a time)."""
        if self.bucket is not None:
            return {location: self.get(location) for location in locations}
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(sa.select(blobs.c.sha256, blobs.c.raw).where(blobs.c.sha256.in_(set(locations)))).all()
        found = {name: self.codec.decode(name, bytes(raw)) for name, raw in rows}
        missing = [location for location in locations if location not in found]
        if missing:
            raise StoreError(f"blob {missing[0]} missing from {self.url}")
        return found

    def stream(self, location: str) -> Iterator[bytes]:
        """get()'s bytes a piece at a time: SQLite's incremental blob reads, else substrings."""
        from . import STREAM_CHUNK

        if self.codec.sealed or self.codec.compress or self.bucket is not None:  # whole: not the table's bytes
            yield self.get(location)
            return
        with self.catalog.engine.connect() as conn:
            size = conn.scalar(sa.select(blobs.c.size).where(blobs.c.sha256 == location))
            if size is None:
                raise StoreError(f"blob {location} missing from {self.url}")
            if self.catalog.engine.dialect.name == "sqlite":
                rowid = conn.exec_driver_sql("SELECT rowid FROM blobs WHERE sha256 = ?", (location,)).scalar()
                with conn.connection.driver_connection.blobopen("blobs", "raw", rowid, readonly=True) as blob:  # type: ignore[union-attr]  # the SQLite branch: sqlite3 has blobopen
                    yield from iter(lambda: blob.read(STREAM_CHUNK), b"")
                return
            for start in range(0, size, STREAM_CHUNK):
                piece = conn.scalar(sa.select(sa.func.substring(blobs.c.raw, start + 1, STREAM_CHUNK)).where(blobs.c.sha256 == location))
                yield bytes(piece or b"")

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        return location

    @contextmanager
    def lock(self) -> Iterator[None]:
        engine = self.catalog.engine
        if engine.dialect.name == "sqlite":
            with file_lock(Path(f"{engine.url.database}.lock"), self.url):
                yield
            return
        # Elsewhere session-level advisory locks, held by one connection for the run. A run for
        # one account shares the archive's lock and holds its account's alone, so workers back
        # up the accounts of one shared archive side by side; a run over the whole archive
        # (no account) holds the archive's lock alone.
        account_id = self.catalog.account_id
        where = engine.url.render_as_string()
        # (take, release) pairs of SQL calls, taken in order and released in reverse.
        wanted: list[tuple[sa.Function[bool], sa.Function[bool]]]
        if account_id is None:
            wanted = [(sa.func.pg_try_advisory_lock(LOCK_KEY), sa.func.pg_advisory_unlock(LOCK_KEY))]
        else:
            wanted = [
                (sa.func.pg_try_advisory_lock_shared(LOCK_KEY), sa.func.pg_advisory_unlock_shared(LOCK_KEY)),
                (sa.func.pg_try_advisory_lock(ACCOUNT_LOCK, account_id), sa.func.pg_advisory_unlock(ACCOUNT_LOCK, account_id)),
            ]
        with engine.connect() as conn:
            held: list[sa.Function[bool]] = []
            try:
                for take, release in wanted:
                    if not conn.scalar(sa.select(take)):
                        who = f" for {self.catalog.account}" if account_id is not None else ""
                        raise ArchiveLocked(f"another mailbackup run is writing {where}{who}")
                    held.append(release)
                yield
            finally:
                for release in reversed(held):
                    conn.scalar(sa.select(release))

    def close(self) -> None:
        if self.bucket is not None:
            self.bucket.close()
        self.catalog.close()
