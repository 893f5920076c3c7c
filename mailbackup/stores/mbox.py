"""One mboxrd file per folder: 'A/B' lives in A.d/B.mbox, so files and directories never clash.

A location is 'path:offset:length:eol' of the quoted message body. The offset is
zero-padded so the catalog's max(location) is the last message written, which
tells where the committed part of the file ends.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import StoreError
from ..model import ArchivedFolder, Folder, Message
from . import Finding, Recovered
from .files import (
    CATALOG_DIR,
    crlf_foldable,
    directory_location,
    file_lock,
    folded_chunks,
    header_date,
    make_dirs,
    open_catalog,
    quote_from,
    safe_parts,
    set_catalog_aside,
    store_errors,
    unescape_part,
    unfold_crlf,
    unquote_from,
)

_FROM_LINE = re.compile(rb"From [^\n]*\n")
_SEPARATOR = re.compile(rb"^From ([^ \n]*) ([^\n]*)\n", re.MULTILINE)


def from_line(message: Message) -> bytes:
    """The separator carries the SHA-256, so repair can tell exactly where a message ends."""
    stamp = message.internal_date.timestamp() if message.internal_date else time.time()
    return b"From " + message.sha256.encode() + b"@mailbackup " + time.asctime(time.gmtime(stamp)).encode() + b"\n"


def parse_location(location: str) -> tuple[str, int, int, str]:
    path, offset, length, tag = location.rsplit(":", 3)
    return path, int(offset), int(length), tag


class MboxStore:
    kind = "mbox"

    def __init__(self, root: str, *, mode: str = "read", account: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.url = f"mbox:{self.root}"
        self.writable = mode == "write"
        self.catalog = open_catalog(self.root, self.kind, mode, account)
        self._ends: dict[int, int] = {}

    @staticmethod
    def accepts(url: str) -> str | None:
        return directory_location(url, "mbox")

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        return set_catalog_aside(Path(where))

    def _files(self) -> Iterator[tuple[str, Path]]:
        for path in sorted(self.root.rglob("*.mbox")):
            relative = path.relative_to(self.root).as_posix()
            if not relative.startswith(CATALOG_DIR + "/") and path.is_file():
                yield relative, path

    def holds_messages(self) -> bool:
        return any(path.stat().st_size > 0 for _, path in self._files())

    def unrecorded(self) -> Iterator[Finding]:
        """Between catalogued messages an mbox may hold only the separator and the next From line."""
        folders = self.catalog.folders()
        known_paths = {f.path for f in folders}
        for folder in folders:
            path = self.root / folder.path
            if not path.exists():
                continue  # every entry of it was already reported missing
            with open(path, "rb") as mbox:
                end = 0  # where the last catalogued message ended
                separator = b""  # what must follow it before the next From line
                for location in self.catalog.locations(folder.id):
                    _, offset, length, _ = parse_location(location)
                    if offset < end:
                        continue  # two entries for one location: checked once
                    gap = _read(mbox, end, offset - end)
                    if not (gap.startswith(separator) and _FROM_LINE.fullmatch(gap[len(separator) :])):
                        yield Finding(folder.name, f"{folder.path}: {offset - end} unexpected bytes at offset {end}")
                    end = offset + length
                    separator = b"\n" if length and _read(mbox, end - 1, 1) == b"\n" else b"\n\n"
                size = mbox.seek(0, os.SEEK_END)
                if size > end + len(separator) or (size > end and _read(mbox, end, size - end) != separator):
                    yield Finding(folder.name, f"{folder.path}: {size - end} bytes past the last message")
        for relative, _ in self._files():
            if relative not in known_paths:
                yield Finding(None, f"mbox file the catalog does not know: {relative}")

    def duplicates(self) -> Iterator[Finding]:
        return iter(())  # every copy in an mbox has its own catalog entry: the catalog sees them

    def recover(self) -> Iterator[Recovered]:
        """Rescan every mbox file: From lines split it; the SHA-256 in each From line tells the exact bytes.

        Files from before the From line carried the SHA-256 give the likeliest reading
        (CRLF folded when the text has no CR; one separator newline) and the date of the From line.
        """
        for relative, path in self._files():
            parts = [unescape_part(p[:-2] if p.endswith(".d") else p[:-5] if p.endswith(".mbox") else p) for p in relative.split("/")]
            folder = Folder("/".join(parts), "/")
            data = path.read_bytes()
            marks = list(_SEPARATOR.finditer(data))
            for number, mark in enumerate(marks):
                start = mark.end()
                stop = marks[number + 1].start() if number + 1 < len(marks) else len(data)
                found = _reading(data[start:stop], mark.group(1).decode("ascii", "replace").partition("@")[0])
                if found is None:
                    continue  # not a whole message (a torn tail): verify reports the bytes
                length, tag, raw, sha256 = found
                when = _asctime(mark.group(2)) or header_date(raw)
                location = f"{relative}:{start:015d}:{length}:{tag}"
                yield Recovered(folder, relative, location, location, sha256, len(raw), (), when)

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

    def stream(self, location: str) -> Iterator[bytes]:
        """get()'s bytes a piece at a time; pieces end at a line end, since >From unquoting is per line."""
        from . import STREAM_CHUNK

        relpath, offset, length, tag = parse_location(location)
        try:
            with open(self.root / relpath, "rb") as f:
                f.seek(offset)
                left, carry = length, b""
                while left > 0:
                    piece = f.read(min(STREAM_CHUNK, left))
                    if not piece:
                        raise StoreError(f"mbox {relpath} is shorter than the catalog says")
                    left -= len(piece)
                    data = carry + piece
                    cut = data.rfind(b"\n") + 1 if left else len(data)
                    data, carry = data[:cut], data[cut:]
                    if data:
                        data = unquote_from(data)
                        yield unfold_crlf(data) if tag == "lf" else data
        except OSError as exc:
            raise StoreError(f"cannot read {relpath}: {exc.strerror}") from exc

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        return location  # mbox bytes never change; flags live in the catalog

    def lock(self) -> AbstractContextManager[None]:
        return file_lock(self.root / CATALOG_DIR / "lock", self.url)

    def close(self) -> None:
        self.catalog.close()


