"""Backup orchestration: source -> store -> catalog, reporting progress through a callback.

Per batch: fetch, write the bytes durably (store.put), then commit the catalog
rows. The folder's checkpoint (UIDVALIDITY, HIGHESTMODSEQ) moves last.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, TypeVar

from .errors import ConnectionLost, ProviderLimit, ServerError, UsageError, setting
from .limits import DailyBudget, TokenBucket, utc_day
from .model import ArchivedFolder, Folder, FolderReport, Message, Summary
from .sources import (
    Checkpoint,
    Connect,
    Fetched,
    Listed,
    OpenFolder,
    Source,
    SourceId,
    Traits,
    account_name,
    open_source,
    source_kind,
)

# The store, its catalog and the search index load SQLAlchemy: backup() imports them
# only after the rerun check (rerun.py) found work to do.
if TYPE_CHECKING:
    from .search import Indexer
    from .stores import Store
    from .stores.blobs import Bucket

log = logging.getLogger("mailbackup")

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
    admin_user: str | None = None  # log in as this administrator, for the source URL's user (SASL PLAIN authzid)
    blobs: Bucket | None = None  # a new SQL archive keeps message bytes in this bucket
    # provider limits (limits.py); Gmail's defaults come from sources/gmail.py
    max_rate: float | None = None  # bytes/s read from the source, on average
    max_bytes_per_day: int | None = None  # per account and UTC day, remembered in the catalog
    max_connections: int | None = None  # a run uses one connection per account; must be >= 1
    gmail_trash_and_spam: bool = False
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


def grouped(items: Iterable[T], size: Callable[[T], int], limits: Callable[[], tuple[int, int]]) -> Iterator[list[T]]:
    """Group items so a batch holds at most max_messages, or max_bytes unless one item is bigger.

    limits() gives (max_messages, max_bytes); it is asked at every item, because a caller's
    limits may change while a batch forms (a dropped line shrinks them).
    """
    batch: list[T] = []
    total = 0
    for item in items:
        max_messages, max_bytes = limits()
        weight = size(item)
        if batch and (len(batch) >= max_messages or total + weight > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += weight
    if batch:
        yield batch


def batches(uids: Sequence[int], sizes: dict[int, int], max_messages: int, max_bytes: int) -> Iterator[list[int]]:
    """Group UIDs so a batch holds at most max_messages, or max_bytes unless one message is bigger."""
    return grouped(uids, lambda uid: sizes.get(uid, 0), lambda: (max_messages, max_bytes))


def connection(password: str, options: BackupOptions) -> Connect:
    """How backup and prune-server reach the source."""
    return Connect(
        secret=password,
        auth=options.auth,
        ca_file=options.ca_file,
        no_tls=options.no_tls,
        timeout=options.timeout,
        admin_user=options.admin_user,
        gmail_trash_and_spam=options.gmail_trash_and_spam,
    )


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def label(source_id: SourceId) -> str:
    """How a failure names a message: by UID, or by the source's string id."""
    return f"UID {source_id}" if isinstance(source_id, int) else f"message {source_id}"


@dataclass
class _Tally:
    new: int = 0
    bytes: int = 0
    flags_updated: int = 0
    gone: int = 0
    adopted: int = 0
    deleted: int = 0
    failed: list[str] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    started: float = field(default_factory=time.monotonic)

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
            notes=self.notes,
            elapsed=time.monotonic() - self.started,
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


MIN_BATCH_BYTES = 64 << 10

Key = tuple[str, "int | None", SourceId]  # archive folder, validity, id: a message across attempts


