"""Archive stores: where message bytes live. The catalog lives beside them.

Adding a store means adding one module with a class that fits `Store`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from ..catalog import Catalog
from ..errors import UsageError
from ..model import ArchivedFolder, Folder, Message


class Store(Protocol):
    kind: str
    url: str
    catalog: Catalog

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

    def close(self) -> None: ...


def open_store(url: str, *, create: bool = True) -> Store:
    """Open the archive named by `url`: maildir:DIR, mbox:DIR, a .sqlite/.db path or a SQLAlchemy URL."""
    from .maildir import MaildirStore
    from .mbox import MboxStore
    from .sql import SqlStore

    if url.startswith("maildir:"):
        return MaildirStore(url[len("maildir:") :], create=create)
    if url.startswith("mbox:"):
        return MboxStore(url[len("mbox:") :], create=create)
    if "://" in url or url.endswith((".sqlite", ".db", ".sqlite3")):
        return SqlStore(url, create=create)
    raise UsageError(
        f"unknown archive {url!r}: use maildir:DIR, mbox:DIR, a path ending in .sqlite or .db, "
        "or a SQLAlchemy URL such as postgresql://user@host/db"
    )
