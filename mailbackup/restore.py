"""Restore (archive -> IMAP or SMTP) and migrate (IMAP -> IMAP), reporting through `Progress`.

For each destination, every message is in one of three places: done in the journal
(skip it), already on the target by Message-ID and size or by hash (record it as
found, send nothing), or to be sent. A batch is marked in flight in a committed
transaction before it leaves and marked done when the target confirms it. A
message left in flight by a crash is looked up on the target before it is sent again.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path

from .catalog import create_engine
from .errors import ServerError, StoreError, UsageError
from .journal import DONE, FAILED, FOUND, IN_FLIGHT, Journal, Record
from .model import Entry, Folder, FolderReport, Message
from .net import Endpoint, parse_url
from .pipeline import Progress, batches, chunks, wanted
from .sources.imap import ImapSource
from .stores import open_store
from .targets import Delivered, Destination, Outgoing, Target, message_id

IMAP_SCHEMES = ("imap", "imaps")
SMTP_SCHEMES = ("smtp", "smtps")


@dataclass(frozen=True)
class RestoreOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    since: date | None = None  # INTERNALDATE on or after
    before: date | None = None  # INTERNALDATE before
    include_gone: bool = False
    into: str | None = None
    automap: bool = True
    dry_run: bool = False
    no_tls: bool = False
    ca_file: str | None = None
    timeout: float = 120.0
    auth: str = "password"  # the target's login: or "xoauth2" / "oauthbearer" with an access token
    source_auth: str = "password"  # migrate's source login
    admin_user: str | None = None  # the target's login is this admin's, on behalf of the URL's user
    source_admin_user: str | None = None  # the same for migrate's source
    batch_messages: int = 100
    batch_bytes: int = 4 << 20
    # SMTP only
    recipients: tuple[str, ...] = ()
    sender: str | None = None
    resent: bool = False
    rate_per_minute: float | None = None
    retries: int = 5
    backoff: float = 1.0


@dataclass(frozen=True)
class TransferReport:
    """One source folder and where it went."""

    source: str
    target: str
    planned: int = 0  # messages selected and not done before
    planned_bytes: int = 0
    sent: int = 0
    bytes: int = 0
    done_before: int = 0  # the journal says an earlier run delivered them
    found: int = 0  # already on the target: skipped
    recovered: int = 0  # in flight when an earlier run stopped, and found on the target
    flags_updated: int = 0
    failed: tuple[str, ...] = ()
    skipped: str | None = None


@dataclass(frozen=True)
class TransferSummary:
    source: str
    target: str
    folders: tuple[TransferReport, ...]
    elapsed: float
    dry_run: bool = False

    @property
    def sent(self) -> int:
        return sum(f.sent for f in self.folders)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.folders)

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(f.source, item) for f in self.folders for item in f.failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, object]:
        total = {
            key: sum(getattr(f, key) for f in self.folders)
            for key in ("planned", "planned_bytes", "sent", "bytes", "done_before", "found", "recovered", "flags_updated")
        }
        return {
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "folders": len(self.folders),
            **total,
            "elapsed": round(self.elapsed, 3),
            "failed": {f.source: list(f.failed) for f in self.folders if f.failed},
            "per_folder": [
                {
                    "source": f.source,
                    "target": f.target,
                    "planned": f.planned,
                    "planned_bytes": f.planned_bytes,
                    "sent": f.sent,
                    "done_before": f.done_before,
                    "found": f.found,
                    "recovered": f.recovered,
                    "flags_updated": f.flags_updated,
                    **({"skipped": f.skipped} if f.skipped else {}),
                }
                for f in self.folders
            ],
        }


def finished(record: Record | None) -> bool:
    return record is not None and record.state in (DONE, FOUND)


class FolderTransfer:
    """Deliver one source folder's messages to one destination, journalled, without duplicates."""

    def __init__(
        self,
        target: Target,
        journal: Journal,
        source_folder: str,
        destination: Destination,
        records: dict[str, Record],
        *,
        batch_messages: int,
        batch_bytes: int,
        progress: Progress,
    ) -> None:
        self.target = target
        self.journal = journal
        self.source_folder = source_folder
        self.destination = destination
        self.records = records
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes
        self.progress = progress
        # Copies on the target not yet claimed by a message the journal knows is there.
        self.available: Counter[tuple[str | None, int]] = destination.present.copy()
        for record in records.values():
            if finished(record) and record.target_folder == destination.name and record.size is not None:
                self.available[(record.message_id, record.size)] -= 1
        self.hash_claimed: Counter[str] = Counter()
        self.batch: list[Outgoing] = []
        self.batch_size = 0
        self.pending: dict[str, Record] = {}
        self.found_records: list[Record] = []
        self.sent = self.bytes = self.found = self.recovered = 0
        self.failed: list[str] = []

    def offer(self, item: str, raw: bytes, flags: tuple[str, ...], internal_date: datetime | None, sha256: str) -> None:
        previous = self.records.get(item)
        if finished(previous):
            return
        key = (message_id(raw), len(raw))
        record = Record(
            item=item,
            state=IN_FLIGHT,
            target_folder=self.destination.name,
            message_id=key[0],
            size=key[1],
            sha256=sha256,
            flags=flags,
        )
        if self.on_target(key, sha256):
            self.available[key] -= 1
            self.found_records.append(replace(record, state=FOUND))
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
        if self.batch and (len(self.batch) >= self.batch_messages or self.batch_size + len(raw) > self.batch_bytes):
            self.flush()
        self.batch.append(Outgoing(item=item, raw=raw, flags=flags, internal_date=internal_date))
        self.batch_size += len(raw)
        self.pending[item] = record

    def on_target(self, key: tuple[str | None, int], sha256: str) -> bool:
        if self.available[key] <= 0:
            return False
        if key[0] is not None:
            return True
        # No Message-ID: only the same bytes count.
        if self.target.copies(self.destination, key[1], sha256) > self.hash_claimed[sha256]:
            self.hash_claimed[sha256] += 1
            return True
        return False

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
        self.journal.write(self.source_folder, [self.pending[m.item] for m in batch])
        self.target.send(self.destination, batch)
        while self.target.full:
            self.record(self.target.collect())

    def record(self, outcome: Sequence[Delivered]) -> None:
        rows = []
        size = 0
        for delivered in outcome:
            record = self.pending.pop(delivered.item)
            if delivered.ok:
                rows.append(
                    replace(record, state=DONE, target_uid=delivered.uid, target_uid_validity=delivered.uid_validity)
                )
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

    def finish(self) -> None:
        self.flush_found()
        self.flush()
        while self.target.pending:
            self.record(self.target.collect())


