"""Records that cross layer boundaries: frozen, typed, free of protocol types."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

SPECIAL_USE = frozenset(
    {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
)


@dataclass(frozen=True)
class Folder:
    """A mailbox as the server names it (decoded from modified UTF-7)."""

    name: str
    delimiter: str | None = "/"
    attributes: frozenset[str] = frozenset()

    @property
    def parts(self) -> tuple[str, ...]:
        if not self.delimiter:
            return (self.name,)
        return tuple(self.name.split(self.delimiter))

    @property
    def special_use(self) -> str | None:
        found = sorted(self.attributes & SPECIAL_USE)
        return found[0] if found else None

    @property
    def selectable(self) -> bool:
        lowered = {a.lower() for a in self.attributes}
        return not lowered & {"\\noselect", "\\nonexistent"}


@dataclass(frozen=True)
class FolderState:
    """What EXAMINE told us about a folder."""

    uid_validity: int
    exists: int
    uid_next: int | None = None
    highest_modseq: int | None = None


@dataclass(frozen=True)
class Message:
    """One message exactly as the server sent it."""

    raw: bytes
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    uid: int | None = None
    source_id: str | None = None  # POP3 UIDL
    date_source: str | None = None  # POP3: which header internal_date came from
    sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.raw).hexdigest())

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class ArchivedFolder:
    """A folder as the catalog knows it."""

    id: int
    name: str
    delimiter: str | None
    attributes: frozenset[str]
    path: str
    uid_validity: int | None
    highest_modseq: int | None


@dataclass(frozen=True)
class Entry:
    """One message in one archived folder."""

    id: int
    folder_id: int
    uid: int | None
    uid_validity: int | None
    source_id: str | None
    sha256: str
    size: int
    flags: tuple[str, ...]
    internal_date: datetime | None
    location: str
    gone: bool
    # When this copy was first archived, and when the server stopped having it.
    archived_at: datetime | None = None
    gone_at: datetime | None = None


@dataclass(frozen=True)
class FolderReport:
    name: str
    new: int = 0
    bytes: int = 0
    flags_updated: int = 0
    gone: int = 0
    adopted: int = 0
    deleted: int = 0
    failed: tuple[str, ...] = ()
    skipped: str | None = None
    notes: tuple[str, ...] = ()
    elapsed: float = 0.0  # seconds this folder took, over every attempt of the run


@dataclass(frozen=True)
class Summary:
    """The outcome of one run."""

    source: str
    archive: str
    folders: tuple[FolderReport, ...]
    elapsed: float

    @property
    def new(self) -> int:
        return sum(f.new for f in self.folders)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.folders)

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(f.name, item) for f in self.folders for item in f.failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "archive": self.archive,
            "ok": self.ok,
            "folders": len(self.folders),
            "new": self.new,
            "bytes": self.bytes,
            "flags_updated": sum(f.flags_updated for f in self.folders),
            "gone": sum(f.gone for f in self.folders),
            "deleted": sum(f.deleted for f in self.folders),
            "elapsed": round(self.elapsed, 3),
            "skipped": {f.name: f.skipped for f in self.folders if f.skipped},
            "failed": {f.name: list(f.failed) for f in self.folders if f.failed},
            "notes": [note for f in self.folders for note in f.notes],
            "per_folder": [
                {
                    "name": f.name,
                    "new": f.new,
                    "bytes": f.bytes,
                    "flags_updated": f.flags_updated,
                    "gone": f.gone,
                    "adopted": f.adopted,
                    "deleted": f.deleted,
                    "elapsed": round(f.elapsed, 3),
                }
                for f in self.folders
            ],
        }


@dataclass(frozen=True)
class TransferReport:
    """One source folder (archived or on a server) and the target folder it went to."""

    source: str
    target: str
    planned: int = 0  # messages selected and not done before
    planned_bytes: int = 0
    sent: int = 0
    bytes: int = 0
    done_before: int = 0  # the journal says an earlier run delivered them, and the target agrees
    found: int = 0  # already on the target: skipped
    recovered: int = 0  # in flight when an earlier run stopped, and found on the target
    flags_updated: int = 0
    failed: tuple[str, ...] = ()
    skipped: str | None = None
    notes: tuple[str, ...] = ()  # e.g. why the journal was not trusted

    @property
    def progressed(self) -> bool:
        return bool(self.sent or self.found or self.recovered or self.flags_updated)


TRANSFER_COUNTS = ("planned", "planned_bytes", "sent", "bytes", "done_before", "found", "recovered", "flags_updated")


@dataclass(frozen=True)
class TransferSummary:
    """The outcome of one restore or migrate run."""

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
    def notes(self) -> list[tuple[str, str]]:
        return [(f.source, note) for f in self.folders for note in f.notes]

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, object]:
        total = {key: sum(getattr(f, key) for f in self.folders) for key in TRANSFER_COUNTS}
        return {
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "folders": len(self.folders),
            **total,
            "elapsed": round(self.elapsed, 3),
            "failed": {f.source: list(f.failed) for f in self.folders if f.failed},
            "notes": {f.source: list(f.notes) for f in self.folders if f.notes},
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
                    **({"notes": list(f.notes)} if f.notes else {}),
                }
                for f in self.folders
            ],
        }
