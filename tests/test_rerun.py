"""The rerun check (mailbackup/rerun.py): a backup with nothing new answered from the
catalog's checkpoints and one STATUS per folder, without SQLAlchemy; anything else
goes to the full backup."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mailbackup import BackupOptions, backup, catalog, rerun
from tests.archive_view import STORES, archived

ROOT = Path(__file__).parent.parent

# Runs the CLI in a fresh interpreter and reports, after the command, what it loaded.
CLI_THEN_MODULES = """
import json, sys
from mailbackup.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "sqlalchemy": sorted(m for m in sys.modules if m.split(".")[0] == "sqlalchemy")}))
"""


def run_backup(account, url: str, **options):  # type: ignore[no-untyped-def]
    return backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True, **options))


def cli_backup(account, url: str, *extra: str) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    """(the --json summary, {code, sqlalchemy modules loaded}) of `mailbackup backup` in a subprocess."""
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    proc = subprocess.run(
        [sys.executable, "-c", CLI_THEN_MODULES, "backup", account.url("imap"), url, "--no-tls", "--json", "-q", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 2, proc.stdout + proc.stderr
    return json.loads(lines[-2]), json.loads(lines[-1])


def seed(dovecot, account) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        dovecot.append(account, "INBOX", b"Subject: %d\r\n\r\nbody\r\n" % i, ("\\Seen",) if i else ())
    dovecot.append(account, "Archive/2024", b"Subject: old\r\n\r\nbody\r\n")


@pytest.mark.parametrize("kind", sorted(STORES))
def test_a_rerun_with_nothing_new_loads_no_sqlalchemy_and_reports_every_folder(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES[kind](tmp_path)
    full = run_backup(account, url)
    assert full.new == 4
    summary, loaded = cli_backup(account, url)
    assert loaded == {"code": 0, "sqlalchemy": []}
    assert summary["new"] == 0
    assert [f["name"] for f in summary["per_folder"]] == [f.name for f in full.folders]
    assert summary["archive"] == full.archive
    # Something new: the full backup runs (and loads what it needs) and finds it.
    dovecot.append(account, "INBOX", b"Subject: new\r\n\r\nbody\r\n")
    summary, loaded = cli_backup(account, url)
    assert summary["new"] == 1 and loaded["sqlalchemy"]
    assert len(archived(url)["INBOX"]) == 4


def test_a_message_missing_from_the_catalog_is_fetched_though_the_folder_did_not_change(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # As after a run where one message failed: the checkpoint moved, the entry is not there.
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    run_backup(account, url)
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages WHERE location != '')")
    again = run_backup(account, url)
    assert again.new == 1
    assert run_backup(account, url).new == 0


@pytest.mark.parametrize(
    "change",
    ["flag", "expunge", "new folder", "folder gone", "uidvalidity"],
)
def test_every_change_on_the_server_gets_past_the_rerun_check(dovecot, account, tmp_path: Path, change: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    dovecot.append(account, "Old", b"Subject: in old\r\n\r\nbody\r\n")
    url = STORES["maildir"](tmp_path)
    run_backup(account, url)
    with dovecot.client(account) as imap:
        if change == "flag":
            imap.select_folder("INBOX")
            imap.add_flags(imap.search("ALL")[:1], [b"\\Flagged"])
        elif change == "expunge":
            imap.select_folder("INBOX")
            imap.delete_messages(imap.search("ALL")[:1])
            imap.expunge()
        elif change == "new folder":
            imap.create_folder("Fresh")
        elif change == "folder gone":
            imap.delete_folder("Old")
        elif change == "uidvalidity":  # the same name, a new mailbox: a new UIDVALIDITY
            imap.select_folder("Old")
            raw = imap.fetch(imap.search("ALL"), ["BODY.PEEK[]"])
            imap.close_folder()
            imap.delete_folder("Old")
            imap.create_folder("Old")
            for data in raw.values():
                imap.append("Old", data[b"BODY[]"])
    summary = run_backup(account, url)
    by_name = {f.name: f for f in summary.folders}
    if change == "flag":
        assert by_name["INBOX"].flags_updated == 1
    elif change == "expunge":
        assert by_name["INBOX"].gone == 1
    elif change == "new folder":
        assert "Fresh" in by_name
    elif change == "folder gone":
        assert by_name["Old"].gone == 1 and by_name["Old"].skipped == "no longer on the server"
    elif change == "uidvalidity":
        assert by_name["Old"].adopted == 1 and by_name["Old"].new == 0
    # And then it is quiet again.
    assert run_backup(account, url).new == 0


def test_the_check_hands_its_connection_to_the_full_backup(dovecot, account, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["mbox"](tmp_path)
    run_backup(account, url)
    dovecot.append(account, "INBOX", b"Subject: new\r\n\r\nbody\r\n")
    from mailbackup import sources

    logins = []
    original = sources.imap_source

    def counting(url, connect):  # type: ignore[no-untyped-def]
        logins.append(url)
        return original(url, connect)

    monkeypatch.setattr(rerun, "imap_source", counting)
    monkeypatch.setattr(sources, "_KINDS", {**sources._KINDS, "imap": sources.Kind(sources.IMAP, counting, sources._KINDS["imap"].address)})
    assert run_backup(account, url).new == 1
    assert len(logins) == 1


def test_the_checks_mirrors_of_the_catalog_agree_with_it() -> None:
    assert rerun.SCHEMA_VERSION == catalog.SCHEMA_VERSION
    assert rerun.RECOVERED_MARK == catalog.RECOVERED_MARK


def test_the_check_finds_the_catalog_where_the_stores_keep_it(tmp_path: Path) -> None:
    from mailbackup.stores import resolve

    for kind, spell in STORES.items():
        url = spell(tmp_path)
        located = rerun.locate(url)
        assert located is not None
        cls, where = resolve(url)
        store = cls(where, mode="write")
        try:
            assert located.url == store.url, kind
            assert str(located.database) == store.catalog.sqlite_file(), kind
        finally:
            store.close()
    assert rerun.locate("postgresql://user@host/db") is None


@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_a_rerun_while_another_run_writes_is_refused_not_answered(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import ArchiveLocked
    from mailbackup.stores import open_store

    seed(dovecot, account)
    url = STORES[kind](tmp_path)
    run_backup(account, url)
    store = open_store(url, mode="write", account=f"{account.user}@127.0.0.1")
    try:
        with store.lock(), pytest.raises(ArchiveLocked):
            run_backup(account, url)
    finally:
        store.close()
    assert run_backup(account, url).new == 0


def test_a_rerun_with_a_wrong_password_fails_as_a_full_backup_would(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import AuthError

    seed(dovecot, account)
    url = STORES["maildir"](tmp_path)
    run_backup(account, url)
    with pytest.raises(AuthError):
        backup(account.url("imap"), url, password="wrong", options=BackupOptions(no_tls=True))
