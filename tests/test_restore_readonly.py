"""Restore reads an archive it cannot write, and changes no byte of it.

Tests run as root, so write permission alone proves nothing: the restore runs with
CAP_DAC_OVERRIDE dropped (setpriv), as an ordinary user would on a read-only copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_restore_imap import bodies, seeded_archive

ROOT = Path(__file__).parent.parent
WITHOUT_DAC_OVERRIDE = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"]


def tree_hash(root: Path) -> str:
    """SHA-256 over every path, mode and file content under root (or of the one file)."""
    digest = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        info = path.lstat()
        digest.update(f"{path.relative_to(root.parent)}\0{stat.filemode(info.st_mode)}\0".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def make_read_only(root: Path) -> None:
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)


def writable_again(root: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_restore_and_dry_run_change_no_byte_of_a_read_only_archive(dovecot, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path, kind)
    root = tmp_path / "md" if kind == "maildir" else tmp_path / "a.sqlite"
    # A SQLite file only: its -wal/-shm are part of the archive while they exist.
    make_read_only(tmp_path if kind == "sqlite" else root)
    before = tree_hash(tmp_path)
    env = {**os.environ, "MAILBACKUP_PASSWORD": target.password}
    command = [*WITHOUT_DAC_OVERRIDE, sys.executable, "-m", "mailbackup", "restore", url, target.url("imap"), "--no-tls", "-q"]
    try:
        plan = subprocess.run(command + ["--dry-run"], env=env, cwd=ROOT, capture_output=True, text=True)
        assert plan.returncode == 0, plan.stderr
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert tree_hash(tmp_path) == before
    finally:
        writable_again(tmp_path)
    assert sum(len(v) for v in bodies(dovecot, target).values()) == count


def test_dropping_dac_override_really_denies_writes(tmp_path: Path) -> None:
    """The premise of the test above: without CAP_DAC_OVERRIDE, root cannot write a 0444 file."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    path = tmp_path / "f"
    path.write_bytes(b"x")
    make_read_only(tmp_path)
    try:
        denied = subprocess.run([*WITHOUT_DAC_OVERRIDE, "sh", "-c", f"echo y > {path}"], capture_output=True, text=True)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert path.read_bytes() == b"x"
    finally:
        writable_again(tmp_path)