@dataclass
class Run:
    """What one backup run carries from one connection to the next on a flaky link.

    Batch limits drop to one message after a dropped line and double while the
    link holds. Prefixes of cut messages wait here for a source that can resume
    them. For a source that cannot, a message that was the first one read on a
    connection and got cut `retries` times is bigger than what one connection
    carries: it is listed as failed, and the run goes on without it.
    """

    options: BackupOptions
    batch_messages: int = 0
    batch_bytes: int = 0
    progress: int = 0  # grows whenever an attempt gets anywhere: the retry budget is reset
    prefixes: dict[Key, bytes] = field(default_factory=dict)
    cuts: Counter[Key] = field(default_factory=Counter)
    too_big: dict[Key, str] = field(default_factory=dict)
    read_on_connection: int = 0  # messages fully read since the last connect
    budget: DailyBudget | None = None  # max_bytes_per_day, once the source is known
    rate: TokenBucket | None = None

    def __post_init__(self) -> None:
        self.batch_messages, self.batch_bytes = self.options.batch_messages, self.options.batch_bytes
        if self.options.max_rate is not None:
            self.rate = TokenBucket(self.options.max_rate)

    def limit(self, source: Source, store: Store) -> None:
        """The daily budget: the option, else the provider's default (Gmail's), counted from the catalog."""
        limit = self.options.max_bytes_per_day or getattr(source, "daily_budget", None)
        if self.budget is None and limit:
            day = utc_day()
            self.budget = DailyBudget(int(limit), store.catalog.bytes_fetched(day), day)

    def connected(self) -> None:
        self.read_on_connection = 0

    def held(self) -> None:
        self.batch_messages = min(self.options.batch_messages, self.batch_messages * 2)
        self.batch_bytes = min(self.options.batch_bytes, self.batch_bytes * 2)

    def dropped(self, in_flight: Key | None, size: int) -> None:
        self.batch_messages, self.batch_bytes = 1, min(self.options.batch_bytes, MIN_BATCH_BYTES)
        if in_flight is None or self.read_on_connection:
            return
        self.cuts[in_flight] += 1
        if self.cuts[in_flight] >= max(self.options.retries, 1):  # as many tries as the retry budget allows
            self.too_big[in_flight] = (
                f"{label(in_flight[2])}: {size} bytes is more than one connection carried "
                f"({self.cuts[in_flight]} tries, each cut off); not retried"
            )
            self.progress += 1

    def batches(self, listed: Sequence[Listed]) -> Iterator[list[Listed]]:
        """The listed messages in batches within this run's limits (they change as the link does)."""
        return grouped(listed, lambda entry: entry.size, lambda: (self.batch_messages, self.batch_bytes))


Outcome = tuple[list[Fetched], "ConnectionLost | ProviderLimit | None"]


