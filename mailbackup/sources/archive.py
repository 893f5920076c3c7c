"""An archive read as a source: restore is a transfer from here to a target.

Folders and messages come from the catalog, bytes from the store; nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import StoreError
from ..model import ArchivedFolder, Entry, Folder, Message
from ..stores import Store
from ..transfer import Fetched, Listing


class ArchiveSource:
    """The folders of an open archive, each message an entry chosen by `select`."""

    def __init__(self, store: Store, select: Callable[[Entry], bool]) -> None:
        self.store = store
        self.select = select
        self.identity = store.url
        self.archived: dict[str, ArchivedFolder] = {}
        self.entries: dict[str, Entry] = {}

    def folders(self) -> list[Folder]:
        self.archived = {f.name: f for f in self.store.catalog.folders()}
        return [Folder(f.name, f.delimiter, f.attributes) for f in self.archived.values()]

    def relative(self, folder: Folder) -> Folder:
        return folder  # an archive keeps the names the server used, without its namespace

    def open(self, folder: Folder) -> Listing:
        every = list(self.store.catalog.entries(self.archived[folder.name].id))
        self.entries = {str(e.id): e for e in every if self.select(e)}
        return Listing(items=list(self.entries), empty=not every)

    def sizes(self, items: Sequence[str]) -> dict[str, int]:
        return {item: self.entries[item].size for item in items}

    def fetch(self, items: Sequence[str], sizes: dict[str, int]) -> Fetched:
        messages, failed = [], []
        for item in items:
            entry = self.entries[item]
            try:
                raw = self.store.get(entry.location)
            except StoreError as exc:
                failed.append(f"{item}: {exc}")
                continue
            messages.append((item, Message(raw=raw, flags=entry.flags, internal_date=entry.internal_date, sha256=entry.sha256)))
        return Fetched(messages, failed)

    def flags(self, items: Sequence[str]) -> None:
        return None  # an archive's flags are what was restored; nothing changes under it

    def close(self) -> None:
        pass  # the store belongs to the caller
