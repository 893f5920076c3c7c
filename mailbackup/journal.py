"""The restore journal: per target and per message, what was sent and what the target said.

Its tables live in the archive's catalog database (or, for migrate, in a small state
database of their own) but in their own MetaData: the catalog's schema is untouched.

A message is marked 'in_flight' in a committed transaction before its bytes leave,
and 'done' (with the target's UID when known) after the target confirmed it. A
rerun therefore knows exactly which messages may or may not have arrived: only
the in-flight ones need a look at the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .catalog import BigId, flags_text, now_iso
from .errors import StoreError

IN_FLIGHT = "in_flight"
DONE = "done"
FOUND = "found"  # already on the target; nothing was sent
FAILED = "failed"

metadata = sa.MetaData()

journal = sa.Table(
    "restore_journal",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    # Who receives: e.g. imaps://me@host:993, or an SMTP server and its recipients.
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("source_folder", sa.Text, nullable=False),
    # The catalog entry id (restore) or "UIDVALIDITY:UID" on the source (migrate).
    sa.Column("item", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("target_folder", sa.Text),
    sa.Column("target_uid_validity", sa.BigInteger),
    sa.Column("target_uid", sa.BigInteger),
    sa.Column("message_id", sa.Text),
    sa.Column("size", sa.BigInteger),
    sa.Column("sha256", sa.String(64)),
    sa.Column("flags", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("target", "source_folder", "item", name="uq_restore_journal_item"),
)


@dataclass(frozen=True)
class Record:
    """One journal row: what happened to one message for one target."""

    item: str
    state: str
    target_folder: str | None = None
    target_uid_validity: int | None = None
    target_uid: int | None = None
    message_id: str | None = None
    size: int | None = None
    sha256: str | None = None
    flags: tuple[str, ...] = ()
    detail: str | None = None


class Journal:
    """Read and write the journal rows of one target, folder by folder."""

    def __init__(self, engine: sa.Engine, target: str, *, create: bool = True) -> None:
        self.engine = engine
        self.target = target
        try:
            if create:
                metadata.create_all(engine)
                self.exists = True
            else:
                self.exists = sa.inspect(engine).has_table(journal.name)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open the restore journal: {exc.orig}") from exc

    def records(self, source_folder: str) -> dict[str, Record]:
        """Every row for this folder, by item."""
        if not self.exists:
            return {}
        query = sa.select(journal).where(journal.c.target == self.target, journal.c.source_folder == source_folder)
        with self.engine.connect() as conn:
            return {row.item: _record(row) for row in conn.execute(query)}

    def write(self, source_folder: str, records: Sequence[Record]) -> None:
        """Insert or replace rows in one transaction."""
        if not records:
            return
        when = now_iso()
        rows = [
            {
                "target": self.target,
                "source_folder": source_folder,
                "item": r.item,
                "state": r.state,
                "target_folder": r.target_folder,
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

    def set_flags(self, source_folder: str, changes: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """Remember the flags now on the target for these items."""
        when = now_iso()
        with self.engine.begin() as conn:
            for item, flags in changes:
                conn.execute(
                    journal.update()
                    .where(
                        journal.c.target == self.target,
                        journal.c.source_folder == source_folder,
                        journal.c.item == item,
                    )
                    .values(flags=flags_text(flags), updated_at=when)
                )


def _upsert(dialect: str) -> sa.sql.expression.Executable:
    module = {"sqlite": sqlite, "postgresql": postgresql}.get(dialect)
    if module is None:
        raise StoreError(f"the restore journal supports SQLite and PostgreSQL, not {dialect}")
    statement = module.insert(journal)
    excluded = statement.excluded
    keep = {"id", "target", "source_folder", "item"}
    return statement.on_conflict_do_update(
        index_elements=["target", "source_folder", "item"],
        set_={c.name: excluded[c.name] for c in journal.columns if c.name not in keep},
    )


def _record(row: sa.Row) -> Record:  # type: ignore[type-arg]
    return Record(
        item=row.item,
        state=row.state,
        target_folder=row.target_folder,
        target_uid_validity=row.target_uid_validity,
        target_uid=row.target_uid,
        message_id=row.message_id,
        size=row.size,
        sha256=row.sha256,
        flags=tuple(row.flags.split()) if row.flags else (),
        detail=row.detail,
    )
