"""Rebuilding a lost or damaged catalog from what the store itself holds.

Maildir file names carry the SHA-256 and the flags, an mbox is rescanned (its From
lines carry the SHA-256), and SQL blobs are rehashed. Folders, flags and dates come
back as far as the store keeps them; UIDs do not, so the rebuilt entries carry none
and the next backup claims each one by SHA-256 instead of storing it again.
A damaged catalog file is renamed, never deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from . import search
from .errors import CatalogDamaged, MailbackupError
from .stores import Recovered, Store, open_store, resolve

log = logging.getLogger("mailbackup")

BATCH = 500


@dataclass(frozen=True)
class RepairSummary:
    archive: str
    folders: int  # folders that got entries back
    messages: int  # entries added
    bytes: int
    set_aside: str | None  # where the damaged catalog went, if it was set aside
    indexed: int  # messages put back into the search index
    elapsed: float

    def as_dict(self) -> dict[str, object]:
        return {
            "archive": self.archive,
            "folders": self.folders,
            "messages": self.messages,
            "bytes": self.bytes,
            "set_aside": self.set_aside,
            "indexed": self.indexed,
            "elapsed": round(self.elapsed, 3),
        }


def repair(archive: str, *, mailbox: str | None = None) -> RepairSummary:
    """Give every message the store holds and the catalog lacks a catalog entry; rebuild a damaged catalog."""
    started = time.monotonic()
    set_aside = None
    store = _open_sound(archive, mailbox)
    if store is None:
        cls, where = resolve(archive)
        set_aside = cls.set_catalog_aside(where)
        store = open_store(archive, mode="write", account=mailbox, check=False)
    try:
        with store.lock():
            folders, count, size = adopt(store)
    finally:
        store.close()
    indexed = 0
    if count:
        try:
            indexed = search.reindex(archive).indexed
        except MailbackupError as exc:  # PostgreSQL has no index; anything else is for 'reindex'
            log.info("search index not rebuilt: %s", exc)
    return RepairSummary(store.url, folders, count, size, set_aside, indexed, time.monotonic() - started)


def _open_sound(archive: str, mailbox: str | None) -> Store | None:
    """The archive opened for writing, or None when its catalog is damaged."""
    try:
        store = open_store(archive, mode="write", account=mailbox, check=False)
    except CatalogDamaged:
        return None
    if store.catalog.sound():
        return store
    store.close()
    return None


def adopt(store: Store) -> tuple[int, int, int]:
    """Add an entry for every stored message no entry accounts for; returns (folders, messages, bytes)."""
    catalog = store.catalog
    touched: set[int] = set()
    count = size = 0
    pending: dict[int, list[tuple[str, int, tuple[str, ...], datetime | None, datetime | None, str]]] = {}
    folder_ids: dict[str, int] = {}
    for found in store.recover():
        if found.path not in folder_ids:
            # A folder the catalog still knows keeps its name; only a lost one gets a name from its path.
            archived = catalog.folder_at(found.path) or catalog.ensure_folder(found.folder, found.path)
            folder_ids[found.path] = archived.id
        folder_id = folder_ids[found.path]
        if catalog.has_location_prefix(folder_id, found.known_by):
            continue
        pending.setdefault(folder_id, []).append(_row(found))
        touched.add(folder_id)
        count += 1
        size += found.size
        if len(pending[folder_id]) >= BATCH:
            catalog.add_found(folder_id, pending.pop(folder_id))
    for folder_id, rows in pending.items():
        catalog.add_found(folder_id, rows)
    return len(touched), count, size


def _row(found: Recovered) -> tuple[str, int, tuple[str, ...], datetime | None, datetime | None, str]:
    return (found.sha256, found.size, found.flags, found.internal_date, found.archived_at, found.location)
