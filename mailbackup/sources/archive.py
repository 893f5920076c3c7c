"""An archive read as a source: restore is a transfer from here to a target.

Folders and messages come from the catalog, bytes from the store; nothing is
written. Ids are catalog entry ids; the checkpoint has no validity, because an
entry id never changes meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import cast

from ..errors import StoreError, UsageError
from ..model import Entry, Folder, Message
from ..stores import Store
from ..stores.codec import encrypted
from . import LIST_SLICE, Checkpoint, Fetched, Listed, OpenFolder, SourceId, Traits

ARCHIVE = Traits("archive", many_folders=True, flags=False, resumes=False, deletes_at_close=False, exact_sizes=True)


class ArchiveSource:
    """The folders of an open archive, each message an entry chosen by `select`.

    A folder is offered if `select` keeps one of its entries, or if it holds none
    at all (an empty folder is restored as an empty folder).
    """

    traits = ARCHIVE

    def __init__(self, store: Store, select: Callable[[Entry], bool] = lambda entry: not entry.gone) -> None:
        self.store = store
        self.select = select
        self.identity = store.url
        self.ids: dict[str, int] = {}  # folder name -> catalog folder id
        self.entries: dict[SourceId, Entry] = {}  # of the open folder
        self.sealed = encrypted(store)
        self.hidden: frozenset[str] = frozenset()  # folders not offered (Gmail label views to a Gmail target)

    def __str__(self) -> str:
        return self.store.url

    def folders(self) -> list[Folder]:
        out = []
        for archived in self.store.catalog.folders():
            entries = cast(Generator[Entry, None, None], self.store.catalog.entries(archived.id))
            try:
                first = next(entries, None)
                offered = first is None or self.select(first) or any(self.select(e) for e in entries)
            finally:
                entries.close()  # hand the catalog connection back now, not at garbage collection
            if offered and archived.name not in self.hidden:
                self.ids[archived.name] = archived.id
                out.append(Folder(archived.name, archived.delimiter, archived.attributes))
        return out

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        if writable:
            raise UsageError("an archive is read as a source, never changed")
        if folder.name not in self.ids:
            self.folders()
        entries = self.store.catalog.entries(self.ids[folder.name])
        self.entries = {e.id: e for e in entries if self.select(e)}
        return OpenFolder(folder, Checkpoint(validity=None), ids=sorted(self.entries))

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        for start in range(0, len(ids), LIST_SLICE):
            yield [Listed(i, self.entries[i].size) for i in ids[start : start + LIST_SLICE] if i in self.entries]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        for item in batch:
            entry = self.entries[item.id]
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
        return [i for i, e in self.entries.items() if e.internal_date is not None and e.internal_date < cutoff]

    def delete(self, ids: Sequence[SourceId]) -> None:
        raise UsageError("an archive is read as a source, never changed")

    def close(self, *, commit: bool = True) -> None:
        pass  # the store belongs to the caller
