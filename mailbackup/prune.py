"""prune-server: free server space, deleting only what a verified backup holds.

Per folder: the server's UIDVALIDITY must match the archive's, every candidate
must be in the archive with bytes that re-hash to the catalog's SHA-256 and a
size equal to the server's. One failed check and nothing in that folder goes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .errors import MailbackupError, UsageError
from .model import Entry, Folder
from .net import Endpoint, parse_url
from .pipeline import BackupOptions, chunks, wanted
from .sources.imap import ImapSource
from .sources.pop3 import Pop3Source
from .stores import Store, open_store

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([dwy]?)")
_DAYS = {"": 1, "d": 1, "w": 7, "y": 365}


def parse_age(text: str) -> float:
    """'365d', '52w', '1y' or a plain number of days."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise UsageError(f"--older-than {text!r}: write a number of days such as 365d, 52w or 1y")
    return float(match.group(1)) * _DAYS[match.group(2)]


@dataclass(frozen=True)
class FolderPrune:
    name: str
    candidates: int = 0
    bytes: int = 0
    not_archived: int = 0
    deleted: int = 0
    refused: str | None = None


@dataclass(frozen=True)
class PruneReport:
    source: str
    archive: str
    cutoff: str
    dry_run: bool
    folders: tuple[FolderPrune, ...]

    @property
    def ok(self) -> bool:
        return not any(f.refused for f in self.folders)

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "archive": self.archive,
            "cutoff": self.cutoff,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "deleted": sum(f.deleted for f in self.folders),
            "folders": [f.__dict__ for f in self.folders],
        }


def verified(store: Store, entry: Entry, server_size: int | None) -> str | None:
    """Why this archived copy may not stand in for the server's, or None when it may."""
    try:
        raw = store.get(entry.location)
    except MailbackupError as exc:
        return f"stored copy unreadable ({exc})"
    if hashlib.sha256(raw).hexdigest() != entry.sha256:
        return f"stored copy of {entry.uid or entry.source_id} does not match its SHA-256"
    if server_size is not None and server_size != entry.size:
        return f"server size of {entry.uid or entry.source_id} differs from the archived copy"
    return None


def prune_imap_folder(source: ImapSource, store: Store, folder: Folder, cutoff: datetime, act: bool) -> FolderPrune:
    archived = store.catalog.folder(folder.name)
    if archived is None or archived.uid_validity is None:
        return FolderPrune(folder.name, refused="not in the archive; back it up first")
    state = source.examine(folder)
    if state.uid_validity != archived.uid_validity:
        return FolderPrune(folder.name, refused="UIDVALIDITY changed since the last backup; back it up first")
    # SEARCH BEFORE compares dates only, in the server's idea of the day.
    old = source.uids(["BEFORE", cutoff.date()]) if state.exists else []
    keep: list[int] = []
    size = missing = 0
    for part in chunks(old, 1000):
        entries = {e.uid: e for e in store.catalog.entries_for_uids(archived.id, archived.uid_validity, part)}
        sizes = source.sizes(part)
        for uid in part:
            entry = entries.get(uid)
            if entry is None:
                missing += 1  # the archive lacks it: never touched
                continue
            problem = verified(store, entry, sizes.get(uid))
            if problem:
                return FolderPrune(folder.name, len(keep), size, missing, refused=problem)
            keep.append(uid)
            size += entry.size
    report = FolderPrune(folder.name, len(keep), size, missing)
    if not act or not keep:
        return report
    again = source.examine(folder, writable=True)
    if again.uid_validity != archived.uid_validity:
        return FolderPrune(folder.name, len(keep), size, missing, refused="UIDVALIDITY changed during the run")
    for part in chunks(keep, 1000):
        source.expunge(part)
        store.catalog.mark_gone(archived.id, archived.uid_validity, part)
    return FolderPrune(folder.name, len(keep), size, missing, deleted=len(keep))


def prune_pop3(source: Pop3Source, store: Store, into: str, cutoff: datetime, act: bool) -> FolderPrune:
    archived = store.catalog.folder(into)
    if archived is None:
        return FolderPrune(into, refused="not in the archive; back it up first")
    by_id = {e.source_id: e for e in store.catalog.entries(archived.id) if e.source_id and not e.gone}
    doomed, size, missing = [], 0, 0
    for listed in source.listing():
        entry = by_id.get(listed.uidl) if listed.uidl else None
        if entry is None:
            missing += 1
            continue
        if entry.internal_date is None or entry.internal_date >= cutoff:
            continue
        # LIST sizes cannot be compared: POP3 adds a CRLF to a message that lacks one.
        problem = verified(store, entry, None)
        if problem:
            return FolderPrune(into, len(doomed), size, missing, refused=problem)
        doomed.append(listed.number)
        size += entry.size
    if act:
        for number in doomed:
            source.delete(number)
    return FolderPrune(into, len(doomed), size, missing, deleted=len(doomed) if act else 0)


def prune_server(
    source_url: str,
    archive: str,
    *,
    password: str,
    older_than_days: float,
    act: bool = False,
    options: BackupOptions = BackupOptions(),
) -> PruneReport:
    """Delete from the server what the archive holds and verifies, older than the cutoff; a dry run unless act."""
    if older_than_days <= 0:
        raise UsageError("--older-than must be more than 0 days")
    endpoint: Endpoint = parse_url(source_url, no_tls=options.no_tls, schemes=("imap", "imaps", "pop3", "pop3s"))
    cutoff = datetime.now(timezone.utc) - timedelta(days=older_than_days)
    store = open_store(archive, mode="write", account=f"{endpoint.user}@{endpoint.host}")
    folders: list[FolderPrune] = []
    try:
        with store.lock():
            if endpoint.scheme.startswith("pop3"):
                pop = Pop3Source.connect(endpoint, password, ca_file=options.ca_file, timeout=options.timeout, auth=options.auth)
                finished = False
                try:
                    report = prune_pop3(pop, store, options.into or "INBOX", cutoff, act)
                    folders.append(report)
                    # A refused check deletes nothing: hang up without QUIT.
                    finished = report.refused is None
                finally:
                    pop.close(commit=finished)
            else:
                imap = ImapSource.connect(endpoint, password, ca_file=options.ca_file, timeout=options.timeout, auth=options.auth)
                try:
                    for folder in imap.folders():
                        if folder.selectable and wanted(folder, options.include, options.exclude):
                            folders.append(prune_imap_folder(imap, store, folder, cutoff, act))
                finally:
                    imap.close()
    finally:
        store.close()
    return PruneReport(str(endpoint), store.url, cutoff.isoformat(timespec="seconds"), not act, tuple(folders))


