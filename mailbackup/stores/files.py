"""Byte and file helpers shared by the file-based stores (Maildir, mbox)."""

from __future__ import annotations

import ctypes
import email.utils
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..catalog import Catalog, create_engine
from ..errors import (
    AccountMismatch,
    ArchiveLocked,
    ArchiveReadOnly,
    CatalogDamaged,
    DiskFullError,
    NotAnArchive,
    StoreError,
    UsageError,
)
from ..model import Folder

CHUNK = 1 << 20
RESERVED = {"cur", "new", "tmp"}
CATALOG_DIR = ".mailbackup"


def safe_part(part: str) -> str:
    """Map one folder-name component to a file name that cannot leave its directory.

    Percent-escapes '%', '/', '\\', control characters and a leading '.', so '..',
    absolute names and hidden files cannot arise and the mapping stays one-to-one.
    """
    out = []
    for i, ch in enumerate(part):
        if ch in "%/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F or (i == 0 and ch == "."):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    name = "".join(out)
    if not name:
        return "%"  # '%' alone never comes out of escaping, so it can stand for ''
    if name.lower() in RESERVED:  # would collide with a Maildir's own cur/new/tmp
        name = f"%{ord(name[0]):02X}{name[1:]}"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > 200:  # file names stop at 255 bytes
        digest = hashlib.sha256(encoded).hexdigest()[:16]
        name = encoded[:150].decode("utf-8", "ignore") + "%~" + digest
    return name


def safe_parts(folder: Folder) -> list[str]:
    return [safe_part(p) for p in folder.parts]


def crlf_foldable(raw: bytes) -> bool:
    """True when every LF is part of a CRLF, so CRLF->LF->CRLF gives raw back exactly."""
    return raw.count(b"\n") == raw.count(b"\r\n")


def line_chunks(raw: bytes, size: int = CHUNK) -> Iterator[bytes]:
    """Split raw into pieces that each end just after a LF (or at the end).

    Line-local transforms (CRLF folding, >From quoting) can then run piecewise,
    so a huge message costs one chunk of extra memory, not a full copy.
    """
    if len(raw) <= size:
        yield raw
        return
    view = memoryview(raw)
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start + size)
        end = len(raw) if end < 0 else end + 1
        yield bytes(view[start:end])
        start = end


def folded_chunks(raw: bytes, fold: bool) -> Iterator[bytes]:
    """raw in line-aligned pieces, with CRLF written as LF when fold (see crlf_foldable)."""
    for chunk in line_chunks(raw):
        yield chunk.replace(b"\r\n", b"\n") if fold else chunk


