"""prune-server: free server space, deleting only what a verified backup holds.

Per folder: the server's UIDVALIDITY must match the archive's, every candidate
must be in the archive with bytes that re-hash to the catalog's SHA-256 and a
size equal to the server's. One failed check and nothing in that folder goes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from .errors import MailbackupError, UsageError, setting
from .model import ArchivedFolder, Entry, Folder
from .pipeline import BackupOptions, chunks, connection, wanted
from .sources import Source, SourceId, account_name, open_source, source_kind
from .stores import Store, open_store
from .stores.codec import content_name

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([dwy]?)")
_DAYS = {"": 1, "d": 1, "w": 7, "y": 365}


def parse_age(text: str) -> float:
    """'365d', '52w', '1y' or a plain number of days."""
    match = _AGE.fullmatch(text.strip().lower())
    if not match:
        raise UsageError(f"{setting('older_than')} {text!r}: write a number of days such as 365d, 52w or 1y")
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
    if content_name(store, raw) != entry.sha256:
        return f"stored copy of {entry.uid or entry.source_id} does not match its SHA-256"
    if server_size is not None and server_size != entry.size:
        return f"server size of {entry.uid or entry.source_id} differs from the archived copy"
    return None


def archived_entries(store: Store, archived: ArchivedFolder, validity: int | None, ids: Sequence[SourceId]) -> dict[SourceId, Entry]:
    """The archive's live entries for these source ids: by UID under a validity, else by source id."""
    if validity is not None:
        return {e.uid: e for e in store.catalog.entries_for_uids(archived.id, validity, ids) if e.uid is not None}  # type: ignore[arg-type]  # int UIDs under a validity
    asked = set(ids)
    return {e.source_id: e for e in store.catalog.entries(archived.id) if e.source_id in asked and not e.gone}


def prune_folder(source: Source, store: Store, folder: Folder, name: str, cutoff: datetime, act: bool) -> FolderPrune:
    """Check every candidate in one folder, then delete them all, or nothing."""
    traits = source.traits
    archived = store.catalog.folder(name)
    if archived is None or (traits.many_folders and archived.uid_validity is None):
        return FolderPrune(name, refused="not in the archive; back it up first")
    opened = source.open(folder)
    validity = opened.checkpoint.validity
    if validity != archived.uid_validity:
        return FolderPrune(name, refused="UIDVALIDITY changed since the last backup; back it up first")
    dated = source.before(cutoff)  # None: the source keeps no dates, so the archive's decide
    pool = dated if dated is not None else opened.ids
    keep: list[SourceId] = []
    size = missing = 0
    for part in chunks(pool, 1000 if validity is not None else max(len(pool), 1)):
        entries = archived_entries(store, archived, validity, part)
        # POP3 LIST sizes cannot be compared: the server adds a CRLF to a message that lacks one.
        sizes = {m.id: m.size for piece in source.listing(part) for m in piece} if traits.exact_sizes else {}
        for source_id in part:
            entry = entries.get(source_id)
            if entry is None:
                missing += 1  # the archive lacks it: never touched
                continue
            if dated is None and (entry.internal_date is None or entry.internal_date >= cutoff):
                continue
            problem = verified(store, entry, sizes.get(source_id) if traits.exact_sizes else None)
            if problem:
                return FolderPrune(name, len(keep), size, missing, refused=problem)
            keep.append(source_id)
            size += entry.size
    report = FolderPrune(name, len(keep), size, missing)
    if not act or not keep:
        return report
    again = source.open(folder, writable=True)
    if again.checkpoint.validity != archived.uid_validity:
        return FolderPrune(name, len(keep), size, missing, refused="UIDVALIDITY changed during the run")
    for part in chunks(keep, 1000):
        source.delete(part)
        if traits.deletes_at_close:
            continue  # gone only after QUIT; the next backup marks them
        if validity is not None:
            store.catalog.mark_gone(archived.id, validity, part)  # type: ignore[arg-type]  # int UIDs under a validity
        else:
            store.catalog.mark_gone_ids(archived.id, part)  # type: ignore[arg-type]  # str ids without a validity
    return replace(report, deleted=len(keep))


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
        raise UsageError(f"{setting('older_than')} must be more than 0 days")
    kind = source_kind(source_url)
    connect = connection(password, options)
    address = kind.address(source_url, connect)
    cutoff = datetime.now(timezone.utc) - timedelta(days=older_than_days)
    store = open_store(archive, mode="write", account=account_name(source_url))
    folders: list[FolderPrune] = []
    try:
        with store.lock():
            source = open_source(source_url, connect)
            clean = False
            try:
                many = source.traits.many_folders
                listed = source.folders()
                chosen = [f for f in listed if f.selectable and (not many or wanted(f, options.include, options.exclude))]
                plan = getattr(source, "plan", None)
                if plan is not None:  # Gmail: only what a backup downloads (All Mail), not label views
                    chosen = plan(listed, chosen).download
                for folder in chosen:
                    name = folder.name if many else options.into or folder.name
                    folders.append(prune_folder(source, store, folder, name, cutoff, act))
                # A refused check deletes nothing: a POP3 source hangs up without QUIT.
                clean = all(f.refused is None for f in folders)
            finally:
                source.close(commit=clean)
    finally:
        store.close()
    return PruneReport(address, store.url, cutoff.isoformat(timespec="seconds"), not act, tuple(folders))
