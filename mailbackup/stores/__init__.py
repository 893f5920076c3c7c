"""Archive stores: where message bytes live. The catalog lives beside them.

Adding a store means adding one module with a class that fits `Store` and one
line in REGISTRY.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from .. import keys
from ..catalog import Catalog
from ..errors import CatalogDamaged, UsageError, setting
from ..model import ArchivedFolder, Folder, Message
from .blobs import Bucket

Mode = Literal["read", "write"]


@dataclass(frozen=True)
class Finding:
    """Something in the store that verify reports: where (folder name, if known) and what."""

    folder: str | None
    detail: str


@dataclass(frozen=True)
class Recovered:
    """One message found in the store by repair, with what the store itself keeps about it."""

    folder: Folder
    path: str  # the folder's place in the store (ArchivedFolder.path)
    location: str
    known_by: str  # any catalog entry for this copy has a location starting so (flags may have moved on)
    sha256: str
    size: int
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    archived_at: datetime | None = None  # when the store got it, if it keeps that (a file's mtime)


class Store(Protocol):
    kind: str
    url: str
    catalog: Catalog
    writable: bool

    @staticmethod
    def accepts(url: str) -> str | None:
        """The store's own address inside url (a directory, a database URL), or None if url is not for this store."""

    def folder_path(self, folder: Folder) -> str:
        """Where this folder lives inside the archive (never outside it)."""

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        """Write messages durably and return each one's location; the catalog is untouched."""

    def get(self, location: str) -> bytes:
        """The original bytes of a stored message."""

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        """Show new flags in the store where the format can; return the new location."""

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive for one writing run; raises ArchiveLocked at once when taken."""

    def holds_messages(self) -> bool:
        """True if the store holds any message bytes, whatever the catalog says."""

    def unrecorded(self) -> Iterator[Finding]:
        """Bytes in the store that no catalog entry accounts for."""

    def duplicates(self) -> Iterator[Finding]:
        """Second copies of one message in one folder that the store itself can see."""

    def recover(self) -> Iterator[Recovered]:
        """Every message the store holds, as far as it can tell without a catalog (for repair)."""

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        """Move a damaged catalog out of the way (repair then builds a new one); return where it went."""

    def close(self) -> None: ...


STREAM_CHUNK = 1 << 20


def read_chunks(store: Store, location: str) -> Iterator[bytes]:
    """A stored message's original bytes in pieces, never whole in memory where the store can stream
    (an optional `stream(location)` method); from get() otherwise. Joined, they equal get(location)."""
    stream = getattr(store, "stream", None)
    if stream is not None:
        yield from stream(location)
        return
    raw = store.get(location)
    for start in range(0, len(raw), STREAM_CHUNK):
        yield raw[start : start + STREAM_CHUNK]


# kind -> "module:class"; the first store whose accepts() takes the URL opens it.
REGISTRY: dict[str, str] = {
    "maildir": "mailbackup.stores.maildir:MaildirStore",
    "mbox": "mailbackup.stores.mbox:MboxStore",
    "sql": "mailbackup.stores.sql:SqlStore",
}


def store_class(name: str) -> Any:
    """The class a registry entry names, imported on first use (a store's library loads only when needed)."""
    module, _, cls = name.partition(":")
    return getattr(importlib.import_module(module), cls)


def resolve(url: str) -> tuple[Any, str]:
    """The store class for url and the address it takes."""
    for name in REGISTRY.values():
        cls = store_class(name)
        where = cls.accepts(url)
        if where is not None:
            return cls, where
    raise UsageError(
        f"unknown archive {url!r}: use maildir:DIR, mbox:DIR, a path ending in .sqlite or .db, "
        "or a SQLAlchemy URL such as postgresql://user@host/db"
    )


def open_store(
    url: str,
    *,
    mode: Mode = "read",
    account: str | None = None,
    create: bool | None = None,
    check: bool = True,
    blobs: Bucket | None = None,
    key_ring: keys.KeyRing | None = None,
) -> Store:
    """Open the archive named by `url`: maildir:DIR, mbox:DIR, a .sqlite/.db path or a SQLAlchemy URL.

    mode="read" changes nothing on disk and refuses what is not an archive; "write"
    creates the archive if needed and says at once if it cannot be written.
    account ("user@host") scopes the catalog: a writer records it and a Maildir or
    mbox archive refuses a second one; a reader picks it among several.
    check=False lets repair open an archive whose catalog is lost.
    blobs puts a new SQL archive's message bytes in a bucket; the archive records it.
    key_ring opens an encrypted archive with these keys, not the context's (a server's worker threads).
    `create` is the old spelling of mode (True: write, False: read), kept while callers move.
    """
    if create is not None:
        mode = "write" if create else "read"
    cls, where = resolve(url)
    if blobs is not None and not getattr(cls, "external_blobs", False):
        raise UsageError(f"{setting('blobs')} is for SQL archives (a .sqlite path or a database URL)")
    extra = {"blobs": blobs} if blobs is not None else {}
    with keys.using(key_ring) if key_ring is not None else nullcontext():
        store: Store = cls(where, mode=mode, account=account, **extra)
    try:
        if mode == "write" and not hasattr(store, "codec") and (key_ring.source if key_ring else keys.current()).protection != keys.Protection():
            raise UsageError(f"{setting('encrypt')}, {setting('compress')} and {setting('recipient')} need a SQL archive (.sqlite or a database URL), not {url}")
        if check and store.catalog.lost() and store.holds_messages():
            raise CatalogDamaged(
                f"the catalog of {store.url} lists no messages but the store holds some; "
                f"run 'mailbackup repair {url}' to rebuild it"
            )
    except BaseException:
        store.close()
        raise
    return store