# restore


def selected(entry: Entry, options: RestoreOptions) -> bool:
    if entry.gone and not options.include_gone:
        return False
    if entry.internal_date is not None:
        day = entry.internal_date.date()
        if options.since and day < options.since:
            return False
        if options.before and day >= options.before:
            return False
    return True


def connect_target(endpoint: Endpoint, password: str, options: RestoreOptions) -> Target:
    if endpoint.scheme in SMTP_SCHEMES:
        from .targets.smtp import SmtpTarget

        if options.admin_user:
            raise UsageError("--admin-user is for IMAP targets, not SMTP")

        return SmtpTarget.connect(endpoint, password, options)
    from .targets.imap import ImapTarget

    return ImapTarget.connect(
        endpoint,
        password,
        ca_file=options.ca_file,
        timeout=options.timeout,
        automap=options.automap,
        into=options.into,
        auth=options.auth,
        admin_user=options.admin_user,
    )


def restore(
    archive: str,
    target_url: str,
    *,
    password: str,
    options: RestoreOptions = RestoreOptions(),
    progress: Progress | None = None,
) -> TransferSummary:
    """Put the archive's messages back on an IMAP account, or resend them over SMTP."""
    progress = progress or Progress()
    started = time.monotonic()
    endpoint = parse_url(target_url, no_tls=options.no_tls, schemes=IMAP_SCHEMES + SMTP_SCHEMES)
    smtp = endpoint.scheme in SMTP_SCHEMES
    if smtp and not options.recipients:
        raise UsageError("restore over SMTP needs at least one --to address")
    if not smtp and (options.recipients or options.sender or options.resent or options.rate_per_minute):
        raise UsageError("--to, --from, --resent and --rate apply to SMTP targets only")
    store = open_store(archive, mode="read" if options.dry_run else "write")
    reports: list[TransferReport] = []
    try:
        folders = [
            f
            for f in store.catalog.folders()
            if wanted(Folder(f.name, f.delimiter, f.attributes), options.include, options.exclude)
        ]
        target = connect_target(endpoint, password, options)
        try:
            journal = Journal(store.catalog.engine, target.identity, create=not options.dry_run)
            progress.plan(len(folders))
            for folder in folders:
                entries = [e for e in store.catalog.entries(folder.id) if selected(e, options)]
                name = target.destination(folder.name, folder.delimiter, folder.attributes)
                records = journal.records(folder.name)
                todo = [e for e in entries if not finished(records.get(str(e.id)))]
                base = TransferReport(
                    source=folder.name,
                    target=name,
                    planned=len(todo),
                    planned_bytes=sum(e.size for e in todo),
                    done_before=len(entries) - len(todo),
                )
                if options.dry_run or not todo:
                    report = base
                else:
                    try:
                        report = _restore_folder(store, target, journal, folder.name, name, todo, records, base, options, progress)
                    except ServerError as exc:
                        report = replace(base, failed=(str(exc),))
                reports.append(report)
                progress.folder_done(FolderReport(name=folder.name))
        finally:
            target.close()
    finally:
        store.close()
    return TransferSummary(archive, str(endpoint), tuple(reports), time.monotonic() - started, options.dry_run)


