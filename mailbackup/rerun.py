"""A rerun with nothing new, answered from the catalog's checkpoints and one STATUS per folder.

A full backup opens the store (SQLAlchemy, the store's own checks), EXAMINEs every
folder and lists its UIDs before it can tell that there is nothing to do. With
CONDSTORE the server says so more cheaply: any append, expunge or flag change raises
a folder's HIGHESTMODSEQ. A folder is up to date when its UIDVALIDITY and
HIGHESTMODSEQ equal the checkpoint the last run wrote (only after it had stored
everything it listed), its message count equals the catalog's live entries (so no
message failed last time) and no entry waits to be adopted from an older UIDVALIDITY.

This module reads those checkpoints with the stdlib's sqlite3, read-only, from the
SQLite catalog of a Maildir, mbox or .sqlite archive, and asks STATUS. Whatever it
cannot vouch for (another store, an encrypted archive, a server without CONDSTORE,
Gmail, one folder that differs) goes to the full backup, which gets the open
connection. Nothing here imports SQLAlchemy: a rerun with nothing new never loads it.
A POP3 maildrop is checked the same way with one UIDL instead (rerun_pop3.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from .errors import ConnectionLost, ServerError
from .model import Folder, FolderReport
from .rerun_pop3 import Known, read_known, up_to_date
from .sources import IMAP, POP3, Connect, Source, imap_source, open_source, source_kind

# Mirrors of catalog.py's (tests/test_rerun.py checks they agree): importing catalog.py
# would load SQLAlchemy, which is what this module exists to avoid.
SCHEMA_VERSION = "3"
RECOVERED_MARK = "$MailbackupRecovered"
CATALOG_DIR = ".mailbackup"

log = logging.getLogger("mailbackup")

T = TypeVar("T")

# Per folder of the account: its checkpoint, its live entries under that UIDVALIDITY,
# its entries with a UID (what a vanished folder would mark gone) and whether an entry
# waits to be adopted by content (another UIDVALIDITY, or rebuilt by repair with no id):
# the same conditions as Catalog.live_uids, mark_folder_gone and has_stale.
FOLDERS = """
    SELECT f.name, f.delimiter, f.attributes, f.uid_validity, f.highest_modseq,
        (SELECT count(*) FROM messages m
            WHERE m.folder_id = f.id AND m.uid_validity = f.uid_validity AND m.gone_at IS NULL),
        (SELECT count(*) FROM messages m
            WHERE m.folder_id = f.id AND m.uid IS NOT NULL AND m.gone_at IS NULL),
        EXISTS (SELECT 1 FROM messages m
            WHERE m.folder_id = f.id AND m.gone_at IS NULL
            AND (m.uid_validity != f.uid_validity OR (m.uid IS NULL AND m.source_id IS NULL)))
    FROM folders f WHERE f.account_id = ?
"""


@dataclass(frozen=True)
class Mark:
    """What the catalog holds about one folder, as far as the rerun check needs."""

    delimiter: str | None
    attributes: str  # sorted and space-separated, as the catalog keeps them
    uid_validity: int | None
    highest_modseq: int | None
    live: int
    keyed: int
    stale: bool


@dataclass(frozen=True)
class Archive:
    """Where a store built on a SQLite catalog keeps it, found without opening the store."""

    url: str  # as the store names itself in a summary
    kind: str  # "maildir", "mbox" or "sql"
    database: Path
    lock: Path  # the file the store's lock() holds
    root: Path | None  # a directory archive's root (its kind and account are recorded in it)


def locate(archive: str) -> Archive | None:
    """The catalog of a Maildir, mbox or SQLite archive, resolved as open_store does; None otherwise."""
    for kind in ("maildir", "mbox"):
        if archive.startswith(kind + ":"):
            root = Path(archive[len(kind) + 1 :]).expanduser().absolute()
            meta = root / CATALOG_DIR
            return Archive(f"{kind}:{root}", kind, meta / "catalog.sqlite", meta / "lock", root)
    if "://" not in archive and archive.endswith((".sqlite", ".db", ".sqlite3")):
        path = Path(archive).expanduser().absolute()
        return Archive(f"sqlite:///{path}", "sql", path, Path(f"{path}.lock"), None)
    return None


def _writable(archive: Archive) -> bool:
    """What a writing open would check first; a read-only archive gets its error from the full backup."""
    paths = [archive.database, archive.database.parent]
    if archive.root is not None:
        paths.append(archive.root)
    return all(os.access(p, os.W_OK) for p in paths)


def _recorded(archive: Archive, account: str) -> bool:
    """A directory archive's kind marker and account file say what a writing open would accept as is."""
    if archive.root is None:
        return True
    try:
        kind = (archive.root / CATALOG_DIR / "kind").read_text().strip()
        held = (archive.root / CATALOG_DIR / "account").read_text().strip()
    except OSError:
        return False
    return kind == archive.kind and held == account