class FolderSync:
    """Bring one archived folder up to date with an open source folder."""

    def __init__(
        self,
        source: Source,
        store: Store,
        opened: OpenFolder,
        into: Folder,
        options: BackupOptions,
        progress: Progress,
        indexer: Indexer | None,
        run: Run,
    ):
        self.source = source
        self.store = store
        self.indexer = indexer
        self.catalog = store.catalog
        self.opened = opened
        self.into = into  # the archive's folder
        self.options = options
        self.progress = progress
        self.run_state = run
        self.tally = _Tally(notes=opened.notes)

    def run(self) -> FolderReport:
        archived = self.catalog.ensure_folder(self.into, self.store.folder_path(self.into))
        checkpoint = self.opened.checkpoint
        validity = checkpoint.validity
        ids = self.opened.ids
        rescan = False
        first_seen: dict[str, str] = {}
        if validity is None:  # ids that never change meaning (POP3 UIDLs)
            rescan = self.catalog.has_stale(archived.id, None)  # entries rebuilt by repair carry no id
            first_seen = self.catalog.source_ids(archived.id)
            on_server = set(ids)
            gone: Sequence[SourceId] = [i for i in first_seen if i not in on_server]
            new: Sequence[SourceId] = [i for i in ids if i not in first_seen]
            if gone:
                self.catalog.mark_gone_ids(archived.id, gone)  # type: ignore[arg-type]  # ids are UIDL strings when there is no validity
        else:
            # Entries under another UIDVALIDITY: the folder was reset, or a rescan was cut short.
            rescan = self.catalog.has_stale(archived.id, validity)
            known = self.catalog.live_uids(archived.id, validity)
            new, gone = diff_sorted(ids, known)  # type: ignore[arg-type]  # ids are int UIDs under a validity
            if len(known) > len(gone) and self.source.traits.flags:
                since = Checkpoint(archived.uid_validity, archived.highest_modseq)
                for flags in self.source.flag_changes(since, ids):
                    self.apply_flags(archived, validity, flags)  # type: ignore[arg-type]  # int UIDs under a validity
            if gone:
                self.catalog.mark_gone(archived.id, validity, gone)
        self.tally.gone += len(gone)
        self.fetch_new(archived, validity, new, rescan)
        if rescan and not self.tally.failed:
            self.tally.gone += self.catalog.mark_stale_gone(archived.id, validity)
        if validity is not None:
            self.catalog.set_folder_state(archived.id, validity, checkpoint.modseq)
        self.delete([i for i in ids if i in first_seen and self.may_delete(first_seen[i])])
        return self.tally.report(self.into.name)

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

    def key(self, source_id: SourceId) -> Key:
        return (self.into.name, self.opened.checkpoint.validity, source_id)

    def fetch_new(self, archived: ArchivedFolder, validity: int | None, new: Sequence[SourceId], rescan: bool) -> None:
        run = self.run_state
        first = True
        # The listing comes a slice at a time, so memory stays flat however big the folder.
        for part in self.source.listing(new):
            if first:
                whole = len(part) == len(new)
                self.progress.folder_started(self.into.name, len(new), sum(m.size for m in part) if whole else None)
                first = False
            wanted_now = []
            for item in part:
                reason = run.too_big.get(self.key(item.id))
                if reason is None:
                    wanted_now.append(item)
                else:
                    self.tally.failed.append(reason)
            from .prefetch import prefetched  # threads and ctypes: not for a rerun with nothing new

            for batch, fetched in prefetched(run.batches(wanted_now), self.collect):
                self.settle(archived, validity, batch, *fetched.result(), rescan)

    def collect(self, batch: list[Listed]) -> Outcome:
        """Read a batch to the end or to the dropped line (on the prefetch thread)."""
        resume = {item.id: self.run_state.prefixes[self.key(item.id)] for item in batch if self.key(item.id) in self.run_state.prefixes}
        got: list[Fetched] = []
        run = self.run_state
        if run.budget is not None:  # before asking: a provider counts what it sends
            run.budget.reserve(sum(item.size - len(resume.get(item.id, b"")) for item in batch))
        try:
            for fetched in self.source.fetch(batch, resume):
                got.append(fetched)
                if run.rate is not None:
                    run.rate.take(fetched.message.size if fetched.message else len(fetched.partial))
        except (ConnectionLost, ProviderLimit) as exc:  # what arrived whole is stored before either goes on
            return got, exc
        except ServerError as exc:
            answered = {f.id for f in got}
            got.extend(Fetched(item.id, None, str(exc)) for item in batch if item.id not in answered)
        return got, None

    def settle(
        self,
        archived: ArchivedFolder,
        validity: int | None,
        batch: list[Listed],
        got: list[Fetched],
        dropped: ConnectionLost | ProviderLimit | None,
        rescan: bool,
    ) -> None:
        """Store what arrived whole, keep what arrived in part, then pass a dropped line on."""
        run = self.run_state
        messages = [f.message for f in got if f.message is not None]
        for f in got:
            if f.message is None and f.failure is not None:
                self.tally.failed.append(f"{label(f.id)}: {f.failure}")
        self.store_batch(archived, validity, messages, rescan)
        if run.budget is not None:
            self.catalog.add_bytes_fetched(run.budget.day, sum(m.size for m in messages) + sum(len(f.partial) for f in got))
        self.progress.stored(len(messages), sum(m.size for m in messages))
        for f in got:
            key = self.key(f.id)
            if f.message is not None:
                run.prefixes.pop(key, None)
            elif f.partial and len(f.partial) > len(run.prefixes.get(key, b"")):
                run.prefixes[key] = f.partial
                run.progress += 1
        if messages:
            run.progress += 1
            run.read_on_connection += len(messages)
        if self.options.delete or self.options.delete_older_than == 0:
            self.delete([m.source_id for m in messages if m.source_id is not None])
        if dropped is None:
            run.held()
            return
        if isinstance(dropped, ProviderLimit):
            raise dropped  # never retried: the provider said stop
        done = {f.id for f in got if f.message is not None or f.failure is not None}
        in_flight = next((item for item in batch if item.id not in done), None)
        if self.source.traits.resumes:
            in_flight = None  # a cut message is resumed, never too big; an idle link uses up the budget
        run.dropped(self.key(in_flight.id) if in_flight else None, in_flight.size if in_flight else 0)
        raise dropped

    def store_batch(self, archived: ArchivedFolder, validity: int | None, messages: list[Message], rescan: bool) -> None:
        from .stores.codec import named

        fresh = []
        messages = [named(self.store, m) for m in messages]  # an encrypted archive knows them by keyed MAC
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

    def may_delete(self, first_seen: str) -> bool:
        """Whether the delete options let an already-archived message go from the server."""
        if self.options.delete:
            return True
        cutoff = delete_cutoff(self.options)
        return cutoff is not None and datetime.fromisoformat(first_seen) <= cutoff

    def delete(self, ids: Sequence[SourceId]) -> None:
        if ids:
            self.source.delete(ids)
            self.tally.deleted += len(ids)


