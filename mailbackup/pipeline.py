"""Backup orchestration: source -> store -> catalog, reporting progress through a callback.

Per batch: fetch, write the bytes durably (store.put), then commit the catalog
rows. The folder's checkpoint (UIDVALIDITY, HIGHESTMODSEQ) moves last.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from .errors import ConnectionLost, ServerError, UsageError
from .model import ArchivedFolder, Folder, FolderReport, Message, Summary
from .net import Endpoint, parse_url
from .search import Indexer
from .sources.imap import ImapSource
from .sources.pop3 import Listed, Pop3Source, message_date
from .stores import Store, open_store


log = logging.getLogger("mailbackup")

SIZE_SLICE = 5000
T = TypeVar("T")
R = TypeVar("R")


class Progress:
    """Receives progress; the CLI draws bars from it. Every method is optional."""

    def plan(self, folders: int) -> None: ...
    def folder_started(self, name: str, messages: int, size: int | None) -> None: ...
    def stored(self, messages: int, size: int) -> None: ...
    def folder_done(self, report: FolderReport) -> None: ...


@dataclass(frozen=True)
class BackupOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    no_tls: bool = False
    ca_file: str | None = None
    auth: str = "password"  # or "xoauth2" / "oauthbearer": the secret is then an access token
    index: bool = True  # keep the full-text search index up to date
    timeout: float = 120.0
    retries: int = 3  # reconnects after a dropped connection, with backoff
    retry_delay: float = 2.0
    batch_messages: int = 200
    batch_bytes: int = 12 << 20  # up to three batches are in memory at once (prefetch)
    flag_chunk: int = 2000
    # POP3 only
    into: str | None = None
    delete: bool = False
    delete_older_than: float | None = None  # days since first download


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


def prefetched(items: Iterable[T], fetch: Callable[[T], R]) -> Iterator[tuple[T, Future[R]]]:
    """Yield each item with its fetch, while the next item's fetch already runs.

    The network then works while the store writes; the caller still handles
    batches one at a time, in order. At most two batches are in memory.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        pending: tuple[T, Future[R]] | None = None
        for item in items:
            future = pool.submit(fetch, item)
            if pending is not None:
                yield pending
            pending = (item, future)
        if pending is not None:
            yield pending
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    deleted: int = 0
    failed: list[str] = field(default_factory=list)

    def stored(self, messages: Sequence[Message]) -> None:
        self.new += len(messages)
        self.bytes += sum(m.size for m in messages)

    def report(self, name: str) -> FolderReport:
        return FolderReport(
            name=name,
            new=self.new,
            bytes=self.bytes,
            flags_updated=self.flags_updated,
            gone=self.gone,
            adopted=self.adopted,
            deleted=self.deleted,
            failed=tuple(self.failed),
        )


def commit(
    store: Store, archived: ArchivedFolder, uid_validity: int | None, messages: list[Message], indexer: Indexer | None
) -> None:
    """The one write path: bytes durable in the store first, then their catalog rows."""
    if messages:
        locations = store.put(archived, messages)
        store.catalog.add(archived.id, uid_validity, list(zip(messages, locations)))
        if indexer is not None:
            indexer.add(messages)  # never raises: a stale index only logs a warning


class FolderSync:
    """Bring one archived folder up to date with the selected server folder."""

    def __init__(
        self,
        source: ImapSource,
        store: Store,
        folder: Folder,
        options: BackupOptions,
        progress: Progress,
        indexer: Indexer | None = None,
    ):
        self.source = source
        self.store = store
        self.indexer = indexer
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
        # Sizes are asked for a slice at a time, so memory stays flat however big the folder.
        for start in range(0, len(new), SIZE_SLICE):
            part = new[start : start + SIZE_SLICE]
            sizes = self.source.sizes(part)
            if start == 0:
                whole = len(part) == len(new)
                self.progress.folder_started(self.folder.name, len(new), sum(sizes.values()) if whole else None)
            # A UID without a size was expunged since SEARCH: nothing to back up.
            present = [uid for uid in part if uid in sizes]
            planned = batches(present, sizes, self.options.batch_messages, self.options.batch_bytes)
            for batch, fetched in prefetched(planned, self.source.fetch):
                try:
                    messages, missing = fetched.result()
                except ServerError as exc:
                    self.tally.failed.extend(f"UID {uid}: {exc}" for uid in batch)
                    continue
                self.tally.failed.extend(f"UID {uid}: server sent no body" for uid in missing)
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
        commit(self.store, archived, validity, fresh, self.indexer)
        self.tally.stored(fresh)


