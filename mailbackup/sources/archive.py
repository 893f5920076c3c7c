"""An archive read as a source: restore is a transfer from here to a target.

Folders and messages come from the catalog, bytes from the store; nothing is
written. Ids are catalog entry ids; the checkpoint has no validity, because an
entry id never changes meaning.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from datetime import datetime
from typing import cast

from ..catalog import Selection
from ..errors import StoreError, UsageError
from ..model import Entry, Folder, Message
from ..stores import Store
from ..stores.codec import encrypted
from . import LIST_SLICE, Checkpoint, Fetched, Listed, OpenFolder, SourceId, Traits

ARCHIVE = Traits("archive", many_folders=True, flags=False, resumes=False, deletes_at_close=False, exact_sizes=True)


class ArchiveSource:
    """The folders of an open archive, each message an entry the catalog picks for `selection`.

    A folder is offered if the selection keeps one of its entries, or if it holds none
    at all (an empty folder is restored as an empty folder). Only the open folder's
    entry ids are held; entries are read from the catalog a listing slice or a batch
    at a time, so memory does not grow with the folder.
    """

    traits = ARCHIVE

    def __init__(self, store: Store, selection: Selection | None = None) -> None:
        self.store = store
        self.selection = selection or Selection()  # live entries only
        self.identity = store.url
        self.ids: dict[str, int] = {}  # folder name -> catalog folder id
        self.folder_id: int | None = None  # the open folder's
        self.sealed = encrypted(store)
        self.hidden: frozenset[str] = frozenset()  # folders not offered (Gmail label views to a Gmail target)

    def __str__(self) -> str:
        return self.store.url

    def folders(self) -> list[Folder]:
        catalog = self.store.catalog
        out = []
        for archived in catalog.folders():
            if archived.name in self.hidden:
                continue
            # Closed at once: the catalog connection goes back now, not at garbage collection.
            with closing(catalog.selected_entries(archived.id, self.selection)) as entries:
                picked = next(entries, None) is not None
            if picked or catalog.count(archived.id) == 0:
                self.ids[archived.name] = archived.id
                out.append(Folder(archived.name, archived.delimiter, archived.attributes))
        return out

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        if writable:
            raise UsageError("an archive is read as a source, never changed")
        if folder.name not in self.ids:
            self.folders()
        self.folder_id = self.ids[folder.name]
        ids = self.store.catalog.selected_ids(self.folder_id, self.selection)
        return OpenFolder(folder, Checkpoint(validity=None), ids=ids)

    def _entries(self, ids: Sequence[SourceId]) -> Iterator[Entry]:
        assert self.folder_id is not None, "open a folder first"
        return self.store.catalog.selected_entries(self.folder_id, self.selection, cast(Sequence[int], ids))

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        for start in range(0, len(ids), LIST_SLICE):
            yield [Listed(e.id, e.size) for e in self._entries(ids[start : start + LIST_SLICE])]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        entries = {e.id: e for e in self._entries([item.id for item in batch])}
        for item in batch:
            entry = entries.get(cast(int, item.id))
            if entry is None:  # not in the archive's selection (any more)
                yield Fetched(item.id, None, "no longer in the archive")
                continue
            try:
                raw = self.store.get(entry.location)
            except StoreError as exc:
                yield Fetched(item.id, None, str(exc))
                continue
            # The recorded SHA-256 is the message's identity: restore sends what was archived.
            # An encrypted archive records a keyed MAC instead: the target is asked about the plain hash.
            sha256 = "" if self.sealed else entry.sha256
            yield Fetched(item.id, Message(raw=raw, flags=entry.flags, internal_date=entry.internal_date, sha256=sha256))

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        return iter(())  # nothing changes under an archive being read

    def before(self, cutoff: datetime) -> Sequence[SourceId]:
        assert self.folder_id is not None, "open a folder first"
        entries = self.store.catalog.selected_entries(self.folder_id, self.selection)
        return [e.id for e in entries if e.internal_date is not None and e.internal_date < cutoff]

    def delete(self, ids: Sequence[SourceId]) -> None:
        raise UsageError("an archive is read as a source, never changed")

    def close(self, *, commit: bool = True) -> None:
        pass  # the store belongs to the caller
