"""The transfer engine: restore (archive -> target) and migrate (server -> target) in one loop.

It reads through the Source protocol (sources/__init__.py): an archive
(sources/archive.py) or a live account, and writes through the Target protocol
(targets/__init__.py).

For each folder, every message is in one of three places: done in the journal and
still on the target (skip it), already on the target by Message-ID and size or by
hash (record it as found, send nothing), or to be sent. The journal is trusted
only as far as the target bears it out: a target folder that is gone, has a new
UIDVALIDITY or lost the recorded UIDs is filled again. A batch is marked in flight
in a committed transaction before it leaves and marked done when the target
confirms it. A message left in flight by a crash is looked up on the target
before it is sent again.

A dropped connection ends the attempt; the engine reconnects (both ends, through
the `connect` it was given) and resumes from the journal, up to `retries`
consecutive attempts that made no progress.

Once an attempt has sent `parallel_after` messages, up to `workers - 1` more
workers join it, each with connections of its own, and take the folders not yet
started: a server writes each folder in its own process, and one mailbox takes its
messages one transaction at a time, so folders in parallel are what makes a big
transfer faster. Each folder is still handled by one worker, in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from .errors import ConnectionLost, ServerError
from .journal import DONE, FAILED, FOUND, IN_FLIGHT, Journal, Record
from .malloc import lean_malloc
from .model import Folder, FolderReport, Message, TransferReport
from .pipeline import Progress, grouped, wanted
from .prefetch import prefetched
from .sources import Checkpoint, Fetched, Listed, Source, SourceId
from .targets import Delivered, Destination, Outgoing, Target, message_id

log = logging.getLogger("mailbackup")


Key = tuple[str | None, int]  # (Message-ID or None, size)


def journal_item(validity: int | None, source_id: SourceId) -> str:
    """A message's name in the journal: "UIDVALIDITY:UID" on a server, the entry id in an archive."""
    return str(source_id) if validity is None else f"{validity}:{source_id}"


@dataclass(frozen=True)
class TransferOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dry_run: bool = False
    force: bool = False  # trust no journal row: check every message on the target
    batch_messages: int = 100
    batch_bytes: int = 4 << 20
    retries: int = 3  # consecutive reconnects that made no progress
    retry_delay: float = 2.0
    # Before a folder with messages in doubt is listed: how long the target must stay unchanged.
    settle_quiet: float = 1.0
    settle_limit: float = 60.0
    # Batches read ahead while one is sent: each is memory held per worker. The batches in
    # flight keep the target busy while the next is read; a live source's latency wants one more.
    read_ahead: int = 1
    workers: int = 1  # folders transferred at once, each worker over its own connections
    parallel_after: int = 500  # messages sent before more workers join: a short run needs no more logins


