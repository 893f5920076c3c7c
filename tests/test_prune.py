"""prune-server deletes from the server only what a verified archive holds."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup
from mailbackup.cli import main
from mailbackup.errors import UsageError
from mailbackup.prune import parse_age

OLD = datetime(2020, 1, 1, 12, 0, tzinfo=timezone.utc)


def invoke(account, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": account.password}, catch_exceptions=False)


def subjects(dovecot, account, folder: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [m.raw.split(b"\r\n")[0].decode() for m in dovecot.fetch(account, folder)]


def seed(dovecot, account) -> None:  # type: ignore[no-untyped-def]
    for folder in ("INBOX", "Archive"):
        dovecot.append(account, folder, f"Subject: old {folder}\r\n\r\nbody\r\n".encode(), (), OLD)
        dovecot.append(account, folder, f"Subject: new {folder}\r\n\r\nbody\r\n".encode())


def test_dry_run_then_yes_deletes_only_old_archived_mail(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    archive = f"maildir:{tmp_path / 'md'}"
    backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True))
    dovecot.append(account, "INBOX", b"Subject: old but not archived\r\n\r\nbody\r\n", (), OLD)
    plan = invoke(account, "prune-server", account.url("imap"), archive, "--older-than", "365d", "--no-tls", "--json")
    assert plan.exit_code == 0, plan.output
    report = json.loads(plan.stdout)
    assert report["dry_run"] and report["deleted"] == 0
    assert {f["name"]: (f["candidates"], f["not_archived"]) for f in report["folders"]} == {"INBOX": (1, 1), "Archive": (1, 0)}
    assert len(subjects(dovecot, account, "INBOX")) == 3
    done = invoke(account, "prune-server", account.url("imap"), archive, "--older-than", "1y", "--no-tls", "--yes")
    assert done.exit_code == 0, done.output
    assert "deleted 1 messages" in done.stdout and "not in the archive and stay" in done.stdout
    assert subjects(dovecot, account, "INBOX") == ["Subject: new INBOX", "Subject: old but not archived"]
    assert subjects(dovecot, account, "Archive") == ["Subject: new Archive"]
    # The archive keeps what the server lost, marked gone.
    listing = {r["folder"]: r for r in map(json.loads, invoke(account, "ls", archive, "--json").stdout.splitlines())}
    assert listing["INBOX"]["gone"] == 1 and listing["INBOX"]["messages"] == 1


def test_a_failed_check_deletes_nothing_in_that_folder(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    archive = f"maildir:{tmp_path / 'md'}"
    backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True))
    [victim] = [p for p in (tmp_path / "md" / "INBOX" / "cur").iterdir()
                if b"old INBOX" in p.read_bytes()]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    done = invoke(account, "prune-server", account.url("imap"), archive, "--older-than", "365d", "--no-tls", "--yes")
    assert done.exit_code == 1
    assert "INBOX: nothing deleted" in done.output and "SHA-256" in done.output
    assert len(subjects(dovecot, account, "INBOX")) == 2
    assert subjects(dovecot, account, "Archive") == ["Subject: new Archive"]


def test_changed_uidvalidity_refuses_the_folder(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    archive = str(tmp_path / "a.db")
    backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True))
    dovecot.recreate_folder(account, "Archive")
    dovecot.append(account, "Archive", b"Subject: old Archive\r\n\r\nbody\r\n", (), OLD)
    done = invoke(account, "prune-server", account.url("imap"), archive, "--older-than", "30d", "--no-tls", "--yes")
    assert done.exit_code == 1 and "UIDVALIDITY changed" in done.output
    assert subjects(dovecot, account, "Archive") == ["Subject: old Archive"]


def test_pop3_prune_deletes_old_archived_messages(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Date: Wed, 01 Jan 2020 10:00:00 +0000\r\nSubject: old\r\n\r\nbody\r\n")
    dovecot.append(account, "INBOX", b"Subject: no date, so the download time counts\r\n\r\nbody\r\n")
    archive = str(tmp_path / "a.db")
    backup(account.url("pop3"), archive, password=account.password, options=BackupOptions(no_tls=True))
    done = invoke(account, "prune-server", account.url("pop3"), archive, "--older-than", "365d", "--no-tls", "--yes")
    assert done.exit_code == 0, done.output
    assert [s for s in subjects(dovecot, account, "INBOX")] == ["Subject: no date, so the download time counts"]


def test_parse_age() -> None:
    assert parse_age("365d") == parse_age("1y") == 365
    assert parse_age("2w") == 14 and parse_age("10") == 10
    with pytest.raises(UsageError):
        parse_age("soon")


def test_maildir_file_names_unchanged_by_dry_run(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    archive = f"maildir:{tmp_path / 'md'}"
    backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True))
    before = sorted(os.listdir(tmp_path / "md" / "INBOX" / "cur"))
    assert invoke(account, "prune-server", account.url("imap"), archive, "--older-than", "1d", "--no-tls").exit_code == 0
    assert sorted(os.listdir(tmp_path / "md" / "INBOX" / "cur")) == before
    assert len(subjects(dovecot, account, "INBOX")) == 2
