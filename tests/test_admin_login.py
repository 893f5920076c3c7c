"""Admin logins: a Dovecot master user backs up a user's mailbox with SASL PLAIN (authzid = the user)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import MASTER

from mailbackup.pipeline import BackupOptions, backup
from tests.archive_view import archived

ROOT = Path(__file__).parent.parent


def hashes(url: str) -> set[str]:
    return {hashlib.sha256(m.raw).hexdigest() for messages in archived(url).values() for m in messages}


def seed(dovecot, account) -> None:  # type: ignore[no-untyped-def]
    for i, folder in enumerate(["INBOX", "INBOX", "Archive/2024", "Sent"]):
        dovecot.append(account, folder, b"Subject: %d\r\nMessage-ID: <%d@adm>\r\n\r\nbody %d\r\n" % (i, i, i))


def test_master_user_backup_equals_user_password_backup(dovecot_master, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = dovecot_master.add_user()
    seed(dovecot_master, alice)
    own = str(tmp_path / "own.sqlite")
    as_admin = str(tmp_path / "admin.sqlite")
    assert backup(alice.url("imap"), own, password=alice.password, options=BackupOptions(no_tls=True)).new == 4
    env = {**os.environ, "MAILBACKUP_PASSWORD": MASTER[1]}
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "backup", alice.url("imap"), as_admin, "--no-tls", "--admin-user", MASTER[0], "-q"],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert hashes(as_admin) == hashes(own) and len(hashes(own)) == 4
    assert set(archived(as_admin)) == set(archived(own))


def test_master_user_backup_over_pop3(dovecot_master, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = dovecot_master.add_user()
    seed(dovecot_master, alice)
    url = str(tmp_path / "pop.sqlite")
    summary = backup(alice.url("pop3"), url, password=MASTER[1], options=BackupOptions(no_tls=True, admin_user=MASTER[0]))
    assert summary.new == 2  # POP3 sees the INBOX
    assert hashes(url) == {hashlib.sha256(m.raw).hexdigest() for m in dovecot_master.fetch(alice, "INBOX")}


def test_wrong_admin_password_exits_3(dovecot_master, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = dovecot_master.add_user()
    env = {**os.environ, "MAILBACKUP_PASSWORD": "not-the-admin-password"}
    for scheme in ("imap", "pop3"):
        done = subprocess.run(
            [sys.executable, "-m", "mailbackup", "backup", alice.url(scheme), str(tmp_path / f"{scheme}.sqlite"), "--no-tls",
             "--admin-user", MASTER[0]],
            env=env, cwd=ROOT, capture_output=True, text=True, check=False,
        )
        assert done.returncode == 3, done.stderr
        assert f"(admin {MASTER[0]})" in done.stderr


def test_the_users_own_password_is_no_admin_password(dovecot_master, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    alice = dovecot_master.add_user()
    env = {**os.environ, "MAILBACKUP_PASSWORD": alice.password}
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "backup", alice.url("imap"), str(tmp_path / "a.sqlite"), "--no-tls",
         "--admin-user", MASTER[0]],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 3
