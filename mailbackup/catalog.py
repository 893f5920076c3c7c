"""What is archived: folders, source ids, SHA-256, flags and dates (SQLAlchemy Core).

The catalog is the source of truth for metadata. A row is committed only after
its message is durable in the store, so a row never points at nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
from array import array
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, cast
from urllib.request import pathname2url, url2pathname

import sqlalchemy as sa
from sqlalchemy import event

from .errors import (
    AccountMismatch,
    ArchiveReadOnly,
    CatalogDamaged,
    DiskFullError,
    NotAnArchive,
    StoreError,
    UsageError,
    setting,
)
from .model import ArchivedFolder, Entry, Folder, Message

# 2: folders belong to an account (accounts table); a schema-1 catalog is upgraded in place.
# 3: Gmail labels (gmail_messages, gmail_views) and bytes fetched per day (daily_bytes); a
#    schema-2 catalog is upgraded in place by creating the new tables.
SCHEMA_VERSION = "3"
READABLE = ("2", SCHEMA_VERSION)  # read-only opens take a schema-2 catalog as it is (no labels, no budget)
# What an archive may need beyond its schema, written into the schema value ("3+codec"), so that a
# mailbackup that does not know a feature refuses the archive instead of reading it wrong:
# codec: message bytes are compressed or encrypted (stores/codec.py); blobs: they are in a bucket.
FEATURES = frozenset({"codec", "blobs"})


def schema_parts(value: str) -> tuple[str, frozenset[str]]:
    """A schema value ("3", "3+blobs+codec") as its version and its features."""
    version, *features = value.split("+")
    return version, frozenset(features)
# A folder attribute: repair put messages here whose folder the store does not keep (SQL
# blobs). Their locations do not depend on a folder, so a backup may move them to theirs.
RECOVERED_MARK = "$MailbackupRecovered"
UNKNOWN_ACCOUNT = ""  # an archive written before it recorded whose mail it holds

metadata = sa.MetaData()
# SQLite only aliases rowid for INTEGER PRIMARY KEY; elsewhere ids are 64-bit.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),  # user@host
)

folders = sa.Table(
    "folders",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("account_id", BigId, sa.ForeignKey("accounts.id")),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("delimiter", sa.String(8)),
    sa.Column("attributes", sa.Text, nullable=False, server_default=""),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("uid_validity", sa.BigInteger),
    sa.Column("highest_modseq", sa.BigInteger),
    sa.Index("ix_folders_account_name", "account_id", "name", unique=True),
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

# Gmail (sources/gmail.py): each All Mail message's X-GM-MSGID, X-GM-THRID and X-GM-LABELS,
# keyed like its entry (All Mail folder, UIDVALIDITY, UID), so labels fetched before the
# message itself was stored are not lost.
gmail_messages = sa.Table(
    "gmail_messages",
    metadata,
    sa.Column("folder_id", BigId, sa.ForeignKey("folders.id"), primary_key=True),
    sa.Column("uid_validity", sa.BigInteger, primary_key=True),
    sa.Column("uid", sa.BigInteger, primary_key=True),
    sa.Column("msgid", sa.String(20), nullable=False),  # unsigned 64-bit, as decimal text: exact everywhere
    sa.Column("thrid", sa.String(20), nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON list: labels hold spaces
)

# Gmail: archive folders that are views of another (a label of All Mail), and the
# label checkpoint (UIDVALIDITY, HIGHESTMODSEQ) of the All Mail folder (label NULL).
gmail_views = sa.Table(
    "gmail_views",
    metadata,
    sa.Column("folder_id", BigId, sa.ForeignKey("folders.id"), primary_key=True),
    sa.Column("of_folder_id", BigId, sa.ForeignKey("folders.id"), nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("uid_validity", sa.BigInteger),
    sa.Column("highest_modseq", sa.BigInteger),
)

# Bytes fetched from a source per UTC day, for max_bytes_per_day across runs.
daily_bytes = sa.Table(
    "daily_bytes",
    metadata,
    sa.Column("account", sa.Text, primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)


# The search index's table of one row per content (mime.SCHEMA), read here for list pages.
search_docs = sa.table(
    "search_docs", sa.column("sha256"), sa.column("sent_at"), sa.column("sender"), sa.column("subject")
)


@dataclass(frozen=True)
class Headline:
    """What the search index keeps of a message for a list: Date (UTC ISO 8601), From, Subject."""

    sent_at: str | None
    sender: str
    subject: str


ID_CHUNK = 500  # ids per IN (...) query: far below any database's parameter limit


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


def damaged(exc: BaseException) -> bool:
    """SQLite's SQLITE_CORRUPT ("malformed") or SQLITE_NOTADB: the file is not a sound database."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in (11, 26)


