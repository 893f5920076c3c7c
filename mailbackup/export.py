"""Converting an archive into another store, catalog included.

Bytes go through the destination's `put` and the catalog rows keep every column
(UID, UIDVALIDITY, flags, dates, fetched_at, gone state), so the copy behaves as
if it had been backed up directly: an incremental backup into it fetches nothing new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from . import search
from .catalog import EntryRecord
from .errors import ArchiveCorrupt, UsageError
from .model import ArchivedFolder, Folder, Message
from .stores import Store, open_store
from .stores.codec import content_name

BATCH_MESSAGES = 200
BATCH_BYTES = 16 << 20


@dataclass(frozen=True)
class ExportSummary:
    source: str
    destination: str
    folders: int
    messages: int
    bytes: int
    elapsed: float

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "folders": self.folders,
            "messages": self.messages,
            "bytes": self.bytes,
            "elapsed": round(self.elapsed, 3),
        }


def export(
    archive: str,
    destination: str,
    *,
    progress: Callable[[int, int], None] = lambda messages, size: None,
    mailbox: str | None = None,
) -> ExportSummary:
    """Copy every folder and entry of `archive` (of one account) into a new, empty `destination`."""
    started = time.monotonic()
    source = open_store(archive, mode="read", account=mailbox)
    try:
        # The copy holds the same account's mail, under the same name when the source knows it.
        target = open_store(destination, mode="write", account=source.catalog.account or None)
        try:
            if target.url == source.url:
                raise UsageError("export needs a destination other than the archive itself")
            if target.catalog.folders():
                raise UsageError(f"{target.url} already holds an archive; export into a new, empty one")
            count = size = 0
            folders = source.catalog.folders()
            with target.lock():
                for folder in folders:
                    copied, copied_bytes = copy_folder(source, target, folder, progress)
                    count += copied
                    size += copied_bytes
        finally:
            target.close()
    finally:
        source.close()
    return ExportSummary(source.url, target.url, len(folders), count, size, time.monotonic() - started)


def copy_folder(source: Store, target: Store, folder: ArchivedFolder, progress: Callable[[int, int], None]) -> tuple[int, int]:
    spec = Folder(folder.name, folder.delimiter, folder.attributes)
    copy = target.catalog.ensure_folder(spec, target.folder_path(spec))
    count = size = 0
    batch: list[tuple[EntryRecord, Message]] = []
    batch_bytes = 0
    for record in source.catalog.records(folder.id):
        raw = source.get(record.location)
        if content_name(source, raw) != record.sha256:
            raise ArchiveCorrupt(
                f"message {record.id} in {folder.name} does not match its SHA-256; "
                "run 'mailbackup verify' before exporting"
            )
        record = replace(record, sha256=content_name(target, raw))  # each archive names contents its own way
        batch.append((record, as_message(record, raw)))
        batch_bytes += len(raw)
        if len(batch) >= BATCH_MESSAGES or batch_bytes >= BATCH_BYTES:
            commit_copies(target, copy, batch)
            progress(len(batch), batch_bytes)
            count, size = count + len(batch), size + batch_bytes
            batch, batch_bytes = [], 0
    commit_copies(target, copy, batch)
    progress(len(batch), batch_bytes)
    count, size = count + len(batch), size + batch_bytes
    # The checkpoint moves last, as in a backup.
    target.catalog.set_folder_state(copy.id, folder.uid_validity, folder.highest_modseq)
    return count, size


def as_message(record: EntryRecord, raw: bytes) -> Message:
    return Message(
        raw=raw,
        flags=tuple(record.flags.split()),
        internal_date=datetime.fromisoformat(record.internal_date) if record.internal_date else None,
        uid=record.uid,
        source_id=record.source_id,
        date_source=record.date_source,
        sha256=record.sha256,
    )


def commit_copies(target: Store, folder: ArchivedFolder, batch: list[tuple[EntryRecord, Message]]) -> None:
    """Bytes durable in the store first, then their catalog rows, then the search index."""
    if not batch:
        return
    copied = [message for _, message in batch]
    locations = target.put(folder, copied)
    target.catalog.import_records(folder.id, [(record, location) for (record, _), location in zip(batch, locations)])
    search.index_committed(target, copied)