def unfold_crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def syncfs(path: Path) -> bool:
    """Flush the whole filesystem holding path in one call; False if unsupported."""
    if _syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create a directory chain with mode 0700."""
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            try:
                parent.mkdir(mode=0o700)
            except FileExistsError:
                pass


@contextmanager
def store_errors(where: Path | str) -> Iterator[None]:
    """Turn OS errors into the archive's own errors, ENOSPC first."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while writing {where}; free space and rerun") from exc
        raise StoreError(f"cannot write {where}: {exc.strerror or exc}") from exc


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on path; refuse at once if another process holds it."""
    with store_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveLocked(f"another mailbackup run is writing {what}; try again when it ends") from None
        yield
    finally:
        os.close(fd)  # closing drops the lock


def directory_location(url: str, prefix: str) -> str | None:
    """DIR from 'prefix:DIR', with ~ expanded (a shell leaves 'maildir:~/x' alone)."""
    if not url.startswith(prefix + ":"):
        return None
    return str(Path(url[len(prefix) + 1 :]).expanduser().absolute())


def require_writable(path: Path, what: str) -> None:
    """Say in one line that a writing command cannot write here (read-only mount, snapshot, chmod)."""
    if path.exists() and not os.access(path, os.W_OK):
        raise ArchiveReadOnly(f"cannot write {what}: {path} is read-only; this command needs write access to the archive")


def open_catalog(root: Path, kind: str, mode: str, account: str | None) -> Catalog:
    """The catalog of a directory archive: a SQLite file inside it, scoped to its one account.

    Reading creates nothing: an empty directory reads as an empty archive, and any
    other directory that is not a mailbackup archive is refused.
    """
    marker = root / CATALOG_DIR / "kind"
    database = root / CATALOG_DIR / "catalog.sqlite"
    if mode == "read":
        if not root.is_dir():
            raise NotAnArchive(f"no archive at {root}" if not root.exists() else f"{root} is not a directory")
        if not marker.exists():
            if any(root.iterdir()):
                raise NotAnArchive(f"{root} is not a mailbackup archive")
            catalog = Catalog(create_engine("sqlite:///:memory:"))  # an empty directory: an empty archive
            catalog.choose_account(account, claim=False, several=False)
            return catalog
        check_kind(root, marker, kind)
        if not database.exists():
            raise CatalogDamaged(f"the catalog of {root} is missing; run 'mailbackup repair {kind}:{root}'")
        try:
            catalog = Catalog(create_engine(f"sqlite:///{database}", read_only=True), read_only=True)
        except NotAnArchive:  # the marker says it is one: its catalog is what is wrong
            raise CatalogDamaged(f"the catalog of {root} is empty or lost; run 'mailbackup repair {kind}:{root}'") from None
        catalog.choose_account(account, claim=False, several=False)
        return catalog
    if not root.exists():
        with store_errors(root):
            make_dirs(root)
    elif not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    require_writable(root, f"{kind}:{root}")
    require_writable(root / CATALOG_DIR, f"{kind}:{root}")
    require_writable(database, f"{kind}:{root}")
    with store_errors(root):
        if marker.exists():
            check_kind(root, marker, kind)
        else:
            if any(p.name != CATALOG_DIR for p in root.iterdir()):
                raise UsageError(f"{root} is not empty and not a mailbackup archive")
            make_dirs(root / CATALOG_DIR)
            marker.write_text(kind + "\n")
            marker.chmod(0o600)
    recorded = root / CATALOG_DIR / "account"
    held = recorded.read_text().strip() if recorded.exists() else None
    if account is not None and held and held != account:
        raise AccountMismatch(
            f"{kind}:{root} holds the mail of {held}, not {account}; back up {account} into an archive of its own"
        )
    catalog = Catalog(create_engine(f"sqlite:///{database}"))
    try:
        catalog.choose_account(account or held, claim=True, several=False)
    except BaseException:
        catalog.close()
        raise
    if catalog.account and not held:
        # Beside the catalog too, so the identity outlives a lost catalog (repair reads it).
        with store_errors(recorded):
            recorded.write_text(catalog.account + "\n")
            recorded.chmod(0o600)
    return catalog


def set_catalog_aside(root: Path) -> str:
    """Rename the catalog (and its -wal/-shm) to catalog.sqlite.damaged-<time>; nothing is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    database = root / CATALOG_DIR / "catalog.sqlite"
    aside = database.with_name(f"catalog.sqlite.damaged-{stamp}")
    with store_errors(database):
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{database}{suffix}")
            if part.exists():
                os.rename(part, Path(f"{aside}{suffix}"))
    return str(aside)


def check_kind(root: Path, marker: Path, kind: str) -> None:
    found = marker.read_text().strip()
    if found != kind:
        raise UsageError(f"{root} is a {found} archive, not {kind}: use {found}:{root}")


def header_date(raw: bytes) -> datetime | None:
    """The Date: header as a datetime, or None; what a store without dates of its own can offer."""
    head = raw[:65536].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = re.search(rb"^Date:[ \t]*(.*(?:\r?\n[ \t].*)*)", head, re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(match.group(1).decode("ascii", "replace").strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def unescape_part(name: str) -> str:
    """safe_part backwards: '%XX' escapes to their bytes (a shortened long name stays as it is)."""
    if name == "%":
        return ""
    if "%~" in name or "%" not in name:
        return name
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%" and i + 3 <= len(name):
            try:
                raw.append(int(name[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        raw.extend(name[i].encode("utf-8", "surrogatepass"))
        i += 1
    return raw.decode("utf-8", "surrogatepass")


_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_QUOTED_FROM_LINE = re.compile(rb"^>(>*From )", re.MULTILINE)


def quote_from(data: bytes) -> bytes:
    """mboxrd: add one '>' to every line that matches ^>*From ."""
    # A (?m)^ regex tries every offset; most messages have no such line at all.
    return _FROM_LINE.sub(rb">\1", data) if b"From " in data else data


def unquote_from(data: bytes) -> bytes:
    """mboxrd: remove one '>' from every line that matches ^>+From ."""
    return _QUOTED_FROM_LINE.sub(rb"\1", data) if b"From " in data else data
