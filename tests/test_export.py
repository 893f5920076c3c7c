"""export: Maildir -> SQLite -> mbox -> Maildir keeps every byte and every catalog column; show gives bytes back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from mailbackup import BackupOptions, backup
from mailbackup.catalog import folders, messages
from mailbackup.cli import main
from mailbackup.export import export
from mailbackup.show import show
from mailbackup.stores import open_store
from tests.test_backup_imap import seed_tricky


def catalog_rows(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
    """Folders and entries with every column except ids and store locations, plus each entry's bytes' SHA-256."""
    store = open_store(url, mode="read")
    try:
        with store.catalog.engine.connect() as conn:
            folder_rows = conn.execute(sa.select(folders).order_by(folders.c.name)).all()
            names = {row.id: row.name for row in folder_rows}
            folder_view = [tuple(v for k, v in row._mapping.items() if k not in ("id", "path")) for row in folder_rows]
            entry_rows = conn.execute(sa.select(messages)).all()
        entries = sorted(
            (names[row.folder_id], *(v for k, v in row._mapping.items() if k not in ("id", "folder_id", "location")))
            for row in entry_rows
        )
        sums = sorted(f"{names[row.folder_id]} {hashlib.sha256(store.get(row.location)).hexdigest()}" for row in entry_rows)
        return folder_view, entries, sums  # type: ignore[return-value]
    finally:
        store.close()


def test_round_trip_through_every_store_is_lossless(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed_tricky(dovecot, account)
    first = f"maildir:{tmp_path / 'md'}"
    options = BackupOptions(no_tls=True)
    assert backup(account.url("imap"), first, password=account.password, options=options).ok
    with dovecot.client(account) as imap:  # a gone entry must survive the trip too
        imap.select_folder("INBOX")
        imap.delete_messages(imap.search("ALL")[:2])
        imap.expunge()
    assert backup(account.url("imap"), first, password=account.password, options=options).ok
    original = catalog_rows(first)
    assert any(row[-1] is not None for row in original[1])  # gone_at

    chain = [first, str(tmp_path / "copy.sqlite"), f"mbox:{tmp_path / 'mb'}", f"maildir:{tmp_path / 'md2'}"]
    for source, destination in zip(chain, chain[1:]):
        summary = export(source, destination)
        assert summary.messages == len(original[1])
        assert catalog_rows(destination) == original, destination

    # The last copy behaves as if backed up directly: nothing new to fetch.
    again = backup(account.url("imap"), chain[-1], password=account.password, options=options)
    assert again.ok and (again.new, again.bytes, again.as_dict()["gone"]) == (0, 0, 0)


def test_export_refuses_a_destination_that_holds_an_archive(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: x\r\n\r\ny\r\n")
    first, second = str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")
    for url in (first, second):
        backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    result = CliRunner().invoke(main, ["export", first, second])
    assert result.exit_code == 2 and "already holds an archive" in result.output


def test_show_gives_back_the_exact_bytes(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = b"From: a@b\nSubject: bare LF and a NUL-free \xff byte\n\n>From here\nbody"
    dovecot.append(account, "INBOX", raw)
    url = f"mbox:{tmp_path / 'mb'}"
    backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    [served] = dovecot.fetch(account, "INBOX")
    shown = show(url, "1")
    assert shown.raw == served.raw and shown.folder == "INBOX"
    assert show(url, shown.entry.sha256[:8]).raw == served.raw
    runner = CliRunner()
    assert runner.invoke(main, ["show", url, shown.entry.sha256[:10]]).stdout_bytes == served.raw
    target = tmp_path / "out.eml"
    result = runner.invoke(main, ["show", url, "1", "--eml", str(target)])
    assert result.exit_code == 0
    assert target.read_bytes() == served.raw and os.stat(target).st_mode & 0o777 == 0o600
    missing = runner.invoke(main, ["show", url, "999"])
    assert missing.exit_code == 2