def _restore_folder(
    store,  # type: ignore[no-untyped-def]
    target: Target,
    journal: Journal,
    source_name: str,
    name: str,
    todo: list[Entry],
    records: dict[str, Record],
    base: TransferReport,
    options: RestoreOptions,
    progress: Progress,
) -> TransferReport:
    destination = target.open(name)
    transfer = FolderTransfer(
        target,
        journal,
        source_name,
        destination,
        records,
        # SMTP cannot be asked what arrived: keep at most one message in doubt.
        batch_messages=1 if target.window == 1 else options.batch_messages,
        batch_bytes=options.batch_bytes,
        progress=progress,
    )
    progress.folder_started(source_name, base.planned, base.planned_bytes)
    unreadable = []
    for entry in todo:
        try:
            raw = store.get(entry.location)
        except StoreError as exc:
            unreadable.append(f"{entry.id}: {exc}")
            continue
        transfer.offer(str(entry.id), raw, entry.flags, entry.internal_date, entry.sha256)
    transfer.finish()
    return replace(
        base,
        sent=transfer.sent,
        bytes=transfer.bytes,
        found=transfer.found,
        recovered=transfer.recovered,
        failed=tuple(unreadable + transfer.failed),
    )


# migrate


def default_state_path() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "mailbackup" / "migrate.sqlite"


def migrate(
    source_url: str,
    target_url: str,
    *,
    password: str,
    target_password: str,
    state: str | os.PathLike[str] | None = None,
    options: RestoreOptions = RestoreOptions(),
    progress: Progress | None = None,
) -> TransferSummary:
    """Copy an IMAP account to another, folder by folder, without a local archive; incremental."""
    from .targets.imap import ImapTarget

    progress = progress or Progress()
    started = time.monotonic()
    source_endpoint = parse_url(source_url, no_tls=options.no_tls, schemes=IMAP_SCHEMES)
    target_endpoint = parse_url(target_url, no_tls=options.no_tls, schemes=IMAP_SCHEMES)
    state_path = Path(state) if state else default_state_path()
    if options.dry_run and not state_path.exists():
        engine = create_engine("sqlite:///:memory:")
    else:
        state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(f"sqlite:///{state_path}")
    reports: list[TransferReport] = []
    try:
        source = ImapSource.connect(
            source_endpoint,
            password,
            ca_file=options.ca_file,
            timeout=options.timeout,
            auth=options.source_auth,
            admin_user=options.source_admin_user,
        )
        try:
            target = ImapTarget.connect(
                target_endpoint,
                target_password,
                ca_file=options.ca_file,
                timeout=options.timeout,
                automap=options.automap,
                into=options.into,
                auth=options.auth,
                admin_user=options.admin_user,
            )
            try:
                pair = f"imap://{source_endpoint.user}@{source_endpoint.host}:{source_endpoint.port} -> {target.identity}"
                journal = Journal(engine, pair, create=not options.dry_run)
                folders = [f for f in source.folders() if wanted(f, options.include, options.exclude)]
                # Cyrus keeps every personal folder under "INBOX.": that is the namespace, not a parent.
                prefix = source.personal_prefix()
                progress.plan(len(folders))
                for folder in folders:
                    name = target.destination(without_prefix(folder.name, prefix), folder.delimiter, folder.attributes)
                    if not folder.selectable:
                        report = TransferReport(source=folder.name, target=name, skipped="not selectable")
                    else:
                        try:
                            report = _migrate_folder(source, target, journal, folder, name, options, progress)
                        except ServerError as exc:
                            report = TransferReport(source=folder.name, target=name, failed=(str(exc),))
                    reports.append(report)
                    progress.folder_done(FolderReport(name=folder.name))
            finally:
                target.close()
        finally:
            source.close()
    finally:
        engine.dispose()
    return TransferSummary(str(source_endpoint), str(target_endpoint), tuple(reports), time.monotonic() - started, options.dry_run)


