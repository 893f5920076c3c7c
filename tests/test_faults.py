"""Faults with figures: cut lines, kill -9 and full disks lose and duplicate nothing.

The soak (tests/soak.py) runs here with small counts; run it alone for 50+ points.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailbackup.errors import DiskFullError
from mailbackup.model import Folder, Message
from mailbackup.stores import open_store
from tests.archive_view import archived
from tests.soak import CUT_KINDS, KILL_KINDS, run_soak, table

ROOT = Path(__file__).parent.parent
STORES = ["maildir", "mbox", "sqlite"]


def test_random_cut_points_lose_and_duplicate_nothing() -> None:
    cuts, _ = run_soak(points=12, kills=0, seed=random.randrange(1 << 30))
    print(table("cut point", cuts, "retried+finished", "exit-1 stops"))
    assert [r.tried for r in cuts] == [3] * len(CUT_KINDS)
    assert [(r.kind, r.lost, r.duplicated, r.bad) for r in cuts] == [(k, 0, 0, []) for k in CUT_KINDS]


def test_kill_9_at_random_moments_loses_and_duplicates_nothing() -> None:
    _, kills = run_soak(points=0, kills=len(KILL_KINDS), seed=random.randrange(1 << 30))
    print(table("kill -9", kills, "finished first", "killed/exit 1"))
    assert [(r.kind, r.tried, r.lost, r.duplicated, r.bad) for r in kills] == [(k, 1, 0, 0, []) for k in KILL_KINDS]


# full disk: unit level, no mount needed


def batch(count: int, size: int) -> list[Message]:
    return [Message(raw=b"Subject: %d\r\n\r\n%s\r\n" % (i, b"z" * size)) for i in range(count)]


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_a_write_that_hits_enospc_leaves_nothing_behind(tmp_path: Path, kind: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url = f"{kind}:{tmp_path / kind}"
    store = open_store(url, mode="write")
    folder = store.catalog.ensure_folder(Folder("INBOX"), store.folder_path(Folder("INBOX")))
    first = batch(3, 100)
    store.catalog.add(folder.id, 1, list(zip(first, store.put(folder, first))))
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / kind).rglob("*") if p.is_file() and ".mailbackup" not in p.parts)
    budget = [5000]  # bytes the "disk" still takes

    def full(fd, data, *args):  # type: ignore[no-untyped-def]
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real(fd, bytes(data)[: budget[0]], *args)
        budget[0] -= written
        return written

    if kind == "mbox":
        real = os.pwrite
        monkeypatch.setattr(os, "pwrite", full)
    else:
        from mailbackup.stores.maildir import MaildirStore

        written = MaildirStore._write

        def write(tmp: Path, message: Message, flags: str) -> str:  # the first files fit, then one is torn
            if budget[0] <= 0:
                (tmp / f"{message.sha256}.lf{flags}").write_bytes(message.raw[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= message.size
            return written(tmp, message, flags)

        monkeypatch.setattr(MaildirStore, "_write", staticmethod(write))
    with pytest.raises(DiskFullError, match="disk full while writing .*; free space and rerun"):
        store.put(folder, batch(4, 3000))
    monkeypatch.undo()
    after = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / kind).rglob("*") if p.is_file() and ".mailbackup" not in p.parts)
    assert after == before  # no partial file in tmp/, no bytes past the last message
    store.close()
    done = subprocess.run([sys.executable, "-m", "mailbackup", "verify", url], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sqlite_database_or_disk_is_full_becomes_disk_full_error(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "a.sqlite"), mode="write")
    folder = store.catalog.ensure_folder(Folder("INBOX"), "INBOX")
    with store.catalog.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
    # A connection-level cap on the file's size: SQLite then answers SQLITE_FULL.
    sa.event.listen(store.catalog.engine, "connect", lambda dbapi, _: dbapi.execute(f"PRAGMA max_page_count={pages + 2}"))
    store.catalog.engine.dispose()
    with pytest.raises(DiskFullError, match=r"disk full while writing .*a\.sqlite; free space and rerun"):
        messages = batch(5, 20000)
        store.catalog.add(folder.id, 1, list(zip(messages, store.put(folder, messages))))
    store.close()


# full disk: a real, small filesystem


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 3 MB tmpfs at tmp_path/disk; yields a function that grows it. Always unmounted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def cli(*args: str, password: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILBACKUP_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "mailbackup", *args], env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("kind", STORES)
def test_a_full_disk_stops_with_exit_1_and_a_rerun_after_freeing_space_completes(dovecot, account, small_disk, kind: str) -> None:  # type: ignore[no-untyped-def]
    mount_point, grow = small_disk
    # ~6 MB that does not compress: twice what the disk holds.
    raws = [b"Subject: %d\r\nMessage-ID: <%d@full>\r\n\r\n%s\r\n" % (i, i, os.urandom(50000).hex().encode()) for i in range(60)]
    dovecot.seed_maildir(account, "INBOX", ((raw, "S", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = {"maildir": f"maildir:{mount_point / 'a'}", "mbox": f"mbox:{mount_point / 'a'}", "sqlite": str(mount_point / "a.sqlite")}[kind]
    command = ["backup", account.url("imap"), url, "--no-tls", "-q", "--batch-messages", "5"]
    failed = cli(*command, password=account.password)
    assert failed.returncode == 1
    assert failed.stderr.startswith("mailbackup: error: disk full while writing ")
    assert failed.stderr.strip().endswith("; free space and rerun") and failed.stderr.count("\n") == 1, failed.stderr
    # The catalog holds only what was written: each entry reads back and re-hashes.
    partial = archived(url)["INBOX"]
    assert 0 < len(partial) < len(raws)
    assert Counter(hashlib.sha256(m.raw).hexdigest() for m in partial) <= Counter(hashlib.sha256(r).hexdigest() for r in raws)
    checked = cli("verify", url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    grow("24m")
    again = cli(*command, password=account.password)
    assert again.returncode == 0, again.stderr
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(raws)
    assert cli("verify", url).returncode == 0