class Pop3Sync:
    """Copy a POP3 maildrop into one archive folder; DELE only what is committed."""

    def __init__(
        self, source: Pop3Source, store: Store, options: BackupOptions, progress: Progress, indexer: Indexer | None = None
    ):
        self.source = source
        self.store = store
        self.indexer = indexer
        self.catalog = store.catalog
        self.options = options
        self.progress = progress
        self.tally = _Tally()
        self.notes: list[str] = []

    def run(self) -> FolderReport:
        folder = Folder(self.options.into or "INBOX", "/")
        archived = self.catalog.ensure_folder(folder, self.store.folder_path(folder))
        listing = self.identified(self.source.listing())
        known = self.catalog.source_ids(archived.id)
        rebuilt = self.catalog.has_stale(archived.id, None)  # entries repair rebuilt carry no UIDL
        on_server = {m.uidl for m in listing}
        gone = [i for i in known if i not in on_server]
        if gone:
            self.catalog.mark_gone_ids(archived.id, gone)
            self.tally.gone += len(gone)
        new = [m for m in listing if m.uidl not in known]
        self.progress.folder_started(folder.name, len(new), sum(m.size for m in new))
        sizes = {m.number: m.size for m in new}
        by_number = {m.number: m for m in new}
        for batch in batches([m.number for m in new], sizes, self.options.batch_messages, self.options.batch_bytes):
            messages, stored = [], []
            for listed, outcome in self.source.retrieve_batch([by_number[n] for n in batch]):
                if isinstance(outcome, ServerError):
                    self.tally.failed.append(f"message {listed.number} ({listed.uidl}): {outcome}")
                    continue
                when, how = message_date(outcome)
                messages.append(
                    Message(raw=outcome, internal_date=when or datetime.now(timezone.utc), source_id=listed.uidl, date_source=how)
                )
                stored.append(listed.number)
            messages = self.adopt(archived, messages) if rebuilt else messages
            commit(self.store, archived, None, messages, self.indexer)
            self.tally.stored(messages)
            self.progress.stored(len(messages), sum(m.size for m in messages))
            if self.options.delete or self.options.delete_older_than == 0:
                self.delete(stored)
        self.delete(self.old_enough([m for m in listing if m.uidl in known], known))
        return replace(self.tally.report(folder.name), notes=tuple(self.notes))

    def adopt(self, archived: ArchivedFolder, messages: list[Message]) -> list[Message]:
        """Claim entries rebuilt by repair by SHA-256 instead of storing their messages again."""
        fresh = []
        for message in messages:
            stale = self.catalog.stale_entry(archived.id, message.sha256, None)
            if stale is None:
                fresh.append(message)
                continue
            self.catalog.rekey(stale.id, message, None, stale.location)
            self.tally.adopted += 1
        return fresh

    def identified(self, listing: list[Listed]) -> list[Listed]:
        """Give every message an id: its UIDL, or the documented fallback; drop repeated ids."""
        if any(m.uidl is None for m in listing):
            self.notes.append("server has no UIDL: messages are told apart by SHA-256 of their headers (TOP n 0) plus size")
            listing = [m if m.uidl else replace(m, uidl=self.source.header_id(m)) for m in listing]
        seen: set[str | None] = set()
        unique = []
        for m in listing:
            if m.uidl not in seen:
                seen.add(m.uidl)
                unique.append(m)
        return unique

    def old_enough(self, archived: list[Listed], first_seen: dict[str, str]) -> list[int]:
        """Numbers of already-archived messages that the delete options allow to go."""
        if self.options.delete:
            return [m.number for m in archived]
        if self.options.delete_older_than is None:
            return []
        cutoff = datetime.now(timezone.utc) - timedelta(days=self.options.delete_older_than)
        return [m.number for m in archived if datetime.fromisoformat(first_seen[m.uidl or ""]) <= cutoff]

    def delete(self, numbers: list[int]) -> None:
        for number in numbers:
            self.source.delete(number)
        self.tally.deleted += len(numbers)


def backup_imap(
    endpoint: Endpoint,
    store: Store,
    password: str,
    options: BackupOptions,
    progress: Progress,
    indexer: Indexer | None,
    reports: list[FolderReport],
) -> None:
    """Sync every wanted folder, appending a report per folder (a partial one if the line drops)."""
    source = ImapSource.connect(endpoint, password, ca_file=options.ca_file, timeout=options.timeout, auth=options.auth)
    try:
        listed = source.folders()
        chosen = [f for f in listed if wanted(f, options.include, options.exclude)]
        progress.plan(len(chosen))
        for folder in chosen:
            if not folder.selectable:
                report = FolderReport(name=folder.name, skipped="not selectable")
            else:
                sync = FolderSync(source, store, folder, options, progress, indexer)
                try:
                    report = sync.run()
                except ServerError as exc:
                    report = FolderReport(name=folder.name, failed=(str(exc),))
                except ConnectionLost:
                    reports.append(sync.tally.report(folder.name))  # what it committed still counts
                    raise
            reports.append(report)
            progress.folder_done(report)
        reports.extend(vanished(store, listed, options))
    finally:
        source.close()