def _reading(chunk: bytes, recorded: str) -> tuple[int, str, bytes, str] | None:
    """(length, eol tag, original bytes, SHA-256) of the message in chunk, the bytes between two From lines."""
    candidates = []
    for cut in (1, 2):
        if len(chunk) < cut or chunk[len(chunk) - cut :] != b"\n" * cut:
            continue
        body = chunk[: len(chunk) - cut]
        for tag in ("lf", "raw"):
            raw = unquote_from(body)
            raw = unfold_crlf(raw) if tag == "lf" else raw
            candidates.append((len(body), tag, raw))
    for length, tag, raw in candidates:
        digest = hashlib.sha256(raw).hexdigest()
        if digest == recorded:
            return length, tag, raw, digest
    if len(recorded) == 64 or not candidates:
        return None  # a SHA-256 that no reading matches: damaged bytes, left for verify
    # An older file: CRLF was folded when the text has no CR at all; one newline separates.
    body_has_cr = b"\r" in chunk
    for length, tag, raw in candidates:
        if (tag == "raw") == body_has_cr:
            return length, tag, raw, hashlib.sha256(raw).hexdigest()
    return None


def _asctime(text: bytes) -> datetime | None:
    try:
        return datetime.strptime(text.decode("ascii").strip(), "%a %b %d %H:%M:%S %Y").replace(tzinfo=timezone.utc)
    except (UnicodeDecodeError, ValueError):
        return None


def _read(mbox: object, offset: int, length: int) -> bytes:
    # A long gap cannot be a separator; reading 4 KB of it is enough to say so.
    mbox.seek(offset)  # type: ignore[attr-defined]  # an mmap or file: both have seek
    return mbox.read(min(length, 4096)) + (b"\0" if length > 4096 else b"")  # type: ignore[attr-defined]  # an mmap or file: both read bytes