def delete_cutoff(options: BackupOptions) -> datetime | None:
    """Archived messages first downloaded at or before this go from the server (None: none do)."""
    if options.delete:
        return datetime.max.replace(tzinfo=timezone.utc)
    if options.delete_older_than is None:
        return None
    return datetime.now(timezone.utc) - timedelta(days=options.delete_older_than)


def choose(listed: Sequence[Folder], options: BackupOptions) -> list[Folder]:
    """The wanted folders; a --folder or --exclude pattern that matches nothing is a mistake."""
    for name, patterns in (("include", options.include), ("exclude", options.exclude)):
        for pattern in patterns:
            if not any(wanted(f, (pattern,), ()) for f in listed):
                names = ", ".join(sorted(f.name for f in listed)) or "none"
                raise UsageError(f"{setting(name)} {pattern!r} matches no folder; the server has: {names}")
    return [f for f in listed if wanted(f, options.include, options.exclude)]


def backup_once(
    url: str,
    connect: Connect,
    store: Store,
    options: BackupOptions,
    progress: Progress,
    indexer: Indexer | None,
    reports: list[FolderReport],
    run: Run,
    ready: list[Source] | None = None,
) -> None:
    """One connection's worth: sync every wanted folder, appending a report per folder
    (a partial one if the line drops). A source in ready is used (once) instead of connecting."""
    source = ready.pop() if ready else open_source(url, connect)
    run.connected()
    run.limit(source, store)
    traits = source.traits
    clean = False
    try:
        listed = source.folders()
        chosen = choose(listed, options) if traits.many_folders else listed
        plan = getattr(source, "plan", None)  # Gmail: label folders are views of All Mail (sources/gmail.py)
        views: Sequence[Folder] = ()
        if plan is not None:
            planned = plan(listed, chosen)
            chosen, views = planned.download, planned.views
        progress.plan(len(chosen) + len(views))
        failed_folder = False
        for folder in chosen:
            into = folder if traits.many_folders else Folder(options.into or folder.name, "/")
            if not folder.selectable:
                report = FolderReport(name=folder.name, skipped="not selectable")
            else:
                sync: FolderSync | None = None
                try:
                    opened = source.open(folder)
                    sync = FolderSync(source, store, opened, into, options, progress, indexer, run)
                    report = sync.run()
                except ServerError as exc:
                    report = FolderReport(name=into.name, failed=(str(exc),))
                    failed_folder = True
                except ConnectionLost:
                    if sync is not None:  # what it committed still counts; deferred deletes do not
                        partial = sync.tally.report(into.name)
                        reports.append(replace(partial, deleted=0) if traits.deletes_at_close else partial)
                    raise
            reports.append(report)
            progress.folder_done(report)
        if views:
            for report in source.sync_views(store, listed, views):  # type: ignore[attr-defined]  # sources with plan() have it
                reports.append(report)
                progress.folder_done(report)
        if traits.many_folders:
            reports.extend(vanished(store, listed, options))
        # Deferred deletes (POP3's QUIT) happen only after a clean run.
        clean = not failed_folder
    finally:
        source.close(commit=clean)


def vanished(store: Store, listed: Sequence[Folder], options: BackupOptions) -> list[FolderReport]:
    """Archived folders the server no longer lists: their messages stay, marked gone."""
    names = {f.name for f in listed}
    reports = []
    for archived in store.catalog.folders():
        if archived.uid_validity is None or archived.name in names:
            continue  # never backed up from a server with folders (a POP3 folder), or still there
        folder = Folder(archived.name, archived.delimiter, archived.attributes)
        if wanted(folder, options.include, options.exclude):
            gone = store.catalog.mark_folder_gone(archived.id)
            if gone:
                reports.append(FolderReport(name=archived.name, gone=gone, skipped="no longer on the server"))
    return reports


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
                elapsed=before.elapsed + report.elapsed,
            )
        out[report.name] = report
    return tuple(out.values())


