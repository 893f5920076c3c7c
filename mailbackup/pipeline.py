"""Backup orchestration: source -> store -> catalog, reporting progress through a callback.

Per batch: fetch, write the bytes durably (store.put), then commit the catalog
rows. The folder's checkpoint (UIDVALIDITY, HIGHESTMODSEQ) moves last.
"""

from __future__ import annotations

import fnmatch
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import ServerError
from .model import ArchivedFolder, Folder, FolderReport, Message, Summary
from .net import parse_url
from .sources.imap import ImapSource
from .stores import Store, open_store


class Progress:
    """Receives progress; the CLI draws bars from it. Every method is optional."""

    def plan(self, folders: int) -> None: ...
    def folder_started(self, name: str, messages: int, size: int) -> None: ...
    def stored(self, messages: int, size: int) -> None: ...
    def folder_done(self, report: FolderReport) -> None: ...


@dataclass(frozen=True)
class BackupOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    no_tls: bool = False
    ca_file: str | None = None
    timeout: float = 120.0
    batch_messages: int = 200
    batch_bytes: int = 16 << 20
    flag_chunk: int = 2000


def wanted(folder: Folder, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Match globs against the server's name and its '/'-joined form, case-sensitively."""
    names = {folder.name, "/".join(folder.parts)}

    def hit(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


def diff_sorted(server: Sequence[int], known: Sequence[int]) -> tuple[array[int], array[int]]:
    """Walk two ascending UID lists: (on the server only, in the archive only)."""
    new, gone = array("q"), array("q")
    i = j = 0
    while i < len(server) and j < len(known):
        if server[i] == known[j]:
            i += 1
            j += 1
        elif server[i] < known[j]:
            new.append(server[i])
            i += 1
        else:
            gone.append(known[j])
            j += 1
    new.extend(server[i:])
    gone.extend(known[j:])
    return new, gone


def batches(uids: Sequence[int], sizes: dict[int, int], max_messages: int, max_bytes: int) -> Iterator[list[int]]:
    """Group UIDs so a batch holds at most max_messages, or max_bytes unless one message is bigger."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= max_messages or total + size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class _Tally:
    new: int = 0
    bytes: int = 0
    flags_updated: int = 0
    gone: int = 0
    adopted: int = 0
    failed: list[str] = field(default_factory=list)

    def report(self, name: str) -> FolderReport:
        return FolderReport(
            name=name,
            new=self.new,
            bytes=self.bytes,
            flags_updated=self.flags_updated,
            gone=self.gone,
            adopted=self.adopted,
            failed=tuple(self.failed),
        )


class FolderSync:
    """Bring one archived folder up to date with the selected server folder."""

    def __init__(self, source: ImapSource, store: Store, folder: Folder, options: BackupOptions, progress: Progress):
        self.source = source
        self.store = store
        self.catalog = store.catalog
        self.folder = folder
        self.options = options
        self.progress = progress
        self.tally = _Tally()

    def run(self) -> FolderReport:
        state = self.source.examine(self.folder)
        archived = self.catalog.ensure_folder(self.folder, self.store.folder_path(self.folder))
        validity = state.uid_validity
        # Entries under another UIDVALIDITY: the folder was reset, or a rescan was cut short.
        rescan = self.catalog.has_stale(archived.id, validity)
        server = self.source.uids() if state.exists else array("q")
        known = self.catalog.live_uids(archived.id, validity)
        new, gone = diff_sorted(server, known)
        if len(known) > len(gone):
            self.sync_flags(archived, validity, state.highest_modseq, server)
        if gone:
            self.catalog.mark_gone(archived.id, validity, gone)
            self.tally.gone += len(gone)
        self.fetch_new(archived, validity, new, rescan)
        if rescan and not self.tally.failed:
            self.tally.gone += self.catalog.mark_stale_gone(archived.id, validity)
        self.catalog.set_folder_state(archived.id, validity, state.highest_modseq)
        return self.tally.report(self.folder.name)

    def sync_flags(self, archived: ArchivedFolder, validity: int, modseq: int | None, server: Sequence[int]) -> None:
        if modseq is not None and archived.highest_modseq is not None:
            if modseq == archived.highest_modseq:
                return
            changed = self.source.changed_flags(archived.highest_modseq)
            uids = sorted(changed)
            for part in chunks(uids, self.options.flag_chunk):
                self.apply_flags(archived, validity, {u: changed[u] for u in part})
            return
        for part in chunks(server, self.options.flag_chunk):
            self.apply_flags(archived, validity, self.source.flags(part))

    def apply_flags(self, archived: ArchivedFolder, validity: int, flags: dict[int, tuple[str, ...]]) -> None:
        if not flags:
            return
        entries = self.catalog.entries_for_uids(archived.id, validity, sorted(flags))
        changes = []
        for entry in entries:
            now = flags.get(entry.uid or 0)
            if now is not None and set(now) != set(entry.flags):
                changes.append((entry.id, now, self.store.set_flags(entry.location, now)))
        self.catalog.update_flags(changes)
        self.tally.flags_updated += len(changes)

    def fetch_new(self, archived: ArchivedFolder, validity: int, new: Sequence[int], rescan: bool) -> None:
        if not new:
            return
        sizes: dict[int, int] = {}
        for part in chunks(new, 5000):
            sizes.update(self.source.sizes(part))
        self.progress.folder_started(self.folder.name, len(new), sum(sizes.values()))
        for batch in batches(new, sizes, self.options.batch_messages, self.options.batch_bytes):
            try:
                messages, missing = self.source.fetch(batch)
            except ServerError as exc:
                self.tally.failed.extend(f"UID {uid}: {exc}" for uid in batch)
                continue
            # No body for a UID that was listed: expunged meanwhile, or the server refused it.
            self.tally.failed.extend(f"UID {uid}: server sent no body" for uid in missing if uid in sizes)
            self.store_batch(archived, validity, messages, rescan)
            self.progress.stored(len(messages), sum(m.size for m in messages))

    def store_batch(self, archived: ArchivedFolder, validity: int, messages: list[Message], rescan: bool) -> None:
        fresh = []
        for message in messages:
            stale = self.catalog.stale_entry(archived.id, message.sha256, validity) if rescan else None
            if stale is None:
                fresh.append(message)
                continue
            location = self.store.set_flags(stale.location, message.flags)
            self.catalog.rekey(stale.id, message, validity, location)
            self.tally.adopted += 1
        if not fresh:
            return
        locations = self.store.put(archived, fresh)
        self.catalog.add(archived.id, validity, list(zip(fresh, locations)))
        self.tally.new += len(fresh)
        self.tally.bytes += sum(m.size for m in fresh)


def backup(
    source_url: str,
    archive: str,
    *,
    password: str,
    options: BackupOptions = BackupOptions(),
    progress: Progress | None = None,
) -> Summary:
    """Back up every wanted folder of an IMAP account into the archive."""
    progress = progress or Progress()
    started = time.monotonic()
    endpoint = parse_url(source_url, no_tls=options.no_tls)
    store = open_store(archive)
    reports: list[FolderReport] = []
    try:
        source = ImapSource.connect(endpoint, password, ca_file=options.ca_file, timeout=options.timeout)
        try:
            folders = source.folders()
            chosen = [f for f in folders if wanted(f, options.include, options.exclude)]
            progress.plan(len(chosen))
            for folder in chosen:
                if not folder.selectable:
                    report = FolderReport(name=folder.name, skipped="not selectable")
                else:
                    try:
                        report = FolderSync(source, store, folder, options, progress).run()
                    except ServerError as exc:
                        report = FolderReport(name=folder.name, failed=(str(exc),))
                reports.append(report)
                progress.folder_done(report)
        finally:
            source.close()
    finally:
        store.close()
    return Summary(str(endpoint), store.url, tuple(reports), time.monotonic() - started)


def archive_stats(archive: str) -> list[tuple[ArchivedFolder, int, int, int]]:
    """Per folder: (folder, messages, bytes, gone) for `mailbackup ls`."""
    store = open_store(archive, create=False)
    try:
        return store.catalog.stats()
    finally:
        store.close()