def without_prefix(name: str, prefix: str) -> str:
    """A source folder's name relative to its personal namespace ("INBOX.Work" -> "Work")."""
    if prefix and len(name) > len(prefix) and name.upper().startswith(prefix.upper()):
        return name[len(prefix):]
    return name


def _migrate_folder(
    source: ImapSource,
    target,  # type: ignore[no-untyped-def]  # ImapTarget
    journal: Journal,
    folder: Folder,
    name: str,
    options: RestoreOptions,
    progress: Progress,
) -> TransferReport:
    state = source.examine(folder)
    uids = source.uids() if state.exists else []
    records = journal.records(folder.name)

    def item(uid: int) -> str:
        return f"{state.uid_validity}:{uid}"

    todo = [u for u in uids if not finished(records.get(item(u)))]
    done = [u for u in uids if finished(records.get(item(u)))]
    sizes: dict[int, int] = {}
    for part in chunks(todo, 5000):
        sizes.update(source.sizes(part))
    base = TransferReport(
        source=folder.name, target=name, planned=len(todo), planned_bytes=sum(sizes.values()), done_before=len(done)
    )
    if options.dry_run:
        return base
    destination = target.open(name)
    flags_updated = _propagate_flags(source, target, journal, folder.name, destination, done, item, records)
    if not todo:
        return replace(base, flags_updated=flags_updated)
    transfer = FolderTransfer(
        target,
        journal,
        folder.name,
        destination,
        records,
        batch_messages=options.batch_messages,
        batch_bytes=options.batch_bytes,
        progress=progress,
    )
    progress.folder_started(folder.name, len(todo), base.planned_bytes)
    failed = []
    for batch, fetched in prefetch(source, batches(todo, sizes, options.batch_messages, options.batch_bytes), sizes):
        if isinstance(fetched, ServerError):
            failed.extend(f"UID {uid}: {fetched}" for uid in batch)
            continue
        messages, missing = fetched
        failed.extend(f"UID {uid}: source sent no body" for uid in missing)
        for message in messages:
            transfer.offer(item(message.uid or 0), message.raw, message.flags, message.internal_date, message.sha256)
    transfer.finish()
    return replace(
        base,
        sent=transfer.sent,
        bytes=transfer.bytes,
        found=transfer.found,
        recovered=transfer.recovered,
        flags_updated=flags_updated,
        failed=tuple(failed + transfer.failed),
    )


def prefetch(
    source: ImapSource, work: Iterator[list[int]], sizes: dict[int, int], depth: int = 2
) -> Iterator[tuple[list[int], tuple[list[Message], list[int]] | ServerError]]:
    """Fetch batches on a reader thread while the caller appends: the source and the
    target then work at the same time. The thread owns the source connection until
    the iterator is exhausted; any other failure is re-raised in the caller."""
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for batch in work:
                if stop.is_set():
                    return
                try:
                    slots.put((batch, source.fetch_uids(batch, sizes)))
                except ServerError as exc:
                    slots.put((batch, exc))
        except BaseException as exc:  # handed to the caller
            slots.put(exc)
            return
        slots.put(None)

    reader = threading.Thread(target=read, name="mailbackup-prefetch", daemon=True)
    reader.start()
    try:
        while (item := slots.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting for a free slot
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        reader.join()


def _propagate_flags(
    source: ImapSource,
    target,  # type: ignore[no-untyped-def]
    journal: Journal,
    source_name: str,
    destination: Destination,
    done: Sequence[int],
    item,  # type: ignore[no-untyped-def]
    records: dict[str, Record],
) -> int:
    """Set on the target the flags that changed on the source since they were last copied."""
    known = {}
    for uid in done:
        record = records[item(uid)]
        if (
            record.state == DONE
            and record.target_uid is not None
            and record.target_folder == destination.name
            and record.target_uid_validity == destination.uid_validity
        ):
            known[uid] = record
    if not known:
        return 0
    changes: dict[tuple[str, ...], list[int]] = {}
    remembered: list[tuple[str, tuple[str, ...]]] = []
    for part in chunks(sorted(known), 2000):
        for uid, flags in source.flags(part).items():
            record = known.get(uid)
            if record is not None and set(flags) != set(record.flags):
                changes.setdefault(tuple(sorted(flags)), []).append(record.target_uid)  # type: ignore[arg-type]
                remembered.append((record.item, flags))
    target.store_flags(destination.name, changes)
    journal.set_flags(source_name, remembered)
    return len(remembered)