def with_retries(attempt: Callable[[], None], run: Run, retries: int, delay: float) -> None:
    """Run attempt again after a dropped connection, waiting delay, 2*delay, 4*delay...

    The budget counts retries in a row that got nowhere: an attempt that stored a
    message (or part of one) refunds it, so a long run on a flaky link finishes.
    Safe because a run is incremental: committed messages are not fetched again,
    and a POP3 run that failed never QUIT, so it deleted nothing.
    """
    used = 0
    while True:
        mark = run.progress
        try:
            attempt()
            return
        except ConnectionLost as exc:
            if run.progress > mark:
                used = 0
            if used >= retries:
                raise
            wait = delay * 2**used
            used += 1
            log.warning("%s; reconnecting in %.1f s (retry %d of %d in a row)", exc, wait, used, retries)
            time.sleep(wait)


def check_options(traits: Traits, options: BackupOptions) -> None:
    if traits.many_folders and (options.into or options.delete or options.delete_older_than is not None):
        raise UsageError(f"{setting('into')}, {setting('delete')} and {setting('delete_older_than')} are for POP3 sources")
    if not traits.many_folders and (options.include or options.exclude):
        raise UsageError(
            f"{setting('include')} and {setting('exclude')} are for IMAP sources; {traits.name} has one maildrop "
            f"(see {setting('into')})"
        )
    if options.delete and options.delete_older_than is not None:
        raise UsageError(f"give {setting('delete')} or {setting('delete_older_than')}, not both")
    if options.delete_older_than is not None and options.delete_older_than < 0:
        raise UsageError(f"{setting('delete_older_than')} needs a number of days >= 0")
    if options.max_rate is not None and options.max_rate <= 0:
        raise UsageError(f"{setting('max_rate')} needs a number of bytes per second > 0")
    if options.max_bytes_per_day is not None and options.max_bytes_per_day <= 0:
        raise UsageError(f"{setting('max_bytes_per_day')} needs a number of bytes > 0")
    if options.max_connections is not None and options.max_connections < 1:
        raise UsageError(f"{setting('max_connections')} needs a number >= 1 (a run uses one connection per account)")


def backup(
    source_url: str,
    archive: str,
    *,
    password: str,
    options: BackupOptions = BackupOptions(),
    progress: Progress | None = None,
) -> Summary:
    """Back up every wanted folder of a source (an IMAP account, a POP3 maildrop) into the archive."""
    progress = progress or Progress()
    started = time.monotonic()
    kind = source_kind(source_url)
    connect = connection(password, options)
    address = kind.address(source_url, connect)  # a bad URL fails here, before the archive is touched
    check_options(kind.traits, options)
    account = account_name(source_url)
    ready: list[Source] = []
    if options.blobs is None:
        from .rerun import check

        outcome = check(
            source_url,
            archive,
            account,
            connect,
            lambda listed: choose(listed, options),
            lambda folder: wanted(folder, options.include, options.exclude),
            into=options.into,
            delete_before=delete_cutoff(options),
        )
        if outcome is not None and outcome.reports is not None:
            progress.plan(len(outcome.reports))
            for report in outcome.reports:
                progress.folder_done(report)
            return Summary(address, outcome.url, outcome.reports, time.monotonic() - started)
        if outcome is not None and outcome.source is not None:
            ready.append(outcome.source)
    try:
        return _backup(source_url, archive, account, connect, address, options, progress, ready, started)
    finally:
        for source in ready:  # the store could not be opened: hang up the rerun check's connection
            source.close(commit=False)


def _backup(
    source_url: str,
    archive: str,
    account: str,
    connect: Connect,
    address: str,
    options: BackupOptions,
    progress: Progress,
    ready: list[Source],
    started: float,
) -> Summary:
    from .search import Indexer
    from .stores import open_store

    store = open_store(archive, mode="write", account=account, blobs=options.blobs)
    try:
        reports: list[FolderReport] = []
        run = Run(options)
        with store.lock():
            indexer = Indexer(store) if options.index else None
            try:
                with_retries(
                    lambda: backup_once(source_url, connect, store, options, progress, indexer, reports, run, ready),
                    run,
                    options.retries,
                    options.retry_delay,
                )
            finally:
                if indexer is not None:
                    indexer.close()
    finally:
        store.close()
    return Summary(address, store.url, merged(reports), time.monotonic() - started)
