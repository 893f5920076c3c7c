"""verify: damage real bytes in every store and see it reported; compare with a live server."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup
from mailbackup.cli import main
from mailbackup.stores import open_store
from mailbackup.stores.mbox import parse_location
from mailbackup.verify import CORRUPT, MISSING, NOT_ARCHIVED, NOT_ON_SERVER, UNRECORDED, AgainstOptions, Problem, verify
from tests.archive_view import archive_url

STORES = ["maildir", "mbox", "sqlite"]


def seeded(dovecot, account, tmp_path: Path, kind: str) -> str:  # type: ignore[no-untyped-def]
    for i in range(4):
        body = b"From the start\r\n>From quoted\r\nline %d\r\n" % i
        dovecot.append(account, "INBOX", b"Subject: m%d\r\n\r\n" % i + body, ("\\Seen",) if i % 2 else (),
                       datetime(2021, 1, 1 + i, tzinfo=timezone.utc))
    dovecot.append(account, "Archive/2024", b"Subject: lf only\n\nbare LF body\n")
    url = archive_url(kind, tmp_path)
    summary = backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    assert summary.ok and summary.new == 5
    return url


def problems(url: str, against: AgainstOptions | None = None) -> list[Problem]:
    found: list[Problem] = []
    summary = verify(url, report=found.append, against=against)
    assert summary.ok == (not found)
    assert sum(summary.problems.values()) == len(found)
    return found


def first_location(url: str) -> tuple[str, str]:
    store = open_store(url, mode="read")
    try:
        inbox = store.catalog.folder("INBOX")
        assert inbox is not None
        entry = next(store.catalog.entries(inbox.id))
        return entry.location, entry.sha256
    finally:
        store.close()


@pytest.mark.parametrize("kind", STORES)
def test_clean_archive_passes(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, kind)
    found: list[Problem] = []
    summary = verify(url, report=found.append)
    assert found == [] and summary.ok
    assert summary.checked == 5


@pytest.mark.parametrize("kind", STORES)
def test_one_flipped_byte_is_reported_corrupt(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, kind)
    location, sha256 = first_location(url)
    if kind == "maildir":
        path = tmp_path / "md" / location
        data = bytearray(path.read_bytes())
        data[3] ^= 0x01
        path.write_bytes(bytes(data))
    elif kind == "mbox":
        relpath, offset, _, _ = parse_location(location)
        with open(tmp_path / "mb" / relpath, "r+b") as mbox:
            mbox.seek(offset + 3)
            byte = mbox.read(1)[0]
            mbox.seek(offset + 3)
            mbox.write(bytes([byte ^ 0x01]))
    else:
        with sqlite3.connect(tmp_path / "a.sqlite") as db:
            raw = bytearray(db.execute("SELECT raw FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()[0])
            raw[3] ^= 0x01
            db.execute("UPDATE blobs SET raw = ? WHERE sha256 = ?", (bytes(raw), sha256))
    [problem] = problems(url)
    assert (problem.kind, problem.folder) == (CORRUPT, "INBOX")


def test_deleted_maildir_file_is_missing(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, "maildir")
    location, _ = first_location(url)
    (tmp_path / "md" / location).unlink()
    [problem] = problems(url)
    assert (problem.kind, problem.folder) == (MISSING, "INBOX")


def test_deleted_blob_and_truncated_mbox_are_missing(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, "sqlite")
    _, sha256 = first_location(url)
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
    assert [p.kind for p in problems(url)] == [MISSING]
    mbox_url = archive_url("mbox", tmp_path)
    backup(account.url("imap"), mbox_url, password=account.password, options=BackupOptions(no_tls=True))
    (tmp_path / "mb" / "Archive.d" / "2024.mbox").unlink()
    assert [(p.kind, p.folder) for p in problems(mbox_url)] == [(MISSING, "Archive/2024")]


@pytest.mark.parametrize("kind", STORES)
def test_extra_bytes_are_reported_unrecorded(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, kind)
    extra = b"From MAILER-DAEMON Thu Jan  1 00:00:00 2021\nSubject: planted\n\nnot in the catalog\n"
    if kind == "maildir":
        (tmp_path / "md" / "INBOX" / "cur" / ("0" * 64 + ".raw:2,S")).write_bytes(extra)
        (tmp_path / "md" / "INBOX" / "new" / "1700000000.planted.host").write_bytes(extra)
    elif kind == "mbox":
        with open(tmp_path / "mb" / "INBOX.mbox", "ab") as mbox:
            mbox.write(extra)
        (tmp_path / "mb" / "Planted.mbox").write_bytes(extra)
    else:
        with sqlite3.connect(tmp_path / "a.sqlite") as db:
            db.execute("INSERT INTO blobs (sha256, size, raw) VALUES (?, ?, ?)", ("f" * 64, len(extra), extra))
    found = problems(url)
    assert {p.kind for p in found} == {UNRECORDED}
    assert len(found) == (1 if kind == "sqlite" else 2)


def test_bytes_planted_between_mbox_messages_are_unrecorded(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, "mbox")
    store = open_store(url, mode="read")
    try:
        second = sorted(e.location for e in store.catalog.entries() if e.location.startswith("INBOX"))[1]
    finally:
        store.close()
    _, offset, _, _ = parse_location(second)
    path = tmp_path / "mb" / "INBOX.mbox"
    data = path.read_bytes()
    start = data.rindex(b"\nFrom ", 0, offset) + 1  # the From line of the second message
    path.write_bytes(data[:start] + b"X" + data[start:])
    found = problems(url)
    assert UNRECORDED in {p.kind for p in found}


def against(account, **options) -> AgainstOptions:  # type: ignore[no-untyped-def]
    return AgainstOptions(account.url("imap"), account.password, no_tls=True, **options)


@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_against_server_passes_in_sync_and_catches_an_expunge(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, kind)
    assert problems(url, against(account)) == []
    assert problems(url, against(account, sample=10, seed=1)) == []
    with dovecot.client(account) as imap:
        imap.select_folder("INBOX")
        uid = imap.search("ALL")[1]
        imap.delete_messages([uid])
        imap.expunge()
    dovecot.append(account, "Archive/2024", b"Subject: after the backup\r\n\r\nnew\r\n")
    found = problems(url, against(account))
    assert sorted((p.kind, p.folder, p.uid) for p in found) == [
        (NOT_ARCHIVED, "Archive/2024", 2),
        (NOT_ON_SERVER, "INBOX", uid),
    ]
    # The next backup marks the message gone and fetches the new one: in sync again.
    backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    assert problems(url, against(account)) == []


def test_cli_lists_problems_and_exits_1(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = seeded(dovecot, account, tmp_path, "maildir")
    runner = CliRunner()
    clean = runner.invoke(main, ["verify", url])
    assert clean.exit_code == 0, clean.output
    assert "5 messages" in clean.output
    location, _ = first_location(url)
    (tmp_path / "md" / location).unlink()
    damaged = runner.invoke(main, ["verify", url])
    assert damaged.exit_code == 1
    assert "missing" in damaged.output and "INBOX" in damaged.output
    as_json = runner.invoke(main, ["verify", url, "--json"])
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.exit_code == 1
    assert lines[0]["problem"] == MISSING and lines[-1]["ok"] is False and lines[-1]["problems"] == {MISSING: 1}
    with_server = runner.invoke(main, ["verify", url, "--against", account.url("imap"), "--no-tls", "--sample", "50"],
                                env={"MAILBACKUP_PASSWORD": account.password})
    assert with_server.exit_code == 1, with_server.output
