"""One Maildir per folder, nested as directories, flags in the standard ':2,' info.

File names are '<sha256>.<eol>:2,<flags>': deterministic, so a file written
before a crash but never catalogued is found and adopted on the next run.
<eol> is 'lf' when CRLF was folded to LF on disk, 'raw' when the bytes are as sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import StoreError
from ..model import ArchivedFolder, Folder, Message
from . import Finding, Recovered
from .files import (
    CATALOG_DIR,
    CHUNK,
    crlf_foldable,
    directory_location,
    file_lock,
    folded_chunks,
    fsync_path,
    header_date,
    make_dirs,
    open_catalog,
    safe_parts,
    set_catalog_aside,
    store_errors,
    syncfs,
    unescape_part,
    unfold_crlf,
)

FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "$Forwarded": "P",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}
WRITERS = 8


def info(flags: Sequence[str]) -> str:
    return ":2," + "".join(sorted(FLAG_LETTERS[f] for f in set(flags) if f in FLAG_LETTERS))


def folded(name: str) -> bool:
    """Whether the file holds the message with CRLF folded to LF (its unique part ends in .lf)."""
    return name.partition(":")[0].endswith(".lf")


def flags_from_name(name: str) -> tuple[str, ...]:
    _, _, letters = name.partition(":2,")
    return tuple(sorted(LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS))


class MaildirStore:
    kind = "maildir"

    def __init__(self, root: str, *, mode: str = "read", account: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.url = f"maildir:{self.root}"
        self.writable = mode == "write"
        self.catalog = open_catalog(self.root, self.kind, mode, account)
        self._pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="maildir-write")

    @staticmethod
    def accepts(url: str) -> str | None:
        return directory_location(url, "maildir")

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        return set_catalog_aside(Path(where))

    def folder_path(self, folder: Folder) -> str:
        return "/".join(safe_parts(folder))

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        base = self.root / folder.path
        keys = [(m.sha256, info(m.flags)) for m in messages]
        names: dict[tuple[str, str], str] = {}  # (SHA-256, info) -> its file's name in cur/
        pending: dict[tuple[str, str], Message] = {}
        with store_errors(base):
            for sub in ("cur", "new", "tmp"):
                make_dirs(base / sub)
            for key, message in zip(keys, messages):
                if key in names or key in pending:
                    continue
                # Already in cur/: an orphan of a crashed run, or the same bytes twice.
                present = self._present(base / "cur", *key)
                if present is not None:
                    names[key] = present
                else:
                    pending[key] = message
            if pending:
                names.update(self._write_batch(base, pending))
        return [f"{folder.path}/cur/{names[key]}" for key in keys]

    @staticmethod
    def _present(cur: Path, sha256: str, flags: str) -> str | None:
        for tag in ("lf", "raw"):
            if (cur / f"{sha256}.{tag}{flags}").exists():
                return f"{sha256}.{tag}{flags}"
        return None

    def _write_batch(self, base: Path, pending: dict[tuple[str, str], Message]) -> dict[tuple[str, str], str]:
        """Write each message into tmp/, sync them all, then rename them into cur/."""
        # Creating a file is a slow, latency-bound syscall on many filesystems; a few
        # threads overlap them. The batch as a whole still goes write -> sync -> rename.
        writes = {key: self._pool.submit(self._write, base / "tmp", m, key[1]) for key, m in pending.items()}
        wait(writes.values())  # every writer done before any cleanup: none may create a file after it
        written = {key: write.result() for key, write in writes.items() if write.exception() is None}
        try:
            for write in writes.values():
                write.result()
            # One flush for the batch instead of one fsync per file.
            if not syncfs(base):
                for name in written.values():
                    fsync_path(base / "tmp" / name)
        except OSError:
            # A full disk: take back the batch's files, torn ones too, so the space is free
            # again and the archive holds nothing the catalog does not know.
            for sha256, flags in pending:
                for tag in ("lf", "raw"):
                    (base / "tmp" / f"{sha256}.{tag}{flags}").unlink(missing_ok=True)
            raise
        for name in written.values():
            os.rename(base / "tmp" / name, base / "cur" / name)
        fsync_path(base / "cur")
        return written

    @staticmethod
    def _write(tmp: Path, message: Message, flags: str) -> str:
        """Write message into tmp/ under its name, which says whether CRLF was folded; returns the name."""
        raw = message.raw
        pieces: Iterable[bytes]
        if len(raw) > CHUNK:  # folded a megabyte at a time: no second copy of a big message
            fold = crlf_foldable(raw)
            pieces = folded_chunks(raw, fold)
        else:
            # Fold first, then see whether folding is exact (every LF had its CR): one pass
            # fewer than counting CRLF beforehand, the most CPU Maildir spends on a message.
            body = raw.replace(b"\r\n", b"\n")
            fold = len(raw) - len(body) == raw.count(b"\n")
            pieces = (body if fold else raw,)
        name = f"{message.sha256}.{'lf' if fold else 'raw'}{flags}"
        path = tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return name

    def _find(self, location: str) -> Path:
        path = self.root / location
        if path.exists():
            return path
        # A flag rename the catalog has not caught up with: same unique part, other info.
        unique = path.name.partition(":")[0]
        for candidate in path.parent.iterdir():
            if candidate.name.partition(":")[0] == unique:
                return candidate
        raise StoreError(f"message file missing from the archive: {location}")

    def get(self, location: str) -> bytes:
        path = self._find(location)
        data = path.read_bytes()
        return unfold_crlf(data) if folded(path.name) else data

    def stream(self, location: str) -> Iterator[bytes]:
        """get()'s bytes a piece at a time (LF to CRLF is per byte, so any cut is safe)."""
        from . import STREAM_CHUNK

        path = self._find(location)
        unfold = folded(path.name)
        try:
            with open(path, "rb") as f:
                for piece in iter(lambda: f.read(STREAM_CHUNK), b""):
                    yield unfold_crlf(piece) if unfold else piece
        except OSError as exc:
            raise StoreError(f"cannot read {location}: {exc.strerror}") from exc

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        path = self._find(location)
        unique = path.name.partition(":")[0]
        new_location = f"{location.rpartition('/')[0]}/{unique}{info(flags)}"
        new_path = self.root / new_location
        if new_path != path:
            with store_errors(path):
                os.rename(path, new_path)
        return new_location

    def _message_dirs(self) -> Iterator[tuple[str, Path]]:
        """(folder path, directory) of every cur/, new/ and tmp/ below the root, the catalog's own aside."""
        for directory, subdirs, _files in os.walk(self.root):
            here = Path(directory)
            if here == self.root:
                subdirs[:] = [d for d in subdirs if d != CATALOG_DIR]
                continue
            subdirs.sort()
            if here.name in ("cur", "new", "tmp"):
                yield here.parent.relative_to(self.root).as_posix(), here

    def holds_messages(self) -> bool:
        return any(any(here.iterdir()) for path, here in self._message_dirs() if here.name == "cur")

    def unrecorded(self) -> Iterator[Finding]:
        """Every file in a cur/, new/ or tmp/ must be a catalogued message file."""
        by_path = {f.path: f for f in self.catalog.folders()}
        for path, here in self._message_dirs():
            folder = by_path.get(path)
            for name in sorted(os.listdir(here)):
                unique = name.partition(":")[0]
                # Only cur/ holds finished messages; the info after ':' may lag a flag rename.
                known = (
                    folder is not None
                    and here.name == "cur"
                    and self.catalog.has_location_prefix(folder.id, f"{path}/cur/{unique}:")
                )
                if not known:
                    yield Finding(folder.name if folder else None, f"file the catalog does not know: {path}/{here.name}/{name}")

    def duplicates(self) -> Iterator[Finding]:
        """More files in one folder holding one SHA-256 than the catalog has entries for it.

        Two server messages with the same bytes and other flags are two files and two
        entries; a third file with those bytes is a copy nothing accounts for.
        """
        by_path = {f.path: f for f in self.catalog.folders()}
        for path, here in self._message_dirs():
            if here.name != "cur":
                continue
            seen: dict[str, list[str]] = {}
            for name in os.listdir(here):
                seen.setdefault(name.partition(".")[0], []).append(name)
            folder = by_path.get(path)
            for sha256, names in sorted(seen.items()):
                if len(names) > 1 and (folder is None or len(names) > self.catalog.copies(folder.id, sha256)):
                    where = folder.name if folder else None
                    yield Finding(where, f"{len(names)} files hold {sha256[:16]}… in {path}/cur: {', '.join(sorted(names))}")

    def recover(self) -> Iterator[Recovered]:
        """Name, flags and bytes from each file in cur/; the date from the Date header (Maildir keeps no other)."""
        for path, here in self._message_dirs():
            if here.name != "cur":
                continue
            folder = Folder("/".join(unescape_part(p) for p in path.split("/")), "/")
            for name in sorted(os.listdir(here)):
                sha256 = name.partition(".")[0]
                if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
                    continue  # not a file mailbackup wrote; verify lists it as unrecorded
                location = f"{path}/cur/{name}"
                raw = self.get(location)
                # The file was renamed into cur/ once its bytes were durable: its mtime is when it was archived.
                written = datetime.fromtimestamp((here / name).stat().st_mtime, timezone.utc)
                yield Recovered(folder, path, location, f"{path}/cur/{name.partition(':')[0]}:", sha256, len(raw), flags_from_name(name), header_date(raw), written)

    def lock(self) -> AbstractContextManager[None]:
        return file_lock(self.root / CATALOG_DIR / "lock", self.url)

    def close(self) -> None:
        self._pool.shutdown()
        self.catalog.close()