def vanished(store: Store, listed: Sequence[Folder], options: BackupOptions) -> list[FolderReport]:
    """Archived IMAP folders the server no longer lists: their messages stay, marked gone."""
    names = {f.name for f in listed}
    reports = []
    for archived in store.catalog.folders():
        if archived.uid_validity is None or archived.name in names:
            continue  # never backed up over IMAP (a POP3 folder), or still there
        folder = Folder(archived.name, archived.delimiter, archived.attributes)
        if wanted(folder, options.include, options.exclude):
            gone = store.catalog.mark_folder_gone(archived.id)
            if gone:
                reports.append(FolderReport(name=archived.name, gone=gone, skipped="no longer on the server"))
    return reports


def backup_pop3(
    endpoint: Endpoint,
    store: Store,
    password: str,
    options: BackupOptions,
    progress: Progress,
    indexer: Indexer | None,
    reports: list[FolderReport],
) -> None:
    source = Pop3Source.connect(endpoint, password, ca_file=options.ca_file, timeout=options.timeout, auth=options.auth)
    finished = False
    sync = Pop3Sync(source, store, options, progress, indexer)
    try:
        progress.plan(1)
        report = sync.run()
        progress.folder_done(report)
        finished = True
    except ConnectionLost:
        # Committed messages count; DELEs do not: without QUIT the server keeps them.
        reports.append(replace(sync.tally.report(options.into or "INBOX"), deleted=0))
        raise
    finally:
        # QUIT is what makes DELE happen: after any failure, hang up instead.
        source.close(commit=finished)
    reports.append(report)


def merged(reports: Sequence[FolderReport]) -> tuple[FolderReport, ...]:
    """One report per folder from the attempts of a run: counts add up, the last word stands."""
    out: dict[str, FolderReport] = {}
    for report in reports:
        before = out.get(report.name)
        if before is not None:
            report = replace(
                report,
                new=before.new + report.new,
                bytes=before.bytes + report.bytes,
                flags_updated=before.flags_updated + report.flags_updated,
                gone=before.gone + report.gone,
                adopted=before.adopted + report.adopted,
                deleted=before.deleted + report.deleted,
            )
        out[report.name] = report
    return tuple(out.values())


def with_retries(attempt: Callable[[], None], retries: int, delay: float) -> None:
    """Run attempt again after a dropped connection, waiting delay, 2*delay, 4*delay...

    Safe because a run is incremental: committed messages are not fetched again,
    and a POP3 run that failed never QUIT, so it deleted nothing.
    """
    for number in range(retries + 1):
        try:
            attempt()
            return
        except ConnectionLost as exc:
            if number == retries:
                raise
            wait = delay * 2**number
            log.warning("%s; reconnecting in %.0f s (retry %d of %d)", exc, wait, number + 1, retries)
            time.sleep(wait)


def check_options(endpoint: Endpoint, options: BackupOptions) -> None:
    pop3 = endpoint.scheme.startswith("pop3")
    if not pop3 and (options.into or options.delete or options.delete_older_than is not None):
        raise UsageError("--into, --delete and --delete-older-than are for POP3 sources")
    if pop3 and (options.include or options.exclude):
        raise UsageError("--folder and --exclude are for IMAP sources; POP3 has one maildrop (see --into)")
    if options.delete and options.delete_older_than is not None:
        raise UsageError("give --delete or --delete-older-than, not both")
    if options.delete_older_than is not None and options.delete_older_than < 0:
        raise UsageError("--delete-older-than needs a number of days >= 0")


def backup(
    source_url: str,
    archive: str,
    *,
    password: str,
    options: BackupOptions = BackupOptions(),
    progress: Progress | None = None,
) -> Summary:
    """Back up an IMAP account (every wanted folder) or a POP3 maildrop into the archive."""
    progress = progress or Progress()
    started = time.monotonic()
    endpoint = parse_url(source_url, no_tls=options.no_tls, schemes=("imap", "imaps", "pop3", "pop3s"))
    check_options(endpoint, options)
    store = open_store(archive, mode="write", account=f"{endpoint.user}@{endpoint.host}")
    try:
        run = backup_pop3 if endpoint.scheme.startswith("pop3") else backup_imap
        reports: list[FolderReport] = []
        with store.lock():
            indexer = Indexer(store) if options.index else None
            try:
                with_retries(
                    lambda: run(endpoint, store, password, options, progress, indexer, reports),
                    options.retries,
                    options.retry_delay,
                )
            finally:
                if indexer is not None:
                    indexer.close()
    finally:
        store.close()
    return Summary(str(endpoint), store.url, merged(reports), time.monotonic() - started)


def archive_stats(archive: str) -> list[tuple[ArchivedFolder, int, int, int]]:
    """Per folder: (folder, messages, bytes, gone) for `mailbackup ls`."""
    store = open_store(archive, mode="read")
    try:
        return store.catalog.stats()
    finally:
        store.close()