@dataclass
class Pace:
    """How big a batch to send: a quarter after a dropped line, doubling back while the link holds.

    A MULTIAPPEND is all or nothing, so a batch bigger than what the line carries
    before it drops would never arrive; smaller batches get through and count as progress.
    """

    max_messages: int
    max_bytes: int
    messages: int = 0
    bytes: int = 0
    floor_bytes: int = 64 << 10
    window: int | None = None  # batches in flight at most, if fewer than the target keeps

    def __post_init__(self) -> None:
        self.messages = self.messages or self.max_messages
        self.bytes = self.bytes or self.max_bytes

    def shrink(self) -> None:
        self.messages = max(1, self.messages // 4)
        self.bytes = max(min(self.floor_bytes, self.max_bytes), self.bytes // 4)

    def grow(self) -> None:
        self.messages = min(self.max_messages, self.messages * 2)
        self.bytes = min(self.max_bytes, self.bytes * 2)


def finished(record: Record | None) -> bool:
    return record is not None and record.state in (DONE, FOUND)


@dataclass(frozen=True)
class Trust:
    """What the journal says is done and the target still bears out."""

    done: set[str]
    free: dict[Key, list[int]]  # UIDs on the target not claimed by a trusted row, by (Message-ID, size)
    notes: tuple[str, ...]


def trusted(records: dict[str, Record], destination: Destination, *, force: bool) -> Trust | None:
    """Check the journal's finished rows against the target folder as it is now.

    A row with a target UID needs only the folder's UIDVALIDITY and UIDs; one without
    (a target without UIDPLUS) needs its contents: None means open it with contents.
    """
    rows = [r for r in records.values() if finished(r)]
    if destination.uids is None:  # SMTP: nothing to ask, the journal is all there is
        return Trust({r.item for r in rows}, {}, ())
    free = {key: list(uids) for key, uids in destination.where.items()}
    name = destination.name
    if force:
        return Trust(set(), free, ("forced: every message was checked on the target",) if rows else ())
    if not rows:
        return Trust(set(), free, ())
    if not destination.exists:
        return Trust(set(), free, (f"{name} is not on the target: it would be created and filled in full",))
    if destination.created:
        return Trust(set(), free, (f"{name} was no longer on the target: created again and filled in full",))
    holder = {uid: key for key, uids in destination.where.items() for uid in uids}
    done: set[str] = set()
    reset = missing = 0
    old_validity = None
    for record in rows:
        if record.target_uid_validity is not None and record.target_uid_validity != destination.uid_validity:
            reset += 1
            old_validity = record.target_uid_validity
            continue
        if record.target_uid is not None:
            # A UID names one message for as long as the UIDVALIDITY stands.
            if record.target_uid not in destination.uids:
                missing += 1
                continue
            key = holder.get(record.target_uid)
            if key is not None:
                free[key].remove(record.target_uid)
        else:
            if not destination.contents:
                return None
            copies = free.get((record.message_id, record.size or 0))
            if not copies:
                missing += 1
                continue
            copies.pop(0)
        done.add(record.item)
    notes = []
    if reset:
        notes.append(
            f"{name} has a new UIDVALIDITY ({old_validity} -> {destination.uid_validity}): it was re-created "
            "or reset, so its messages were checked and sent again"
        )
    if missing:
        notes.append(f"{missing} messages an earlier run put in {name} are no longer there: sent again")
    return Trust(done, free, tuple(notes))


class FolderTransfer:
    """Deliver one source folder's messages to one destination, journalled, without duplicates."""

    def __init__(
        self,
        target: Target,
        journal: Journal,
        source_folder: str,
        destination: Destination,
        records: dict[str, Record],
        free: dict[Key, list[int]],
        *,
        pace: Pace,
        progress: Progress,
    ) -> None:
        self.target = target
        self.journal = journal
        self.source_folder = source_folder
        self.destination = destination
        self.records = records
        self.pace = pace
        self.progress = progress
        # UIDs on the target not yet claimed by a message the journal knows is there.
        self.free = free
        self.batch: list[Outgoing] = []
        self.batch_size = 0
        self.pending: dict[str, Record] = {}
        self.found_records: list[Record] = []
        self.sent = self.bytes = self.found = self.recovered = 0
        self.failed: list[str] = []

    def offer(self, item: str, message: Message) -> None:
        raw = message.raw
        previous = self.records.get(item)
        key = (message_id(raw), len(raw))
        record = Record(
            item=item,
            state=IN_FLIGHT,
            target_folder=self.destination.name,
            target_uid_validity=self.destination.uid_validity,
            message_id=key[0],
            size=key[1],
            sha256=message.sha256,
            flags=message.flags,
        )
        uid = self.on_target(key, message.sha256)
        if uid is not None:
            self.found_records.append(replace(record, state=FOUND, target_uid=uid))
            if previous is not None and previous.state == IN_FLIGHT:
                self.recovered += 1
            else:
                self.found += 1
            if len(self.found_records) >= 500:
                self.flush_found()
            self.progress.stored(1, 0)
            return
        if not raw:
            self.fail(record, "empty message: no server accepts it")
            return
        pace = self.pace
        if self.batch and (len(self.batch) >= pace.messages or self.batch_size + len(raw) > pace.bytes):
            self.flush()
        self.batch.append(Outgoing(item=item, raw=raw, flags=message.flags, internal_date=message.internal_date))
        self.batch_size += len(raw)
        self.pending[item] = record

    def on_target(self, key: Key, sha256: str) -> int | None:
        """Claim an unclaimed copy of this message on the target: its UID, or None."""
        free = self.free.get(key)
        if not free:
            return None
        if key[0] is not None:
            return free.pop(0)
        # No Message-ID: only the same bytes count.
        for uid in self.target.copies(self.destination, key[1], sha256):
            if uid in free:
                free.remove(uid)
                return uid
        return None

    def fail(self, record: Record, reason: str) -> None:
        self.journal.write(self.source_folder, [replace(record, state=FAILED, detail=reason)])
        self.failed.append(f"{record.item}: {reason}")

    def flush_found(self) -> None:
        self.journal.write(self.source_folder, self.found_records)
        self.found_records = []

    def flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch, self.batch_size = self.batch, [], 0
        # Found ones go with them: after a dropped line the journal then says all it knew.
        self.journal.write(self.source_folder, self.found_records + [self.pending[m.item] for m in batch])
        self.found_records = []
        self.target.send(self.destination, batch)
        while self.target.full or (self.pace.window is not None and self.target.pending >= self.pace.window):
            self.record(self.target.collect())

    def record(self, outcome: Sequence[Delivered]) -> None:
        rows = []
        size = 0
        for delivered in outcome:
            record = self.pending.pop(delivered.item)
            if delivered.ok:
                validity = delivered.uid_validity if delivered.uid_validity is not None else record.target_uid_validity
                rows.append(replace(record, state=DONE, target_uid=delivered.uid, target_uid_validity=validity))
                self.sent += 1
                size += record.size or 0
                if delivered.detail:  # e.g. SMTP: accepted for some recipients only
                    self.failed.append(f"{record.item}: {delivered.detail}")
            else:
                rows.append(replace(record, state=FAILED, detail=delivered.detail))
                self.failed.append(f"{record.item}: {delivered.detail}")
        self.journal.write(self.source_folder, rows)
        self.bytes += size
        self.progress.stored(len(outcome), size)
        if size:
            self.pace.grow()

    def finish(self) -> None:
        self.flush_found()
        self.flush()
        while self.target.pending:
            self.record(self.target.collect())


class Shared(Progress):
    """The caller's Progress, called by one worker at a time; counts what was sent for `on_sent`."""

    def __init__(self, progress: Progress, on_sent: Callable[[int], None]) -> None:
        self.progress = progress
        self.on_sent = on_sent
        self.lock = threading.Lock()
        self.sent = 0

    def plan(self, folders: int) -> None:
        with self.lock:
            self.progress.plan(folders)

    def folder_started(self, name: str, messages: int, size: int | None) -> None:
        with self.lock:
            self.progress.folder_started(name, messages, size)

    def stored(self, messages: int, size: int) -> None:
        with self.lock:
            self.progress.stored(messages, size)
            self.sent += messages
            sent = self.sent
        self.on_sent(sent)

    def folder_done(self, report: FolderReport) -> None:
        with self.lock:
            self.progress.folder_done(report)


class Engine:
    """One folder loop for every transfer; `connect` opens both ends for each worker of each attempt."""

    def __init__(
        self,
        connect: Callable[[], tuple[Source, Target]],
        journal: Callable[[Target], Journal],
        options: TransferOptions,
        progress: Progress,
        *,
        relative: Callable[[Folder], Folder] = lambda folder: folder,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        lean_malloc()
        self.connect = connect
        self.relative = relative  # the name the target should give a source folder
        self.open_journal = journal  # called once, after the first connect: it needs both identities
        self.journal: Journal | None = None
        self.options = options
        self.progress = Shared(progress, self.sent)
        self.sleep = sleep
        self.order: list[str] = []  # source folders, as first listed
        self.completed: dict[str, TransferReport] = {}  # by source folder, across attempts
        self.partial: dict[str, list[TransferReport]] = {}  # cut short by a dropped line
        self.planned = False
        self.pace: Pace | None = None  # batch limits, kept across attempts
        self.lock = threading.Lock()  # guards what workers share: the folder queue, the reports, the helpers
        self.todo: deque[Folder] = deque()
        self.helpers: list[threading.Thread] = []
        self.parallel = False  # whether this attempt may take more workers
        self.failures: list[BaseException] = []  # what ended the helpers of this attempt
        self.reports: list[TransferReport] = []  # of this attempt, by every worker
        self.stop = threading.Event()

    def run(self) -> list[TransferReport]:
        idle = 0  # drops since the last attempt that made progress
        while True:
            attempt: list[TransferReport] = []
            try:
                self.attempt(attempt)
                return [self.completed[name] for name in self.order if name in self.completed]
            except ConnectionLost as exc:
                # This drop is a retry used; an attempt that got something done gives the rest back.
                idle = 1 if any(r.progressed for r in attempt) else idle + 1
                if idle > self.options.retries:
                    raise
                if self.pace is not None:
                    self.pace.shrink()
                wait = self.options.retry_delay * 2 ** (idle - 1)
                log.warning("%s; reconnecting in %.0f s (retry %d of %d)", exc, wait, idle, self.options.retries)
                self.sleep(wait)

    def attempt(self, reports: list[TransferReport]) -> None:
        source, target = self.connect()
        try:
            if self.journal is None:
                self.journal = self.open_journal(target)
            if self.pace is None:
                # SMTP cannot be asked what arrived: keep at most one message in doubt.
                one = target.window == 1
                # Workers share the memory one would use: each sends (and reads ahead) smaller batches.
                share = max(1, self.options.workers) if not one and not self.options.dry_run else 1
                self.pace = Pace(
                    1 if one else self.options.batch_messages,
                    max(64 << 10, self.options.batch_bytes // share),
                    window=2 if share > 1 else None,
                )
            folders = [f for f in source.folders() if wanted(f, self.options.include, self.options.exclude)]
            if not self.planned:
                self.progress.plan(len(folders))
                self.order = [f.name for f in folders]
                self.planned = True
            with self.lock:
                self.todo = deque(f for f in folders if f.name not in self.completed)
                self.helpers, self.failures, self.reports = [], [], reports
                self.stop.clear()
                # SMTP keeps one message in doubt, and a dry run's journal may live in one thread's memory.
                self.parallel = self.options.workers > 1 and target.window > 1 and not self.options.dry_run
            self.sent(self.progress.sent)
            try:
                self.work(source, target, reports)
            finally:
                with self.lock:
                    self.parallel = False  # no helper starts after this
                    self.stop.set()
                for helper in self.helpers:
                    helper.join()
        finally:
            target.close()
            source.close(commit=False)  # a transfer never deletes at the source
        if self.failures:
            lost = [f for f in self.failures if isinstance(f, ConnectionLost)]
            other = [f for f in self.failures if not isinstance(f, ConnectionLost)]
            raise (other or lost)[0]

    def sent(self, count: int) -> None:
        """Called as messages are sent: past `parallel_after`, start the helpers once."""
        if count < self.options.parallel_after:
            return
        with self.lock:
            if not self.parallel or self.helpers or not self.todo:
                return
            for number in range(1, self.options.workers):
                helper = threading.Thread(target=self.help, args=(number,), name=f"transfer-{number}", daemon=True)
                self.helpers.append(helper)
                helper.start()

    def help(self, number: int) -> None:
        """A helper worker: its own connections, the folders nobody has started."""
        reports = self.reports
        try:
            with self.lock:
                if not self.todo or self.stop.is_set():
                    return
            source, target = self.connect()
            try:
                self.work(source, target, reports)
            finally:
                target.close()
                source.close(commit=False)
        except BaseException as exc:  # handed to the attempt, which raises it
            with self.lock:
                self.failures.append(exc)
            self.stop.set()

    def work(self, source: Source, target: Target, reports: list[TransferReport]) -> None:
        """Take folders from the queue until it is empty or another worker failed."""
        assert self.journal is not None and self.pace is not None
        while True:
            with self.lock:
                if not self.todo or self.stop.is_set():
                    return
                folder = self.todo.popleft()
            work = FolderWork(
                source, target, self.journal, folder, self.relative(folder), self.options, self.progress, self.pace
            )
            try:
                report = work.run()
            except ServerError as exc:
                report = replace(work.report(), failed=(*work.report().failed, str(exc)))
            except ConnectionLost:
                partial = work.report()
                with self.lock:
                    reports.append(partial)
                    self.partial.setdefault(folder.name, []).append(partial)
                raise
            with self.lock:
                reports.append(report)
                self.completed[folder.name] = merged([*self.partial.pop(folder.name, []), report])
            self.progress.folder_done(FolderReport(name=folder.name))


def drained(entries: list[Listed]) -> Iterator[Listed]:
    """The entries in order, each let go of as it is taken."""
    entries.reverse()
    while entries:
        yield entries.pop()


def merged(attempts: Sequence[TransferReport]) -> TransferReport:
    """One report from the attempts at a folder: the plan is the first's, counts add up, failures are the last's."""
    first, last = attempts[0], attempts[-1]
    notes = tuple(dict.fromkeys(note for r in attempts for note in r.notes))
    return replace(
        first,
        sent=sum(r.sent for r in attempts),
        bytes=sum(r.bytes for r in attempts),
        found=sum(r.found for r in attempts),
        recovered=sum(r.recovered for r in attempts),
        flags_updated=sum(r.flags_updated for r in attempts),
        failed=last.failed,
        skipped=last.skipped,
        notes=notes,
    )


class FolderWork:
    """One source folder, one attempt: plan against the journal and the target, then send."""

    def __init__(
        self,
        source: Source,
        target: Target,
        journal: Journal,
        folder: Folder,
        relative: Folder,
        options: TransferOptions,
        progress: Progress,
        pace: Pace,
    ) -> None:
        self.pace = pace
        self.source = source
        self.target = target
        self.journal = journal
        self.folder = folder
        self.options = options
        self.progress = progress
        self.name = target.destination(relative.name, relative.delimiter, relative.attributes)
        self.base = TransferReport(source=folder.name, target=self.name)
        self.transfer: FolderTransfer | None = None
        self.flags_updated = 0
        self.failed: list[str] = []

    def report(self) -> TransferReport:
        transfer = self.transfer
        if transfer is None:
            return replace(self.base, flags_updated=self.flags_updated, failed=tuple(self.failed))
        return replace(
            self.base,
            sent=transfer.sent,
            bytes=transfer.bytes,
            found=transfer.found,
            recovered=transfer.recovered,
            flags_updated=self.flags_updated,
            failed=tuple(self.failed + transfer.failed),
        )

    def run(self) -> TransferReport:
        planned = self.plan()
        if planned is None:
            return self.report()
        transfer, listed, validity = planned
        self.progress.folder_started(self.folder.name, self.base.planned, self.base.planned_bytes)
        for _, future in prefetched(self.groups(drained(listed)), self.read, self.options.read_ahead):
            arrived, lost = future.result()
            # Each message leaves the list as it is offered: once its batch is answered, nothing holds its bytes.
            arrived.reverse()
            while arrived:
                fetched = arrived.pop()
                if fetched.message is not None:
                    transfer.offer(journal_item(validity, fetched.id), fetched.message)
                elif fetched.failure is not None and not fetched.partial:  # a cut one comes again after the reconnect
                    label = str(fetched.id) if validity is None else f"UID {fetched.id}"
                    self.failed.append(f"{label}: {fetched.failure}")
            if lost is not None:
                transfer.finish()  # what arrived whole is delivered and journalled first
                raise lost
        transfer.finish()
        return self.report()

    def plan(self) -> tuple[FolderTransfer, list[Listed], int | None] | None:
        """Check the journal against the target; what to send, or None if nothing.

        Its own method so that the folder-sized lists and maps it builds are gone while the
        messages are sent.
        """
        if not self.folder.selectable:
            self.base = replace(self.base, skipped="not selectable")
            return None
        opened = self.source.open(self.folder)
        validity = opened.checkpoint.validity
        items = {journal_item(validity, i): i for i in opened.ids}
        source_name, options = self.folder.name, self.options
        records = self.journal.records(source_name, self.name)
        if any(r.state == IN_FLIGHT for r in records.values()) and not options.dry_run:
            self.target.settle(self.name, options.settle_quiet, options.settle_limit)
        create = not options.dry_run
        # Reading every message's Message-ID and size costs: only when something may be sent.
        unsure = options.force or any(not finished(records.get(item)) for item in items)
        destination = self.target.open(self.name, create=create, contents=unsure)
        trust = trusted(records, destination, force=options.force)
        if trust is None or (not destination.contents and len(trust.done & items.keys()) < len(items)):
            created = destination.created
            destination = self.target.open(self.name, create=create, contents=True)
            destination = replace(destination, created=destination.created or created)
            trust = trusted(records, destination, force=options.force)
        assert trust is not None
        todo = [i for item, i in items.items() if item not in trust.done]
        # Gone since open: left out of the listing, nothing to send. Listed here, before the
        # prefetch thread starts: a live source's listing uses the connection it fetches on.
        listed = [entry for part in self.source.listing(todo) for entry in part] if todo else []
        planned_bytes = sum(entry.size for entry in listed)
        self.base = replace(
            self.base,
            planned=len(todo),
            planned_bytes=planned_bytes,
            done_before=len(items) - len(todo),
            notes=(*opened.notes, *trust.notes),
        )
        if options.dry_run:
            return None
        done = [i for item, i in items.items() if item in trust.done]
        self.flags_updated = self.propagate_flags(destination, validity, done, records)
        if not todo:
            return None
        transfer = self.transfer = FolderTransfer(
            self.target,
            self.journal,
            source_name,
            destination,
            {item: records[item] for item, i in items.items() if item not in trust.done and item in records},
            trust.free,
            pace=self.pace,
            progress=self.progress,
        )
        return transfer, listed, validity

    def groups(self, listed: Iterable[Listed]) -> Iterator[list[Listed]]:
        """The listed messages in batches of at most batch_messages, or the pace's bytes unless one is bigger."""
        return grouped(listed, lambda entry: entry.size, lambda: (self.options.batch_messages, self.pace.max_bytes))

    def read(self, batch: Sequence[Listed]) -> tuple[list[Fetched], ConnectionLost | None]:
        """On the prefetch thread: a batch, and the dropped line that cut it short, if one did."""
        arrived: list[Fetched] = []
        try:
            for fetched in self.source.fetch(batch):
                arrived.append(fetched)
        except ConnectionLost as exc:
            return arrived, exc
        return arrived, None

    def propagate_flags(
        self, destination: Destination, validity: int | None, done: Sequence[SourceId], records: dict[str, Record]
    ) -> int:
        """Set on the target the flags that changed on the source since they were last copied."""
        known: dict[SourceId, Record] = {}
        for source_id in done:
            record = records[journal_item(validity, source_id)]
            if (
                record.state == DONE
                and record.target_uid is not None
                and record.target_uid_validity == destination.uid_validity
            ):
                known[source_id] = record
        if not known:
            return 0
        changes: dict[tuple[str, ...], list[int]] = {}
        remembered: list[tuple[str, tuple[str, ...]]] = []
        # Ids of one folder are all ints or all strings, so they sort.
        for current in self.source.flag_changes(Checkpoint(validity), sorted(known)):
            for source_id, flags in current.items():
                was = known.get(source_id)
                if was is not None and was.target_uid is not None and set(flags) != set(was.flags):
                    changes.setdefault(tuple(sorted(flags)), []).append(was.target_uid)
                    remembered.append((was.item, flags))
        self.target.store_flags(destination.name, changes)
        self.journal.set_flags(self.folder.name, destination.name, remembered)
        return len(remembered)