@contextmanager
def opened_catalog(archive: Archive, account: str) -> Iterator[tuple[sqlite3.Connection, int] | None]:
    """The catalog, read-only, with the account's id; None when it is not one a writing open
    would take as it is (the full backup then decides what to do with it)."""
    if not archive.database.is_file() or not _writable(archive) or not _recorded(archive, account):
        yield None
        return
    try:
        # Read-only: no WAL checkpoint at close, nothing created, nothing migrated.
        db = sqlite3.connect(f"{archive.database.as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        yield None
        return
    try:
        yield _account_id(db, archive, account)
    finally:
        db.close()


def _account_id(db: sqlite3.Connection, archive: Archive, account: str) -> tuple[sqlite3.Connection, int] | None:
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # crypt_meta: encrypted or compressed (the full path asks for the passphrase).
        if "crypt_meta" in tables or not {"meta", "accounts", "folders", "messages"} <= tables:
            return None
        settings = dict(db.execute("SELECT key, value FROM meta"))
        # blobs: message bytes in a bucket, which the full path opens and checks.
        if settings.get("schema") != SCHEMA_VERSION or "blobs" in settings:
            return None
        accounts = dict(db.execute("SELECT name, id FROM accounts"))
        if account not in accounts or (archive.root is not None and len(accounts) != 1):
            return None
        if db.execute("SELECT 1 FROM messages LIMIT 1").fetchone() is None:
            return None  # an empty or lost catalog: the full path decides which
        # Repair's homeless entries may be adopted by any folder (the catalog's own test: LIKE).
        recovered = db.execute(
            "SELECT 1 FROM folders WHERE account_id = ? AND attributes LIKE ? LIMIT 1",
            (accounts[account], f"%{RECOVERED_MARK}%"),
        ).fetchone()
        return None if recovered else (db, accounts[account])
    except sqlite3.Error:
        return None


def read_catalog(archive: Archive, account: str, read: Callable[[sqlite3.Connection, int], T | None]) -> T | None:
    """What read(db, account_id) makes of the catalog; None when it is not one a writing open would
    take as it is, or read found something only the full backup can handle."""
    with opened_catalog(archive, account) as opened:
        if opened is None:
            return None
        try:
            return read(*opened)
        except sqlite3.Error:
            return None


def read_marks(archive: Archive, account: str) -> dict[str, Mark] | None:
    """Each folder's mark, by name; None when the catalog is not one a writing open would take as it is."""

    def marks(db: sqlite3.Connection, account_id: int) -> dict[str, Mark]:
        return {
            name: Mark(delimiter, attributes, validity, modseq, live, keyed, bool(stale))
            for name, delimiter, attributes, validity, modseq, live, keyed, stale in db.execute(FOLDERS, (account_id,))
        }

    return read_catalog(archive, account, marks)


def _protection_asked() -> bool:
    """Whether the command asks to encrypt or compress (a writing open then checks the archive)."""
    keys = sys.modules.get("mailbackup.keys")  # unloaded, nobody can have set a key source
    return keys is not None and keys.current().protection != keys.Protection()


@contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """The store's own run lock, if free (when not, the full backup says the archive is busy)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Outcome:
    """Either every folder is up to date (reports), or the full backup goes on, with the
    connection already made (source) if there is one."""

    url: str
    reports: tuple[FolderReport, ...] | None = None
    source: Source | None = None


def check(
    source_url: str,
    archive: str,
    account: str,
    connect: Connect,
    choose: Callable[[list[Folder]], list[Folder]],
    wanted: Callable[[Folder], bool],
    *,
    into: str | None = None,
    delete_before: datetime | None = None,
) -> Outcome | None:
    """Whether a backup of source_url into archive has anything to do; None when this cannot tell
    without connecting (the full backup then does everything).

    For a POP3 maildrop, into names the archive's folder (None: the maildrop's own name) and
    delete_before says which archived messages the delete options send off the server:
    those first downloaded at or before it (None: none).
    """
    traits = source_kind(source_url).traits
    if traits not in (IMAP, POP3) or _protection_asked():
        return None
    located = locate(archive)
    if located is None:
        return None
    with _locked(located.lock) as free:
        if traits == POP3:
            from .sources.pop3 import MAILDROP  # loaded anyway to connect; not for an IMAP rerun

            folder, dated = into or MAILDROP, delete_before is not None
            known = read_catalog(located, account, lambda db, account_id: read_known(db, account_id, folder, dated=dated)) if free else None
            if known is None:
                log.debug("rerun check: the catalog of %s is not one it can vouch for; a full backup", located.url)
                return None
            source = open_source(source_url, connect)
            return _settle(located, source, lambda: _compare_pop3(source, known, delete_before))
        marks = read_marks(located, account) if free else None
        if marks is None:
            log.debug("rerun check: the catalog of %s is not one it can read; a full backup", located.url)
            return None
        source = imap_source(source_url, connect)
        return _settle(located, source, lambda: _compare(source, marks, choose, wanted))


def _settle(located: Archive, source: Source, compare: Callable[[], tuple[FolderReport, ...] | None]) -> Outcome | None:
    """Ask the server; hang up if all is up to date, else hand the connection to the full backup."""
    try:
        reports = compare()
    except ConnectionLost:
        source.close(commit=False)
        return None  # the full backup reconnects, with its retries
    except BaseException:
        source.close(commit=False)
        raise
    if reports is None:
        log.debug("rerun check: something changed on the server; a full backup")
        return Outcome(located.url, source=source)
    try:
        source.close()
    except ConnectionLost:
        return None  # as when the full backup's last command fails: it goes on, with its retries
    return Outcome(located.url, reports=reports)


def _compare_pop3(source: Source, known: Known, delete_before: datetime | None) -> tuple[FolderReport, ...] | None:
    started = time.monotonic()
    uidls = getattr(source, "uidls", None)
    if uidls is None:
        return None
    try:
        report = up_to_date(uidls(), known, delete_before, started)
    except ServerError:
        return None  # the full backup tries again and reports it
    return None if report is None else (report,)


def _compare(
    source: Source,
    marks: dict[str, Mark],
    choose: Callable[[list[Folder]], list[Folder]],
    wanted: Callable[[Folder], bool],
) -> tuple[FolderReport, ...] | None:
    """A report per chosen folder if all are up to date, else None (at the first that is not)."""
    status = getattr(source, "status", None)
    if status is None or not getattr(source, "condstore", False) or getattr(source, "plan", None) is not None:
        return None  # no CONDSTORE, or Gmail (labels are views of All Mail): only the full backup can tell
    listed = source.folders()
    chosen = choose(listed)
    names = {f.name for f in listed}
    for name, mark in marks.items():
        # An archived folder the server no longer lists: the full backup marks its entries gone.
        if mark.uid_validity is not None and name not in names and mark.keyed and wanted(Folder(name, mark.delimiter)):
            return None
    reports = []
    for folder in chosen:
        started = time.monotonic()
        if not folder.selectable:
            reports.append(FolderReport(name=folder.name, skipped="not selectable"))
            continue
        held = marks.get(folder.name)
        try:
            if held is None or not _same(folder, held, status(folder)):
                return None
        except ServerError:
            return None  # the full backup reports the folder's failure
        reports.append(FolderReport(name=folder.name, elapsed=time.monotonic() - started))
    return tuple(reports)


def _same(folder: Folder, mark: Mark, now: dict[str, int | None]) -> bool:
    if mark.stale or mark.highest_modseq is None or now.get("HIGHESTMODSEQ") is None:
        return False
    if (mark.delimiter, mark.attributes) != (folder.delimiter, " ".join(sorted(folder.attributes))):
        return False  # the full backup records the folder's new attributes
    return (
        now.get("UIDVALIDITY") == mark.uid_validity
        and now.get("HIGHESTMODSEQ") == mark.highest_modseq
        and now.get("MESSAGES") == mark.live
    )
