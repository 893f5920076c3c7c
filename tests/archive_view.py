"""Read an archive back through the library, for comparing with what a server holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mailbackup.stores import open_store

# Where a test keeps an archive of each kind under its tmp_path.
STORES: dict[str, Callable[[Path], str]] = {
    "maildir": lambda tmp: f"maildir:{tmp / 'md'}",
    "mbox": lambda tmp: f"mbox:{tmp / 'mb'}",
    "sqlite": lambda tmp: str(tmp / "a.sqlite"),
}


def archive_url(kind: str, tmp_path: Path) -> str:
    return STORES[kind](tmp_path)


@dataclass(frozen=True)
class Archived:
    uid: int | None
    raw: bytes
    flags: frozenset[str]
    internal_date: datetime | None
    gone: bool


def archived(url: str, *, include_gone: bool = False) -> dict[str, list[Archived]]:
    """Folder name -> its messages in UID order, with bytes as the store gives them back."""
    store = open_store(url, mode="read")
    try:
        names = {f.id: f.name for f in store.catalog.folders()}
        out: dict[str, list[Archived]] = {name: [] for name in names.values()}
        for entry in store.catalog.entries():
            if entry.gone and not include_gone:
                continue
            out[names[entry.folder_id]].append(
                Archived(entry.uid, store.get(entry.location), frozenset(entry.flags), entry.internal_date, entry.gone)
            )
        for messages in out.values():
            messages.sort(key=lambda m: m.uid or 0)
        return out
    finally:
        store.close()
