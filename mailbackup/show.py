"""Reading an archive back: its listing (ls), and one message by catalog entry id or SHA-256 prefix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from .errors import ArchiveCorrupt, StoreError, UsageError
from .model import ArchivedFolder, Entry
from .stores import Store, open_store
from .stores.codec import content_name


@dataclass(frozen=True)
class Shown:
    entry: Entry
    folder: str
    raw: bytes


def find_entry(store: Store, ident: str) -> Entry:
    """An all-digit ID is a catalog entry id; otherwise (or if no such id) a SHA-256 prefix."""
    ident = ident.strip().lower()
    if ident.isdigit() and len(ident) < 19:
        entry = store.catalog.entry(int(ident))
        if entry is not None:
            return entry
    if len(ident) < 4 or any(c not in "0123456789abcdef" for c in ident):
        raise UsageError(f"no message {ident!r}: give an id from 'mailbackup search' or at least 4 hex digits of a SHA-256")
    found = store.catalog.entries_with_sha256_prefix(ident)
    if not found:
        raise UsageError(f"no message with id or SHA-256 prefix {ident!r} in {store.url}")
    contents = {e.sha256 for e in found}
    if len(contents) > 1:
        raise UsageError(f"SHA-256 prefix {ident!r} is ambiguous ({len(contents)}+ messages); give more digits")
    live = [e for e in found if not e.gone]
    return (live or found)[0]


@dataclass(frozen=True)
class FolderListing:
    account: str  # user@host, or '' for an archive that has not recorded whose mail it holds
    folder: ArchivedFolder
    messages: int
    bytes: int
    gone: int


def listing(archive: str, *, mailbox: str | None = None, as_of: datetime | None = None) -> list[FolderListing]:
    """Per account and folder: live messages, bytes, gone messages; with as_of, as the archive stood then.

    Without mailbox, every account the archive holds is listed.
    """
    store = open_store(archive, mode="read", account=mailbox)
    try:
        names = [mailbox] if mailbox is not None else store.catalog.accounts()
        rows = []
        for name in names:
            if mailbox is None and len(names) > 1:
                store.catalog.choose_account(name, claim=False, several=True)
            for folder, count, size, gone in store.catalog.stats(as_of=as_of):
                rows.append(FolderListing(store.catalog.account or name or "", folder, count, size, gone))
        return rows
    finally:
        store.close()


def show(archive: str, ident: str, *, mailbox: str | None = None) -> Shown:
    """The original bytes of one message, checked against its recorded SHA-256."""
    store = open_store(archive, mode="read", account=mailbox)
    try:
        entry = find_entry(store, ident)
        raw = store.get(entry.location)
        folder = next(f.name for f in store.catalog.folders() if f.id == entry.folder_id)
        digest = content_name(store, raw)
    finally:
        store.close()
    if digest != entry.sha256:
        raise ArchiveCorrupt(f"message {entry.id} in {folder} does not match its SHA-256; run 'mailbackup verify'")
    return Shown(entry, folder, raw)


def write_eml(path: str, raw: bytes) -> None:
    """Write raw to path with mode 0600 (also when the file existed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(raw)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
