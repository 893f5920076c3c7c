"""One mboxrd file per folder: 'A/B' lives in A.d/B.mbox, so files and directories never clash.

A location is 'path:offset:length:eol' of the quoted message body. The offset is
zero-padded so the catalog's max(location) is the last message written, which
tells where the committed part of the file ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from ..errors import StoreError
from ..model import ArchivedFolder, Folder, Message
from .files import (
    CATALOG_DIR,
    file_lock,
    crlf_foldable,
    folded_chunks,
    make_dirs,
    open_catalog,
    quote_from,
    safe_parts,
    store_errors,
    unfold_crlf,
    unquote_from,
)


def from_line(message: Message) -> bytes:
    stamp = message.internal_date.timestamp() if message.internal_date else time.time()
    return b"From MAILER-DAEMON " + time.asctime(time.gmtime(stamp)).encode() + b"\n"


def parse_location(location: str) -> tuple[str, int, int, str]:
    path, offset, length, tag = location.rsplit(":", 3)
    return path, int(offset), int(length), tag


class MboxStore:
    kind = "mbox"

    def __init__(self, root: str, *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        self.url = f"mbox:{self.root}"
        self.catalog = open_catalog(self.root, self.kind, create)
        self._ends: dict[int, int] = {}

    def folder_path(self, folder: Folder) -> str:
        parts = safe_parts(folder)
        return "/".join([p + ".d" for p in parts[:-1]] + [parts[-1] + ".mbox"])

    def _committed_end(self, folder: ArchivedFolder, path: Path) -> int:
        last = self.catalog.last_location(folder.id)
        if last is None:
            return 0
        _, offset, length, _ = parse_location(last)
        with open(path, "rb") as f:
            f.seek(offset + length - 1)
            ends_in_newline = length > 0 and f.read(1) == b"\n"
        return offset + length + (1 if ends_in_newline else 2)

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        path = self.root / folder.path
        locations: list[str] = []
        with store_errors(path):
            make_dirs(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if folder.id not in self._ends:
                    # Cut off whatever a crashed run wrote past the last catalogued message.
                    self._ends[folder.id] = self._committed_end(folder, path)
                end = self._ends[folder.id]
                os.ftruncate(fd, end)
                try:
                    self._ends[folder.id] = self._append(fd, end, folder, messages, locations)
                except OSError:
                    # A full disk: cut the batch off again, so the file ends at the last
                    # catalogued message and the space is free for the rerun. Unbuffered
                    # writes, so no buffer can land past the cut when the file closes.
                    os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)
        return locations

    @staticmethod
    def _append(fd: int, position: int, folder: ArchivedFolder, messages: Sequence[Message], locations: list[str]) -> int:
        """Write the batch at position and fsync it; add each message's location; return the new end."""

        def write(data: bytes) -> None:
            nonlocal position
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, position)
                position += written
                view = view[written:]

        for message in messages:
            fold = crlf_foldable(message.raw)
            write(from_line(message))
            offset = position
            last = b""
            for chunk in folded_chunks(message.raw, fold):
                piece = quote_from(chunk)
                write(piece)
                last = piece[-1:] or last
            length = position - offset
            write(b"\n" if last == b"\n" else b"\n\n")
            locations.append(f"{folder.path}:{offset:015d}:{length}:{'lf' if fold else 'raw'}")
        os.fsync(fd)
        return position

    def get(self, location: str) -> bytes:
        relpath, offset, length, tag = parse_location(location)
        try:
            with open(self.root / relpath, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise StoreError(f"cannot read {relpath}: {exc.strerror}") from exc
        if len(data) != length:
            raise StoreError(f"mbox {relpath} is shorter than the catalog says")
        data = unquote_from(data)
        return unfold_crlf(data) if tag == "lf" else data

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        return location  # mbox bytes never change; flags live in the catalog

    def lock(self) -> AbstractContextManager[None]:
        return file_lock(self.root / CATALOG_DIR / "lock", self.url)

    def close(self) -> None:
        self.catalog.close()