def read_only_error(exc: BaseException) -> bool:
    """SQLITE_READONLY in any of its forms, or PostgreSQL's read_only_sql_transaction / insufficient_privilege."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == 8 or getattr(exc, "sqlstate", None) in ("25006", "42501")


def sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///") :])
    return None


def read_only_url(path: Path) -> str:
    """A URI that opens path without writing anything, even in a directory nobody may write.

    mode=ro reads a WAL database only where it can create the -shm file; where it cannot,
    immutable=1 reads the file as it stands, which is exact as long as no -wal holds
    commits that were never checkpointed into it.
    """
    wal = Path(f"{path}-wal")
    if not os.access(path.parent, os.W_OK) and (not wal.exists() or wal.stat().st_size == 0):
        option = "immutable=1"
    else:
        option = "mode=ro"
    return f"sqlite:///file:{pathname2url(str(path))}?{option}&uri=true"


def _tables(cursor: Any) -> set[str]:
    return {row[0] for row in cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _empty_or_ours(tables: set[str]) -> bool:
    return not tables or "meta" in tables or "restore_journal" in tables


def small_cache(engine: sa.Engine, kib: int = 256) -> None:
    """Give each new SQLite connection a small page cache (SQLite's default is 2 MB).

    A restore reads the catalog and writes its journal from several threads, each on
    a connection of its own; their caches would otherwise add up in peak memory.
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _cache(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA cache_size=-{int(kib)}")


def engine_where(engine: sa.Engine) -> str:
    """What to call the database in a message: its file, or its URL without the password."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database or ":memory:"
        return url2pathname(database[len("file:") :]) if database.startswith("file:") else database
    return engine.url.render_as_string()


def create_engine(url: str, *, read_only: bool = False, page_size: int | None = None, cache_kib: int | None = None) -> sa.Engine:
    """An engine on url; read_only opens a SQLite file so that no byte of it (or beside it) changes.

    page_size applies to a SQLite file that has no tables yet; an existing one keeps its own.
    cache_kib is each SQLite connection's page cache (SQLite's default is 2,000 KiB).
    """
    url = engine_url(url)
    path = sqlite_path(url)
    if path is not None and read_only:
        if not path.is_file():
            raise NotAnArchive(f"no archive at {path}")
        url = read_only_url(path)
    elif path is not None and not path.exists():
        # SQLite gives its -wal and -shm files the mode of the database file.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        engine = sa.create_engine(url)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}") from exc
    if read_only and engine.dialect.name == "postgresql":
        engine = engine.execution_options(postgresql_readonly=True)  # the server refuses any write
    where = str(path) if path is not None else engine.url.render_as_string()

    @event.listens_for(engine, "handle_error")
    def _known_errors(context: sa.engine.ExceptionContext) -> None:
        # One error per cause wherever it strikes: store, catalog, journal, index.
        original = context.original_exception
        if disk_full(original):
            raise DiskFullError(f"disk full while writing {where}; free space and rerun") from original
        if damaged(original):
            raise CatalogDamaged(f"the catalog in {where} is damaged ({original}); run 'mailbackup repair' on the archive") from original
        if read_only_error(original):
            raise ArchiveReadOnly(f"cannot write {where}: {original}; this command needs write access to the archive") from original

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL is a change to the file: a reader leaves the mode as it is, and so does a
            # writer that finds someone else's database (the catalog then refuses it).
            tables = set() if read_only else _tables(cursor)
            if not read_only and _empty_or_ours(tables):
                if page_size is not None and not tables:  # before WAL: a WAL file cannot change it later
                    cursor.execute(f"PRAGMA page_size={int(page_size)}")
                cursor.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed row survives power loss, so POP3 may DELE after it.
                cursor.execute("PRAGMA synchronous=FULL")
            if cache_kib is not None:
                cursor.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


class Catalog:
    """The catalog of one archive, scoped to one account (see choose_account).

    read_only: nothing is created, migrated or written; a database without
    mailbackup's tables is refused instead of being given them.
    """

    def __init__(self, engine: sa.Engine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.read_only = read_only
        self.where = engine_where(engine)
        self.account: str | None = None  # the account this catalog is scoped to
        self.account_id: int | None = None
        self.scoped = True  # False: a schema-1 catalog read as it is, one account, no accounts table
        self._ambiguous: list[str] = []
        self.version: str | None = None
        self.features: frozenset[str] = frozenset()
        self._committed = False
        try:
            if read_only:
                self._check_readable()
            else:
                self._prepare()
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open catalog {self.where}: {exc.orig}") from exc
        except sa.exc.DatabaseError as exc:
            raise CatalogDamaged(
                f"the catalog in {self.where} is damaged ({exc.orig}); run 'mailbackup repair' on the archive"
            ) from exc

    def _version(self, conn: sa.Connection) -> str | None:
        tables = set(sa.inspect(conn).get_table_names())
        if "meta" not in tables:
            if tables and self.engine.dialect.name == "sqlite":
                raise NotAnArchive(f"{self.where} is a database but not a mailbackup archive; it is left as it is")
            return None
        return conn.scalar(sa.select(meta.c.value).where(meta.c.key == "schema"))

    def _check_readable(self) -> None:
        with self.engine.connect() as conn:
            version = self._version(conn)
        if version is None:
            raise NotAnArchive(f"{self.where} is not a mailbackup archive")
        version = self._supported(version)
        self.version = version
        if version == "1":
            self.scoped = False
        elif version not in READABLE:
            raise StoreError(f"catalog schema {version} is not supported (want {SCHEMA_VERSION})")

    def _supported(self, value: str) -> str:
        """The schema version of a stored schema value, once its features are known ones."""
        version, features = schema_parts(value)
        if features - FEATURES:
            unknown = ", ".join(sorted(features - FEATURES))
            raise StoreError(f"{self.where} needs a newer mailbackup (it uses: {unknown})")
        self.features = features
        return version

    def require(self, features: set[str]) -> None:
        """Record in the schema value that reading this archive needs these features."""
        wanted = self.features | features
        if wanted == self.features:
            return
        value = "+".join([self.version or SCHEMA_VERSION, *sorted(wanted)])
        with self.engine.begin() as conn:
            conn.execute(meta.update().where(meta.c.key == "schema").values(value=value))
        self.features = frozenset(wanted)

    def _prepare(self) -> None:
        with self.engine.connect() as conn:
            version = self._version(conn)
        if version is not None:
            version = self._supported(version)
        if version not in (None, "1", *READABLE):
            raise StoreError(f"catalog schema {version} is not supported (want {SCHEMA_VERSION})")
        if version == "1":
            self._upgrade_from_1()  # to the current version: its new tables come from create_all below
        metadata.create_all(self.engine)
        if version is None:
            with self.engine.begin() as conn:
                conn.execute(meta.insert().values(key="schema", value=SCHEMA_VERSION))
        elif version == "2":  # schema 2 -> 3 adds tables only, created just above
            with self.engine.begin() as conn:
                conn.execute(meta.update().where(meta.c.key == "schema").values(value="+".join([SCHEMA_VERSION, *sorted(self.features)])))
        self.version = SCHEMA_VERSION

    def _upgrade_from_1(self) -> None:
        """Schema 1 -> 2: folders gain an account; the one account there was is not known by name yet."""
        accounts.create(self.engine, checkfirst=True)
        if self.engine.dialect.name == "sqlite":
            self._upgrade_sqlite_from_1()
            return
        with self.engine.connect() as conn:
            with conn.begin():
                conn.exec_driver_sql("ALTER TABLE folders ADD COLUMN account_id BIGINT REFERENCES accounts (id)")
                conn.exec_driver_sql("ALTER TABLE folders DROP CONSTRAINT IF EXISTS folders_name_key")
                conn.exec_driver_sql("CREATE UNIQUE INDEX ix_folders_account_name ON folders (account_id, name)")
                account_id = self._unknown_account(conn)
                conn.execute(folders.update().values(account_id=account_id))
                conn.execute(meta.update().where(meta.c.key == "schema").values(value=SCHEMA_VERSION))

    def _upgrade_sqlite_from_1(self) -> None:
        """SQLite cannot drop the UNIQUE(name) constraint: rebuild the folders table in one transaction,
        with foreign keys off so that messages' references to it stay as they are."""
        dialect = self.engine.dialect
        create_table = str(sa.schema.CreateTable(folders).compile(dialect=dialect))
        create_index = "CREATE UNIQUE INDEX ix_folders_account_name ON folders (account_id, name)"
        raw = self.engine.raw_connection()
        try:
            db = cast(sqlite3.Connection, raw.driver_connection)  # the SQLite branch: sqlite3's own connection
            db.commit()
            previous = db.isolation_level
            db.isolation_level = None  # BEGIN and COMMIT are ours below
            try:
                db.execute("PRAGMA foreign_keys=OFF")
                db.execute("PRAGMA legacy_alter_table=ON")
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute("ALTER TABLE folders RENAME TO folders_v1")
                    db.execute(create_table)
                    db.execute(create_index)
                    account_id = db.execute("INSERT INTO accounts (name) VALUES (?)", (UNKNOWN_ACCOUNT,)).lastrowid
                    db.execute(
                        "INSERT INTO folders (id, account_id, name, delimiter, attributes, path, uid_validity, highest_modseq) "
                        "SELECT id, ?, name, delimiter, attributes, path, uid_validity, highest_modseq FROM folders_v1",
                        (account_id,),
                    )
                    db.execute("DROP TABLE folders_v1")
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                finally:
                    db.execute("PRAGMA legacy_alter_table=OFF")
                    db.execute("PRAGMA foreign_keys=ON")
            finally:
                db.isolation_level = previous
        finally:
            raw.close()

    @staticmethod
    def _unknown_account(conn: sa.Connection) -> int:
        return new_id(conn.execute(accounts.insert().values(name=UNKNOWN_ACCOUNT)))

    def close(self) -> None:
        self.engine.dispose()

    # accounts

    def accounts(self) -> list[str]:
        """Every account the archive holds, by name ('' for one recorded before names were)."""
        if not self.scoped:
            return [UNKNOWN_ACCOUNT]
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(accounts.c.name).order_by(accounts.c.name)).scalars())

    def choose_account(self, name: str | None, *, claim: bool, several: bool) -> None:
        """Scope every folder query to one account.

        claim: a writer records `name` (or an unnamed account) if the archive lacks it.
        several: the archive may hold more than one account (a SQL database can; a
        Maildir or mbox tree holds one). A reader of several accounts that names none
        may still list them; anything else then says which to pick.
        """
        self.account, self.account_id, self._ambiguous = name, None, []
        if not self.scoped:
            return  # schema 1, read as it stands: one account, whoever it is
        with self.engine.begin() as conn:
            rows = {r.name: r.id for r in conn.execute(sa.select(accounts))}
            if name is not None and name in rows:
                self.account_id = rows[name]
            elif name is not None and not claim:
                held = ", ".join(_shown(n) for n in sorted(rows)) or "none"
                raise UsageError(f"{self.where} holds no mail of {name}; it holds: {held}")
            elif name is not None:
                if list(rows) == [UNKNOWN_ACCOUNT]:
                    # The one account of an archive from before identities: it is this one now.
                    conn.execute(accounts.update().where(accounts.c.id == rows[UNKNOWN_ACCOUNT]).values(name=name))
                    self.account_id = rows[UNKNOWN_ACCOUNT]
                elif rows and not several:
                    other = next(iter(rows))
                    raise AccountMismatch(
                        f"{self.where} holds the mail of {_shown(other)}, not {name}; back up {name} into an archive of its own"
                    )
                else:
                    self.account_id = new_id(conn.execute(accounts.insert().values(name=name)))
            elif len(rows) == 1:
                self.account, self.account_id = next(iter(rows.items()))
            elif not rows and claim:
                self.account = UNKNOWN_ACCOUNT
                self.account_id = new_id(conn.execute(accounts.insert().values(name=UNKNOWN_ACCOUNT)))
            elif rows:
                self._ambiguous = sorted(rows)

    def _own(self) -> sa.ColumnElement[bool]:
        """The condition that keeps a folder query inside this catalog's account."""
        if not self.scoped:
            return sa.true()
        if self._ambiguous:
            held = ", ".join(_shown(n) for n in self._ambiguous)
            raise UsageError(f"{self.where} holds {len(self._ambiguous)} accounts ({held}); pick one with {setting('mailbox')} USER@HOST")
        return folders.c.account_id == self.account_id

    def _folder_columns(self) -> list[sa.Column[Any]]:
        return [c for c in folders.c if self.scoped or c.name != "account_id"]

    def _own_folder_ids(self) -> sa.Select[tuple[int]]:
        return sa.select(folders.c.id).where(self._own())

    # the state of the catalog as a whole (repair, and refusing a lost catalog)

    def lost(self) -> bool:
        """True when the catalog holds no message but once did, or holds nothing at all.

        A new archive holds folders before its first message is committed, so a store
        file left by a crash then is adopted; an archive with no folder rows or with a
        'committed' mark and no messages has lost its catalog.
        """
        with self.engine.connect() as conn:
            if conn.execute(sa.select(messages.c.id).limit(1)).first() is not None:
                return False
            if conn.execute(sa.select(folders.c.id).limit(1)).first() is None:
                return True
            if "meta" not in sa.inspect(conn).get_table_names():
                return False
            return conn.execute(sa.select(meta.c.key).where(meta.c.key == "committed")).first() is not None

    def sound(self) -> bool:
        """SQLite's quick_check passes (a server database checks itself)."""
        if self.engine.dialect.name != "sqlite":
            return True
        try:
            with self.engine.connect() as conn:
                return conn.exec_driver_sql("PRAGMA quick_check").scalar() == "ok"
        except (CatalogDamaged, sa.exc.DatabaseError):
            return False

    def _mark_committed(self, conn: sa.Connection) -> None:
        if self._committed:
            return
        if conn.execute(sa.select(meta.c.key).where(meta.c.key == "committed")).first() is None:
            try:
                with conn.begin_nested():  # another account's first commit may have won the race
                    conn.execute(meta.insert().values(key="committed", value=now_iso()))
            except sa.exc.IntegrityError:
                pass
        self._committed = True

    def setting(self, key: str) -> str | None:
        """A value the archive keeps about itself (e.g. where its message bytes live)."""
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(meta.c.value).where(meta.c.key == key))

    def set_setting(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(meta.delete().where(meta.c.key == key))
            conn.execute(meta.insert().values(key=key, value=value))

    def sqlite_file(self) -> str | None:
        """The database file, when the catalog is a SQLite file (the search index lives in it)."""
        where = engine_where(self.engine)
        return where if self.engine.dialect.name == "sqlite" and where != ":memory:" else None

    # folders

    def folders(self) -> list[ArchivedFolder]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*self._folder_columns()).where(self._own()).order_by(folders.c.name)).all()
        return [self._folder(r) for r in rows]

    def folder(self, name: str) -> ArchivedFolder | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*self._folder_columns()).where(folders.c.name == name, self._own())).first()
        return self._folder(row) if row else None

    def folder_at(self, path: str) -> ArchivedFolder | None:
        """The folder whose messages live at path in the store."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*self._folder_columns()).where(folders.c.path == path, self._own()).limit(1)).first()
        return self._folder(row) if row else None

    def ensure_folder(self, folder: Folder, path: str) -> ArchivedFolder:
        attributes = " ".join(sorted(folder.attributes))
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(*self._folder_columns()).where(folders.c.name == folder.name, self._own())).first()
            if row is None:
                # A folder rebuilt by repair has a name guessed from its path (the delimiter is
                # not on disk); the same path is the same folder, so it takes the server's name.
                row = conn.execute(sa.select(*self._folder_columns()).where(folders.c.path == path, self._own())).first()
                if row is not None:
                    conn.execute(folders.update().where(folders.c.id == row.id).values(name=folder.name))
            if row is None:
                values = dict(name=folder.name, delimiter=folder.delimiter, attributes=attributes, path=path)
                conn.execute(folders.insert().values(**values, **({"account_id": self.account_id} if self.scoped else {})))
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

    def stale_entry(self, folder_id: int, sha256: str, uid_validity: int | None) -> Entry | None:
        """A live entry with these bytes left over from an older UIDVALIDITY, or rebuilt by repair.

        An entry repair could give no folder (see RECOVERED_MARK) moves into this folder
        when it is found here: the server just showed where the message belongs.
        """
        query = (
            sa.select(messages)
            .where(
                messages.c.folder_id == folder_id,
                messages.c.sha256 == sha256,
                messages.c.gone_at.is_(None),
                _stale(uid_validity),
            )
            .limit(1)
        )
        homeless = (
            sa.select(messages)
            .where(
                messages.c.folder_id.in_(self._recovered_folder_ids()),
                messages.c.sha256 == sha256,
                messages.c.gone_at.is_(None),
                _stale(None),
            )
            .limit(1)
        )
        with self.engine.begin() as conn:
            row = conn.execute(query).first()
            if row is None:
                row = conn.execute(homeless).first()
                if row is None:
                    return None
                conn.execute(messages.update().where(messages.c.id == row.id).values(folder_id=folder_id))
                return replace(self._entry(row), folder_id=folder_id)
        return self._entry(row)

    def has_stale(self, folder_id: int, uid_validity: int | None) -> bool:
        """Whether stale_entry may find anything for this folder."""
        own = sa.select(messages.c.id).where(
            messages.c.folder_id == folder_id,
            _stale(uid_validity),
            messages.c.gone_at.is_(None),
        )
        homeless = sa.select(messages.c.id).where(
            messages.c.folder_id.in_(self._recovered_folder_ids()), _stale(None), messages.c.gone_at.is_(None)
        )
        with self.engine.connect() as conn:
            return conn.execute(own.limit(1)).first() is not None or conn.execute(homeless.limit(1)).first() is not None

    def _recovered_folder_ids(self) -> sa.Select[tuple[int]]:
        return sa.select(folders.c.id).where(self._own(), folders.c.attributes.contains(RECOVERED_MARK))

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
            self._mark_committed(conn)
            conn.execute(messages.insert(), rows)

    def add_found(
        self, folder_id: int, found: Sequence[tuple[str, int, tuple[str, ...], datetime | None, datetime | None, str]]
    ) -> None:
        """Record messages repair found in the store: (SHA-256, size, flags, internal date, archived at, location).

        They carry no UID or POP3 id; the next backup claims each by SHA-256 (see _stale).
        """
        if not found:
            return
        now = now_iso()
        rows = [
            {
                "folder_id": folder_id,
                "sha256": sha256,
                "size": size,
                "flags": flags_text(flags),
                "internal_date": internal_date.isoformat() if internal_date else None,
                "fetched_at": _iso(archived_at) if archived_at else now,
                "location": location,
            }
            for sha256, size, flags, internal_date, archived_at, location in found
        ]
        with self.engine.begin() as conn:
            self._mark_committed(conn)
            conn.execute(messages.insert(), rows)

    def rekey(self, entry_id: int, message: Message, uid_validity: int | None, location: str) -> None:
        """Point an entry from an old UIDVALIDITY (or rebuilt by repair) at the message's new id.

        The server's own date replaces a date repair could only take from the Date header.
        """
        dated = {"internal_date": message.internal_date.isoformat()} if message.internal_date else {}
        with self.engine.begin() as conn:
            conn.execute(
                messages.update()
                .where(messages.c.id == entry_id)
                .values(
                    uid=message.uid,
                    uid_validity=uid_validity,
                    source_id=message.source_id,
                    flags=flags_text(message.flags),
                    location=location,
                    **dated,
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

    def mark_stale_gone(self, folder_id: int, uid_validity: int | None) -> int:
        """Entries from an older UIDVALIDITY that no new UID claimed are gone from the server."""
        with self.engine.begin() as conn:
            result = conn.execute(
                messages.update()
                .where(
                    messages.c.folder_id == folder_id,
                    _stale(uid_validity),
                    messages.c.gone_at.is_(None),
                )
                .values(gone_at=now_iso())
            )
            return result.rowcount or 0

    def last_location(self, folder_id: int) -> str | None:
        query = sa.select(sa.func.max(messages.c.location)).where(messages.c.folder_id == folder_id)
        with self.engine.connect() as conn:
            return conn.scalar(query)

    def entries(self, folder_id: int | None = None, *, as_of: datetime | None = None) -> Iterator[Entry]:
        """Every entry of the folder (or the account), streamed in id order; with as_of, those live then."""
        query = sa.select(messages).order_by(messages.c.id)
        if folder_id is not None:
            query = query.where(messages.c.folder_id == folder_id)
        else:
            query = query.where(messages.c.folder_id.in_(self._own_folder_ids()))
        if as_of is not None:
            query = query.where(*live_at(as_of))
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=500).execute(query)
            for row in result:
                yield self._entry(row)

    def selected_ids(self, folder_id: int, selection: Selection) -> list[int]:
        """The ids of the folder's entries a restore takes, ascending."""
        query = (
            sa.select(messages.c.id)
            .where(messages.c.folder_id == folder_id, messages.c.folder_id.in_(self._own_folder_ids()), *chosen(selection))
            .order_by(messages.c.id)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def selected_entries(
        self, folder_id: int, selection: Selection, ids: Sequence[int] | None = None
    ) -> Generator[Entry, None, None]:
        """The folder's entries a restore takes (among `ids` if given), streamed in id order."""
        base = sa.select(messages).where(
            messages.c.folder_id == folder_id, messages.c.folder_id.in_(self._own_folder_ids()), *chosen(selection)
        )
        if ids is None:
            with self.engine.connect() as conn:
                result = conn.execution_options(yield_per=500).execute(base.order_by(messages.c.id))
                for row in result:
                    yield self._entry(row)
            return
        wanted = sorted(ids)
        for start in range(0, len(wanted), ID_CHUNK):
            part = wanted[start : start + ID_CHUNK]
            with self.engine.connect() as conn:
                rows = conn.execute(base.where(messages.c.id.in_(part)).order_by(messages.c.id)).all()
            for row in rows:
                yield self._entry(row)

    def stats(self, *, as_of: datetime | None = None) -> list[tuple[ArchivedFolder, int, int, int]]:
        """Per folder: (folder, live messages, bytes, gone messages); with as_of, as the archive stood then.

        As of a moment, an entry counts once it was archived; it is live if it was not
        gone yet, and gone if it went before that moment.
        """
        if as_of is None:
            live = sa.case((messages.c.gone_at.is_(None), 1), else_=0)
            archived: sa.ColumnElement[bool] = sa.true()
        else:
            live = sa.case((sa.and_(*live_at(as_of)), 1), else_=0)
            archived = messages.c.fetched_at <= _iso(as_of)
        query = (
            sa.select(
                messages.c.folder_id,
                sa.func.sum(live),
                sa.func.sum(messages.c.size * live),
                sa.func.count() - sa.func.sum(live),
            )
            .where(messages.c.folder_id.in_(self._own_folder_ids()), archived)
            .group_by(messages.c.folder_id)
        )
        with self.engine.connect() as conn:
            counts = {r[0]: (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(query)}
        return [(f, *counts.get(f.id, (0, 0, 0))) for f in self.folders()]

    @staticmethod
    def _folder(row: sa.Row[Any]) -> ArchivedFolder:
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
    def _entry(row: sa.Row[Any]) -> Entry:
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
            query = sa.select(messages).where(messages.c.id == entry_id, messages.c.folder_id.in_(self._own_folder_ids()))
            row = conn.execute(query).first()
        return self._entry(row) if row else None

    def entries_with_sha256_prefix(self, prefix: str, limit: int = 50) -> list[Entry]:
        query = (
            sa.select(messages)
            .where(messages.c.sha256 >= prefix, messages.c.sha256 < prefix + "g")  # hex digits sort below 'g'
            .where(messages.c.folder_id.in_(self._own_folder_ids()))
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


    # Gmail labels (sources/gmail.py); absent from a schema-2 catalog opened read-only

    def _labelled(self) -> bool:
        return self.version == SCHEMA_VERSION

    def gmail_checkpoint(self, folder_id: int) -> tuple[int | None, int | None]:
        """(UIDVALIDITY, HIGHESTMODSEQ) up to which All Mail's labels are known."""
        query = sa.select(gmail_views.c.uid_validity, gmail_views.c.highest_modseq).where(gmail_views.c.folder_id == folder_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row[0], row[1]) if row else (None, None)

    def set_gmail_checkpoint(self, folder_id: int, uid_validity: int, highest_modseq: int | None) -> None:
        self._set_view(folder_id, folder_id, None, uid_validity, highest_modseq)

    def set_gmail_view(self, folder_id: int, of_folder_id: int, label: str) -> None:
        """Mark an archive folder as the view of one label of All Mail."""
        self._set_view(folder_id, of_folder_id, label, None, None)

    def _set_view(self, folder_id: int, of_folder_id: int, label: str | None, validity: int | None, modseq: int | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(gmail_views.delete().where(gmail_views.c.folder_id == folder_id))
            conn.execute(
                gmail_views.insert().values(
                    folder_id=folder_id, of_folder_id=of_folder_id, label=label, uid_validity=validity, highest_modseq=modseq
                )
            )

    def gmail_views(self) -> dict[int, tuple[int, str]]:
        """Label folders of this account: folder id -> (id of the folder they are views of, label)."""
        if not self._labelled():
            return {}
        query = sa.select(gmail_views.c.folder_id, gmail_views.c.of_folder_id, gmail_views.c.label).where(
            gmail_views.c.label.is_not(None), gmail_views.c.folder_id.in_(self._own_folder_ids())
        )
        with self.engine.connect() as conn:
            return {row[0]: (row[1], row[2]) for row in conn.execute(query)}

    def set_gmail_labels(
        self, folder_id: int, uid_validity: int, rows: Sequence[tuple[int, int, int, tuple[str, ...]]]
    ) -> None:
        """Record (UID, X-GM-MSGID, X-GM-THRID, labels) of All Mail messages; rows of an older
        UIDVALIDITY are dropped."""
        with self.engine.begin() as conn:
            conn.execute(
                gmail_messages.delete().where(
                    gmail_messages.c.folder_id == folder_id, gmail_messages.c.uid_validity != uid_validity
                )
            )
            for start in range(0, len(rows), 500):
                part = rows[start : start + 500]
                conn.execute(
                    gmail_messages.delete().where(
                        gmail_messages.c.folder_id == folder_id,
                        gmail_messages.c.uid_validity == uid_validity,
                        gmail_messages.c.uid.in_([r[0] for r in part]),
                    )
                )
                conn.execute(
                    gmail_messages.insert(),
                    [
                        {"folder_id": folder_id, "uid_validity": uid_validity, "uid": uid, "msgid": str(msgid),
                         "thrid": str(thrid), "labels": json.dumps(sorted(labels))}
                        for uid, msgid, thrid, labels in part
                    ],
                )

    def gmail_labels(self, folder_id: int, uid_validity: int) -> dict[int, tuple[int, int, tuple[str, ...]]]:
        """UID -> (X-GM-MSGID, X-GM-THRID, labels) for All Mail under this UIDVALIDITY."""
        if not self._labelled():
            return {}
        query = sa.select(gmail_messages).where(
            gmail_messages.c.folder_id == folder_id, gmail_messages.c.uid_validity == uid_validity
        )
        with self.engine.connect() as conn:
            return {
                int(r.uid): (int(r.msgid), int(r.thrid), tuple(json.loads(r.labels)))
                for r in conn.execution_options(yield_per=1000).execute(query)
            }

    # the daily byte budget (max_bytes_per_day)

    def bytes_fetched(self, day: str) -> int:
        """Bytes this account's source sent on a UTC day (YYYY-MM-DD), as recorded."""
        if not self._labelled():
            return 0
        query = sa.select(daily_bytes.c.bytes).where(daily_bytes.c.account == (self.account or ""), daily_bytes.c.day == day)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def add_bytes_fetched(self, day: str, count: int) -> None:
        if count <= 0:
            return
        account = self.account or ""
        with self.engine.begin() as conn:
            updated = conn.execute(
                daily_bytes.update()
                .where(daily_bytes.c.account == account, daily_bytes.c.day == day)
                .values(bytes=daily_bytes.c.bytes + count)
            )
            if not updated.rowcount:
                conn.execute(daily_bytes.insert().values(account=account, day=day, bytes=count))

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
            self._mark_committed(conn)
            conn.execute(messages.insert(), rows)

    def duplicates(self, folder_id: int) -> list[tuple[str, int]]:
        """(SHA-256, copies) of live messages held more than once in a folder with no server id apart.

        Two UIDs (or POP3 ids) with the same bytes are the server's own duplicates; an
        entry without any id, next to another with the same bytes, is a second copy.
        """
        key = sa.func.coalesce(
            sa.cast(messages.c.uid_validity, sa.Text) + ":" + sa.cast(messages.c.uid, sa.Text), messages.c.source_id
        )
        query = (
            sa.select(messages.c.sha256, sa.func.count())
            .where(messages.c.folder_id == folder_id, messages.c.gone_at.is_(None))
            .group_by(messages.c.sha256)
            .having(sa.func.count() > sa.func.count(sa.distinct(key)), sa.func.count() > 1)
            .order_by(messages.c.sha256)
        )
        with self.engine.connect() as conn:
            return [(sha256, int(count)) for sha256, count in conn.execute(query)]

    def copies(self, folder_id: int, sha256: str) -> int:
        """How many entries of a folder (live or gone) hold these bytes."""
        query = sa.select(sa.func.count()).where(messages.c.folder_id == folder_id, messages.c.sha256 == sha256)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def contents(self, after: str, limit: int) -> list[tuple[str, str, str | None]]:
        """(SHA-256, a location, internal date) per distinct content after `after`, in SHA-256 order (every account)."""
        query = (
            sa.select(messages.c.sha256, sa.func.min(messages.c.location), sa.func.min(messages.c.internal_date))
            .where(messages.c.sha256 > after)
            .group_by(messages.c.sha256)
            .order_by(messages.c.sha256)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(row[0], row[1], row[2]) for row in conn.execute(query)]

    def entries_with_contents(self, hashes: Sequence[str], folder: str | None = None) -> list[tuple[Entry, str]]:
        """(entry, folder name) of every entry in this account holding one of these contents, in id order."""
        query = (
            sa.select(messages, folders.c.name.label("folder_name"))
            .join(folders, folders.c.id == messages.c.folder_id)
            .where(messages.c.sha256.in_(list(hashes)), self._own())
            .order_by(messages.c.id)
        )
        if folder is not None:
            query = query.where(folders.c.name == folder)
        with self.engine.connect() as conn:
            return [(self._entry(row), row.folder_name) for row in conn.execute(query)]

    # list pages and the archive over time (the web viewer)

    def page(
        self, folder_id: int, *, sort: str = "date", descending: bool = True, limit: int = 50, offset: int = 0
    ) -> list[tuple[Entry, Headline | None]]:
        """One page of a folder's entries, sorted by date, from, subject or size, with what the search
        index says of each (None where it says nothing). Only the page is read, never the whole folder."""
        indexed = self.engine.dialect.name == "sqlite" and self.has_search_index()
        if indexed:
            query = sa.select(messages, search_docs.c.sent_at, search_docs.c.sender, search_docs.c.subject).outerjoin(
                search_docs, search_docs.c.sha256 == messages.c.sha256
            )
            date = sa.func.coalesce(search_docs.c.sent_at, messages.c.internal_date)
            keys = {"date": date, "from": sa.func.lower(search_docs.c.sender),
                    "subject": sa.func.lower(search_docs.c.subject), "size": messages.c.size}
        else:
            query = sa.select(messages)
            keys = {"date": messages.c.internal_date, "size": messages.c.size}
        key = keys.get(sort, keys["date"])
        query = (
            query.where(messages.c.folder_id == folder_id, messages.c.folder_id.in_(self._own_folder_ids()))
            .order_by(key.desc() if descending else key.asc(), messages.c.id.desc() if descending else messages.c.id)
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            (self._entry(row), Headline(row.sent_at, row.sender, row.subject) if indexed and row.sender is not None else None)
            for row in rows
        ]

    def count(self, folder_id: int) -> int:
        query = sa.select(sa.func.count()).where(messages.c.folder_id == folder_id, messages.c.folder_id.in_(self._own_folder_ids()))
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def months(self) -> list[tuple[str, int, int]]:
        """(YYYY-MM, folder id, messages) by the month of each entry's INTERNALDATE (else when archived)."""
        month = sa.func.substr(sa.func.coalesce(messages.c.internal_date, messages.c.fetched_at), 1, 7)
        query = (
            sa.select(month, messages.c.folder_id, sa.func.count())
            .where(messages.c.folder_id.in_(self._own_folder_ids()))
            .group_by(month, messages.c.folder_id)
            .order_by(month)
        )
        with self.engine.connect() as conn:
            return [(str(m), int(f), int(n)) for m, f, n in conn.execute(query)]

    def has_search_index(self) -> bool:
        with self.engine.connect() as conn:
            return sa.inspect(conn).has_table("search_docs")

    def unindexed(self) -> int:
        """How many of this account's contents the search index lacks (all of them without an index).

        One pass over the messages' SHA-256 index: about 20 ms for 20,000 messages.
        """
        held = sa.select(messages.c.sha256).join(folders, folders.c.id == messages.c.folder_id).where(self._own())
        if self.has_search_index():
            held = held.where(messages.c.sha256.not_in(sa.select(search_docs.c.sha256)))
        query = sa.select(sa.func.count(sa.distinct(held.subquery().c.sha256)))
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def stored_hashes(self) -> Iterator[str]:
        """Every SHA-256 any entry of any account refers to, ascending, streamed."""
        query = sa.select(messages.c.sha256).distinct().order_by(messages.c.sha256)
        with self.engine.connect() as conn:
            yield from conn.execution_options(yield_per=1000).execute(query).scalars()


def _iso(when: datetime) -> str:
    """when as the catalog writes times (UTC, ISO 8601), so text comparison orders them."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def new_id(result: sa.CursorResult[Any]) -> int:
    """The id an INSERT gave its one row."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def live_at(when: datetime) -> tuple[sa.ColumnElement[bool], ...]:
    """An entry is in the archive at `when` if archived by then and not yet gone from the server."""
    moment = _iso(when)
    return (messages.c.fetched_at <= moment, sa.or_(messages.c.gone_at.is_(None), messages.c.gone_at > moment))


@dataclass(frozen=True)
class Selection:
    """Which entries a restore takes: live ones (or gone ones too), or those live at `as_of`; by INTERNALDATE day."""

    as_of: datetime | None = None
    include_gone: bool = False
    since: date | None = None  # INTERNALDATE on or after this day
    before: date | None = None  # INTERNALDATE before this day


def chosen(selection: Selection) -> tuple[sa.ColumnElement[bool], ...]:
    """The catalog's one rule for a Selection, as WHERE clauses."""
    out: list[sa.ColumnElement[bool]] = []
    if selection.as_of is not None:
        out.extend(live_at(selection.as_of))
    elif not selection.include_gone:
        out.append(messages.c.gone_at.is_(None))
    # internal_date is stored in ISO 8601 with its own offset: its first 10 characters are its day.
    day = sa.func.substr(messages.c.internal_date, 1, 10)
    if selection.since is not None:
        out.append(sa.or_(messages.c.internal_date.is_(None), day >= selection.since.isoformat()))
    if selection.before is not None:
        out.append(sa.or_(messages.c.internal_date.is_(None), day < selection.before.isoformat()))
    return tuple(out)


def _stale(uid_validity: int | None) -> sa.ColumnElement[bool]:
    """Entries a new UID may claim by SHA-256: from an older UIDVALIDITY, or rebuilt by repair (no id at all).

    For a POP3 message (uid_validity None) only the entries repair rebuilt.
    """
    unkeyed = sa.and_(messages.c.uid.is_(None), messages.c.source_id.is_(None))
    if uid_validity is None:
        return unkeyed
    return sa.or_(messages.c.uid_validity != uid_validity, unkeyed)  # NULL (a POP3 entry) never matches


def _shown(name: str) -> str:
    return name or "(an account not yet named)"


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
