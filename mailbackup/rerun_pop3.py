"""The rerun check for a POP3 maildrop: one UIDL against the catalog's known UIDLs.

A full POP3 backup opens the store (SQLAlchemy, the store's own checks), LISTs and
UIDLs the maildrop, loads every known id and only then finds nothing to do. Here the
catalog is read with the stdlib's sqlite3 (rerun.py opens it) and the server is asked
STAT and UIDL. The maildrop is up to date when its UIDLs are exactly the catalog's live
ones for the folder it is archived under (nothing new, nothing gone from the server),
no entry waits to be adopted by content, and the delete options owe no deletion: a
rerun with --delete always goes to the full backup while the server still holds mail
that was archived. Anything else goes to the full backup, over the same connection.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime

from .model import FolderReport

# The folder of the archive, and whether anything in it keeps the fast path from vouching:
# its delimiter and attributes as ensure_folder would leave them ('/', none), and no live
# entry that repair rebuilt without an id (Catalog.has_stale for a POP3 folder).
FOLDER = """
    SELECT f.id, f.delimiter = '/' AND f.attributes = '',
        EXISTS (SELECT 1 FROM messages m
            WHERE m.folder_id = f.id AND m.gone_at IS NULL AND m.uid IS NULL AND m.source_id IS NULL)
    FROM folders f WHERE f.account_id = ? AND f.name = ?
"""

# The live UIDLs of the folder, as Catalog.source_ids reads them: one pass over the
# (folder_id, source_id) index, in its order.
KNOWN = "SELECT source_id{} FROM messages WHERE folder_id = ? AND source_id IS NOT NULL AND gone_at IS NULL ORDER BY source_id"


@dataclass(frozen=True)
class Known:
    """What the catalog holds for the maildrop's folder: its live UIDLs, and when each was first
    downloaded if a delete option asked (else None)."""

    folder: str
    ids: list[str]
    first_seen: list[str] | None = None  # in the order of ids


def read_known(db: sqlite3.Connection, account_id: int, folder: str, *, dated: bool) -> Known | None:
    """The folder's live UIDLs; None when the folder is missing or the full backup has work in it."""
    row = db.execute(FOLDER, (account_id, folder)).fetchone()
    if row is None or not row[1] or row[2]:
        return None
    if not dated:
        return Known(folder, [sid for (sid,) in db.execute(KNOWN.format(""), (row[0],))])
    rows = db.execute(KNOWN.format(", fetched_at"), (row[0],)).fetchall()
    return Known(folder, [sid for sid, _ in rows], [when for _, when in rows])


def up_to_date(uidls: list[str] | None, known: Known, delete_before: datetime | None, started: float) -> FolderReport | None:
    """The folder's report when the server's UIDLs (None: it gave none usable) need no work, else None."""
    if uidls is None:
        return None  # no UIDL: messages are told apart by their headers, which only the full backup reads
    # Equal lists are the common case (a server that numbers UIDLs as they sort); else compare sets.
    if uidls != known.ids and set(uidls) != set(known.ids):
        return None  # something new, or something gone from the server (the full backup marks it)
    if delete_before is not None:
        # Every entry is one on the server now: any that is old enough is to be deleted.
        dates = known.first_seen if known.first_seen is not None else [None] * len(known.ids)
        if any(_owed(when, delete_before) for when in dates):
            return None
    return FolderReport(name=known.folder, elapsed=time.monotonic() - started)


def _owed(first_seen: str | None, delete_before: datetime) -> bool:
    """Whether an archived message first downloaded at first_seen is to be deleted now."""
    try:
        return first_seen is None or datetime.fromisoformat(first_seen) <= delete_before
    except (TypeError, ValueError):
        return True  # cannot tell: the full backup decides
