"""The transfer journal: per source, target account, target folder and message, what was
sent and what the target said.

It lives in a small state database outside the archive ($XDG_STATE_HOME/mailbackup/,
or --state), so that a read-only archive can be restored. It is a speed-up, not
the truth: every run checks the target folder's UIDVALIDITY and UIDs before it
trusts a row (see transfer.trusted).

A message is marked 'in_flight' in a committed transaction before its bytes leave,
and 'done' (with the target's UID when known) after the target confirmed it. A
rerun therefore knows exactly which messages may or may not have arrived: only
the in-flight ones need a look at the target.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from .catalog import BigId, create_engine, flags_text, now_iso, small_cache
from .errors import StoreError

IN_FLIGHT = "in_flight"
DONE = "done"
FOUND = "found"  # already on the target; nothing was sent
FAILED = "failed"

metadata = sa.MetaData()

# Version 3: a row per (source folder, target folder) pair, and the messages keyed by that
# pair's id and their item, in one b-tree. Version 2 ("transfer_journal") repeated the source
# and target URLs and both folder names in every message row, under a unique index on all five:
# its upsert took 10-27 % of a restore's samples. Version 2 journals are moved over when opened
# (see Journal); version 1 ("restore_journal", kept in the archive) is no longer read.
folders = sa.Table(
    "journal_folders",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    # Where the messages come from: an archive's URL, or a source account.
    sa.Column("source", sa.Text, nullable=False),
    # Who receives: e.g. imaps://me@host:993, or an SMTP server and its recipients.
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("source_folder", sa.Text, nullable=False),
    sa.Column("target_folder", sa.Text, nullable=False),
    sa.UniqueConstraint("source", "target", "source_folder", "target_folder", name="uq_journal_folders"),
)
journal = sa.Table(
    "journal_items",
    metadata,
    sa.Column("folder_id", BigId, sa.ForeignKey("journal_folders.id"), nullable=False),
    # The catalog entry id (restore) or "UIDVALIDITY:UID" on the source (migrate).
    sa.Column("item", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("target_uid_validity", sa.BigInteger),
    sa.Column("target_uid", sa.BigInteger),
    sa.Column("message_id", sa.Text),
    sa.Column("size", sa.BigInteger),
    sa.Column("sha256", sa.String(64)),
    sa.Column("flags", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.PrimaryKeyConstraint("folder_id", "item", name="pk_journal_items"),
    sqlite_with_rowid=False,  # the key is the row's place: no second tree to keep
)
KEY = ["folder_id", "item"]

# Version 2, read to move its rows over (or, in a dry run, which may not write, read as it is).
legacy = sa.Table(
    "transfer_journal",
    sa.MetaData(),
    sa.Column("source", sa.Text),
    sa.Column("target", sa.Text),
    sa.Column("source_folder", sa.Text),
    sa.Column("item", sa.String(64)),
    sa.Column("state", sa.String(16)),
    sa.Column("target_folder", sa.Text),
    *(sa.Column(c.name, c.type) for c in journal.columns if c.name not in ("folder_id", "item", "state")),
)
FOLDER_KEY = ["source", "target", "source_folder", "target_folder"]


def default_state_path(name: str) -> Path:
    """$XDG_STATE_HOME/mailbackup/NAME.sqlite (restore.sqlite, migrate.sqlite)."""
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "mailbackup" / f"{name}.sqlite"


def state_engine(path: Path, *, dry_run: bool) -> sa.Engine:
    """The state database; a dry run creates none (it reads an existing one)."""
    if dry_run and not path.exists():
        return create_engine("sqlite:///:memory:")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create the state directory {path.parent}: {exc.strerror}") from exc
    engine = create_engine(f"sqlite:///{path}")
    small_cache(engine)

    @event.listens_for(engine, "connect")
    def _synchronous(dbapi_connection: Any, _record: Any) -> None:
        # NORMAL, not the catalog's FULL: WAL then syncs at checkpoints, not at every commit. A
        # power cut may lose the last rows, never corrupt the file, and a lost row costs nothing:
        # whatever the journal does not call done is looked up on the target before it is sent.
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    return engine


@dataclass(frozen=True)
class Record:
    """One journal row: what happened to one message for one target."""

    item: str
    state: str
    target_folder: str
    target_uid_validity: int | None = None
    target_uid: int | None = None
    message_id: str | None = None
    size: int | None = None
    sha256: str | None = None
    flags: tuple[str, ...] = ()
    detail: str | None = None


class Journal:
    """Read and write the journal rows of one source and one target, folder by folder."""

    def __init__(self, engine: sa.Engine, source: str, target: str, *, create: bool = True) -> None:
        self.engine = engine
        self.source = source
        self.target = target
        self.folder_ids: dict[tuple[str, str], int] = {}  # (source folder, target folder) -> id
        self.lock = threading.Lock()  # workers share the journal; one of them adds a folder pair
        self.legacy = False  # a dry run over a version 2 journal reads it where it is
        try:
            tables = set(sa.inspect(engine).get_table_names())
            if create:
                metadata.create_all(engine)
                if legacy.name in tables:
                    _move_over(engine)
                self.exists = True
            else:
                self.exists = journal.name in tables or legacy.name in tables
                self.legacy = journal.name not in tables and legacy.name in tables
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open the restore journal: {exc.orig}") from exc

    def _folder_id(self, source_folder: str, target_folder: str, *, add: bool) -> int | None:
        """The id of this folder pair's row, added if `add` and missing."""
        key = (source_folder, target_folder)
        with self.lock:
            known = self.folder_ids.get(key)
            if known is not None:
                return known
            values = {"source": self.source, "target": self.target, "source_folder": source_folder, "target_folder": target_folder}
            query = sa.select(folders.c.id).where(*(folders.c[name] == value for name, value in values.items()))
            with self.engine.begin() as conn:
                found = conn.execute(query).scalar()
                if found is None:
                    if not add:
                        return None
                    found = conn.execute(folders.insert().values(**values).returning(folders.c.id)).scalar_one()
            self.folder_ids[key] = int(found)
            return int(found)

    def records(self, source_folder: str, target_folder: str) -> dict[str, Record]:
        """Every row for this source folder into this target folder, by item."""
        if not self.exists:
            return {}
        if self.legacy:
            query = sa.select(legacy).where(
                legacy.c.source == self.source,
                legacy.c.target == self.target,
                legacy.c.target_folder == target_folder,
                legacy.c.source_folder == source_folder,
            )
        else:
            folder_id = self._folder_id(source_folder, target_folder, add=False)
            if folder_id is None:
                return {}
            query = sa.select(journal).where(journal.c.folder_id == folder_id)
        with self.engine.connect() as conn:
            return {row.item: _record(row, target_folder) for row in conn.execute(query)}

    def write(self, source_folder: str, records: Sequence[Record]) -> None:
        """Insert or replace rows (each names its target folder) in one transaction."""
        if not records:
            return
        when = now_iso()
        rows = [
            {
                "folder_id": self._folder_id(source_folder, r.target_folder, add=True),
                "item": r.item,
                "state": r.state,
                "target_uid_validity": r.target_uid_validity,
                "target_uid": r.target_uid,
                "message_id": r.message_id,
                "size": r.size,
                "sha256": r.sha256,
                "flags": flags_text(r.flags),
                "detail": r.detail,
                "updated_at": when,
            }
            for r in records
        ]
        statement = _upsert(self.engine.dialect.name)
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def set_flags(self, source_folder: str, target_folder: str, changes: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """Remember the flags now on the target for these items."""
        changes = list(changes)
        if not changes:
            return
        folder_id = self._folder_id(source_folder, target_folder, add=True)
        when = now_iso()
        with self.engine.begin() as conn:
            for item, flags in changes:
                conn.execute(
                    journal.update()
                    .where(journal.c.folder_id == folder_id, journal.c.item == item)
                    .values(flags=flags_text(flags), updated_at=when)
                )


def _move_over(engine: sa.Engine) -> None:
    """Move a version 2 journal's rows into version 3's tables, in one transaction, and drop it."""
    # WHERE: SQLite reads an INSERT ... SELECT's ON CONFLICT as the join's ON without one.
    pairs = sa.select(*(legacy.c[name] for name in FOLDER_KEY)).where(sa.true()).distinct()
    kept = [c.name for c in journal.columns if c.name != "folder_id"]
    rows = sa.select(folders.c.id, *(legacy.c[name] for name in kept)).join(
        folders, sa.and_(*(folders.c[name] == legacy.c[name] for name in FOLDER_KEY))
    ).where(sa.true())
    insert = _insert(engine.dialect.name)
    with engine.begin() as conn:
        # A row the current tables have already (an older version ran after this one) stays.
        conn.execute(insert(folders).from_select(FOLDER_KEY, pairs).on_conflict_do_nothing())
        conn.execute(insert(journal).from_select(["folder_id", *kept], rows).on_conflict_do_nothing())
        conn.execute(sa.text(f"DROP TABLE {legacy.name}"))


def _insert(dialect: str) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (both dialects' insert() take the same arguments)."""
    # Imported here: PostgreSQL's dialect package pulls in its drivers' modules, which a run on SQLite never needs.
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]  # both dialects' insert() take the same arguments
    else:
        raise StoreError(f"the restore journal supports SQLite and PostgreSQL, not {dialect}")
    return insert


@functools.cache
def _upsert(dialect: str) -> sa.sql.expression.Executable:
    statement = _insert(dialect)(journal)
    excluded = statement.excluded
    keep = set(KEY)
    return statement.on_conflict_do_update(
        index_elements=KEY,
        set_={c.name: excluded[c.name] for c in journal.columns if c.name not in keep},
    )


def _record(row: sa.Row[Any], target_folder: str) -> Record:
    return Record(
        item=row.item,
        state=row.state,
        target_folder=target_folder,
        target_uid_validity=row.target_uid_validity,
        target_uid=row.target_uid,
        message_id=row.message_id,
        size=row.size,
        sha256=row.sha256,
        flags=tuple(row.flags.split()) if row.flags else (),
        detail=row.detail,
    )
