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
