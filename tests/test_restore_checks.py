"""Restore and migrate check the target before trusting their journal (real Dovecot).

A folder deleted, re-created or emptied on the target is filled again; a new --into
is a new destination; --force checks every message; empty folders are created; an
intact target gets nothing twice.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from mailbackup.restore import RestoreOptions, restore
from tests.test_backup_imap import archive_url, run_backup, server_view
from tests.test_migrate import normalised, run_migrate, seed
from tests.test_restore_imap import restore_to, seeded_archive

ROOT = Path(__file__).parent.parent


def view(dovecot, account) -> dict[str, list[tuple[str, frozenset[str], object]]]:  # type: ignore[no-untyped-def]
    """Folder -> (SHA-256 of BODY[], flags, INTERNALDATE) per message, in order."""
    return {
        folder: [(hashlib.sha256(raw).hexdigest(), flags, when) for raw, flags, when in messages]
        for folder, messages in server_view(dovecot, account).items()
    }


def delete_folder(dovecot, account, folder: str) -> None:  # type: ignore[no-untyped-def]
    with dovecot.client(account) as imap:
        imap.delete_folder(folder)


def test_a_folder_deleted_on_the_target_is_restored_again_in_full(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    assert restore_to(target, url).sent == count
    want = view(dovecot, target)
    assert view(dovecot, source) == want
    lost = len(want["Entwürfe/Ökonomie"])
    delete_folder(dovecot, target, "Entwürfe/Ökonomie")
    again = restore_to(target, url)
    assert again.ok and (again.sent, again.as_dict()["done_before"]) == (lost, count - lost)
    assert view(dovecot, target) == want  # byte-exact, flags and dates, nothing twice
    [(folder, note)] = again.notes
    assert folder == "Entwürfe/Ökonomie" and "no longer on the target" in note
    # An intact target gets nothing.
    third = restore_to(target, url)
    assert (third.sent, third.as_dict()["found"], third.as_dict()["done_before"]) == (0, 0, count)
    assert third.notes == []
    assert view(dovecot, target) == want


def test_a_target_folder_re_created_with_a_new_uidvalidity_is_filled_again(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, _ = seeded_archive(dovecot, source, tmp_path)
    restore_to(target, url)
    want = view(dovecot, target)
    dovecot.recreate_folder(target, "Archive/2024")  # exists again, empty, new UIDVALIDITY
    again = restore_to(target, url)
    assert again.ok and again.sent == len(want["Archive/2024"])
    assert view(dovecot, target) == want
    assert any("new UIDVALIDITY" in note for _, note in again.notes)


def test_messages_expunged_on_the_target_are_sent_again_and_only_they(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, _ = seeded_archive(dovecot, source, tmp_path)
    restore_to(target, url)
    want = view(dovecot, target)
    with dovecot.client(target) as imap:
        imap.select_folder("INBOX")
        doomed = sorted(imap.search("ALL"))[:3]
        imap.delete_messages(doomed)
        imap.expunge()
    again = restore_to(target, url)
    assert again.ok and again.sent == 3
    assert sorted(view(dovecot, target)["INBOX"], key=repr) == sorted(want["INBOX"], key=repr)
    assert any("3 messages an earlier run put in INBOX are no longer there" in note for _, note in again.notes)


def test_a_new_into_is_a_new_destination(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    assert restore_to(target, url).sent == count
    elsewhere = restore_to(target, url, into="Restored")
    assert elsewhere.ok and elsewhere.sent == count
    got = view(dovecot, target)
    for folder, messages in view(dovecot, source).items():
        assert got[f"Restored/{folder}"] == messages
        assert got[folder] == messages


def test_force_checks_every_message_on_the_target_and_sends_only_what_is_missing(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    restore_to(target, url)
    want = view(dovecot, target)
    forced = restore_to(target, url, force=True)
    assert forced.ok and (forced.sent, forced.as_dict()["found"], forced.as_dict()["done_before"]) == (0, count, 0)
    assert view(dovecot, target) == want


def test_an_empty_archived_folder_is_created_by_restore(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    dovecot.append(source, "INBOX", b"Subject: one\r\nMessage-ID: <1@e>\r\n\r\nbody\r\n")
    with dovecot.client(source) as imap:
        imap.create_folder("Empty")
        imap.create_folder("Projects/Idle")
    url = archive_url("maildir", tmp_path)
    run_backup(source, url)
    env = {**os.environ, "MAILBACKUP_PASSWORD": target.password}
    plan = subprocess.run(
        [sys.executable, "-m", "mailbackup", "restore", url, target.url("imap"), "--no-tls", "--dry-run"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert plan.returncode == 0, plan.stderr
    assert "Empty -> Empty: 0 messages" in plan.stdout
    assert dovecot.folders(target) == ["INBOX"]
    summary = restore_to(target, url)
    assert summary.ok and summary.sent == 1
    assert set(dovecot.folders(target)) >= {"INBOX", "Empty", "Projects/Idle"}
    assert dovecot.fetch(target, "Empty") == []


def test_migrate_re_creates_a_target_folder_deleted_since_the_last_run(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed(dovecot, account)
    target = dovecot.add_user()
    state = tmp_path / "state.sqlite"
    assert run_migrate(account, target, state).sent == count
    want = normalised(server_view(dovecot, account), "/")
    lost = len(want["Archive/2024"])
    delete_folder(dovecot, target, "Archive/2024")
    again = run_migrate(account, target, state)
    assert again.ok and (again.sent, again.as_dict()["done_before"]) == (lost, count - lost)
    assert normalised(server_view(dovecot, target), "/") == want
    assert run_migrate(account, target, state).sent == 0


def test_the_journal_lives_outside_the_archive_and_a_lost_journal_sends_nothing_twice(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    state = tmp_path / "journal.sqlite"
    options = RestoreOptions(no_tls=True)
    assert restore(url, target.url("imap"), password=target.password, options=options, state=state).sent == count
    assert state.exists()
    # Another state database knows nothing: the target is the truth.
    fresh = restore(url, target.url("imap"), password=target.password, options=options, state=tmp_path / "other.sqlite")
    assert (fresh.sent, fresh.as_dict()["found"]) == (0, count)
    assert sum(len(v) for v in view(dovecot, target).values()) == count
