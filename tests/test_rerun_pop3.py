"""The POP3 rerun check (mailbackup/rerun_pop3.py): a maildrop whose UIDLs are all archived, with
nothing else owed, is answered from the catalog without SQLAlchemy; every other case goes to the
full backup, over the check's own connection, and gets the full backup's result."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailbackup import BackupOptions, backup, rerun, sources
from mailbackup.model import Summary
from tests.archive_view import STORES, archived
from tests.fakes import FakePop3

ROOT = Path(__file__).parent.parent

# The CLI in a fresh interpreter ("fast": as shipped; "full": with the rerun check switched off),
# then what it loaded.
CLI_THEN_MODULES = """
import json, sys
if sys.argv[1] == "full":
    import mailbackup.rerun
    mailbackup.rerun.check = lambda *args, **kwargs: None
from mailbackup.cli import main
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "sqlalchemy": sorted(m for m in sys.modules if m.split(".")[0] == "sqlalchemy")}))
"""


def cli_backup(account, url: str, path: str, *extra: str) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    """(the --json summary without timings, {code, sqlalchemy modules loaded}) of `mailbackup backup`."""
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    proc = subprocess.run(
        [sys.executable, "-c", CLI_THEN_MODULES, path, "backup", account.url("pop3"), url, "--no-tls", "--json", "-q", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 2, proc.stdout + proc.stderr
    summary = json.loads(lines[-2])
    summary.pop("elapsed")
    for folder in summary["per_folder"]:
        folder.pop("elapsed")
    return summary, json.loads(lines[-1])


def pop_backup(account, url: str, **options) -> Summary:  # type: ignore[no-untyped-def]
    return backup(account.url("pop3"), url, password=account.password, options=BackupOptions(no_tls=True, **options))


def seed(dovecot, account, count: int = 3) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        dovecot.append(account, "INBOX", b"Subject: %d\r\nMessage-ID: <%d@pop>\r\n\r\nbody %d\r\n" % (i, i, i))


def on_server(dovecot, account) -> int:  # type: ignore[no-untyped-def]
    return len(dovecot.fetch(account, "INBOX"))


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the rerun check made of each backup: "answered", "handed over" (its connection, to
    the full backup) or "not checked"; and every POP3 login, as "login"."""
    seen: list[str] = []
    original = rerun.check

    def check(*args, **kwargs):  # type: ignore[no-untyped-def]
        outcome = original(*args, **kwargs)
        if outcome is None:
            seen.append("not checked")
        else:
            seen.append("answered" if outcome.reports is not None else "handed over")
        return outcome

    def login(url, connect):  # type: ignore[no-untyped-def]
        seen.append("login")
        return opener(url, connect)

    opener = sources._KINDS["pop3"].opener
    monkeypatch.setattr(rerun, "check", check)
    monkeypatch.setattr(sources, "_KINDS", {**sources._KINDS, "pop3": sources.Kind(sources.POP3, login, sources._KINDS["pop3"].address)})
    return seen


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("maildir", ()), ("mbox", ()), ("sqlite", ()), ("maildir", ("--into", "Pop")), ("sqlite", ("--delete-older-than", "30"))],
)
def test_a_pop3_rerun_with_nothing_new_loads_no_sqlalchemy_and_says_what_a_full_backup_says(dovecot, account, tmp_path: Path, kind: str, extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES[kind](tmp_path)
    first, loaded = cli_backup(account, url, "fast", *extra)
    assert first["new"] == 3 and loaded["sqlalchemy"]
    fast, loaded = cli_backup(account, url, "fast", *extra)
    assert loaded == {"code": 0, "sqlalchemy": []}
    full, loaded_full = cli_backup(account, url, "full", *extra)
    assert loaded_full["code"] == 0 and loaded_full["sqlalchemy"]  # it did take the full path
    assert fast == full
    assert fast["new"] == 0 and fast["deleted"] == 0
    assert [f["name"] for f in fast["per_folder"]] == [extra[1] if "--into" in extra else "INBOX"]
    assert on_server(dovecot, account) == 3


def test_a_new_message_goes_to_the_full_backup_over_the_same_connection(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["maildir"](tmp_path)
    pop_backup(account, url)
    assert pop_backup(account, url).new == 0
    dovecot.append(account, "INBOX", b"Subject: new\r\n\r\nbody\r\n")
    checks.clear()
    summary = pop_backup(account, url)
    assert checks == ["login", "handed over"]
    assert summary.new == 1 and summary.folders[0].gone == 0
    assert len(archived(url)["INBOX"]) == 4


def test_a_message_deleted_on_the_server_is_marked_gone_by_the_full_backup(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    pop_backup(account, url)
    with dovecot.client(account) as imap:
        imap.select_folder("INBOX")
        imap.delete_messages(imap.search("ALL")[:1])
        imap.expunge()
    checks.clear()
    summary = pop_backup(account, url)
    assert checks == ["login", "handed over"]
    assert summary.new == 0 and summary.folders[0].gone == 1
    checks.clear()
    assert pop_backup(account, url).folders[0].gone == 0
    assert checks == ["login", "answered"]
    assert len(archived(url, include_gone=True)["INBOX"]) == 3  # the archive keeps what the server let go


def test_a_message_that_failed_last_time_is_fetched_by_the_full_backup(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    # As after a run where one RETR failed: the message is on the server, not in the catalog.
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    pop_backup(account, url)
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages)")
    db.close()
    checks.clear()
    summary = pop_backup(account, url)
    assert checks == ["login", "handed over"]
    assert summary.new == 1
    checks.clear()
    assert pop_backup(account, url).new == 0
    assert checks == ["login", "answered"]


def test_delete_is_never_skipped_by_the_rerun_check(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["maildir"](tmp_path)
    pop_backup(account, url)
    checks.clear()
    assert pop_backup(account, url).new == 0
    assert checks == ["login", "answered"]  # without --delete, nothing is owed
    checks.clear()
    summary = pop_backup(account, url, delete=True)
    assert checks == ["login", "handed over"]
    assert summary.new == 0 and summary.folders[0].deleted == 3
    assert on_server(dovecot, account) == 0
    # The next run finds them gone from the server and marks them so; then there is nothing to do.
    checks.clear()
    assert pop_backup(account, url, delete=True).folders[0].gone == 3
    assert checks == ["login", "handed over"]
    checks.clear()
    quiet = pop_backup(account, url, delete=True)
    assert checks == ["login", "answered"]
    assert quiet.new == quiet.folders[0].deleted == quiet.folders[0].gone == 0
    assert len(archived(url, include_gone=True)["INBOX"]) == 3


def test_delete_older_than_is_answered_only_while_nothing_is_old_enough(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    pop_backup(account, url, delete_older_than=30)
    checks.clear()
    assert pop_backup(account, url, delete_older_than=30).folders[0].deleted == 0
    assert checks == ["login", "answered"]
    month_ago = (datetime.now(timezone.utc) - timedelta(days=31)).isoformat(timespec="seconds")
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("UPDATE messages SET fetched_at = ? WHERE id = (SELECT min(id) FROM messages)", (month_ago,))
    db.close()
    checks.clear()
    summary = pop_backup(account, url, delete_older_than=30)
    assert checks == ["login", "handed over"]
    assert summary.folders[0].deleted == 1
    assert on_server(dovecot, account) == 2
    checks.clear()
    assert pop_backup(account, url, delete_older_than=0).folders[0].deleted == 2  # 0 days: all of them
    assert checks == ["login", "handed over"]
    assert on_server(dovecot, account) == 0


def test_another_archive_folder_goes_to_the_full_backup(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    pop_backup(account, url)
    checks.clear()
    assert pop_backup(account, url).new == 0
    assert checks == ["login", "answered"]
    checks.clear()
    summary = pop_backup(account, url, into="Pop")
    assert checks == ["not checked", "login"]  # the catalog has no folder Pop: nothing to compare
    assert summary.new == 3 and [f.name for f in summary.folders] == ["Pop"]


def test_an_entry_waiting_to_be_adopted_goes_to_the_full_backup(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    # As repair leaves an entry it rebuilt from the store: no UID, no UIDL.
    seed(dovecot, account)
    url = STORES["sqlite"](tmp_path)
    pop_backup(account, url)
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        columns = "folder_id, sha256, size, flags, internal_date, date_source, fetched_at, location"
        db.execute(f"INSERT INTO messages ({columns}) SELECT {columns} FROM messages WHERE id = 1")
    db.close()
    checks.clear()
    summary = pop_backup(account, url)
    assert checks == ["not checked", "login"]
    assert summary.new == 0 and summary.folders[0].gone == 1  # no UIDL claimed it
    checks.clear()
    assert pop_backup(account, url).new == 0
    assert checks == ["login", "answered"]


def test_a_server_without_uidl_goes_to_the_full_backup(tmp_path: Path, checks: list[str]) -> None:
    messages = [b"Subject: a\r\n\r\nbody a\r\n", b"Subject: b\r\n\r\nbody b\r\n"]
    with FakePop3(messages) as fake:
        url = str(tmp_path / "a.db")
        assert backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True)).new == 2
        checks.clear()
        again = backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True))
        assert checks == ["login", "handed over"]
        assert again.new == 0 and any("UIDL" in note for note in again.folders[0].notes)
        assert fake.commands.count("PASS") == 2


def test_uidls_takes_only_one_plain_line_per_message(tmp_path: Path) -> None:
    from mailbackup.sources.pop3 import Pop3Source

    with FakePop3([b"Subject: a\r\n\r\na\r\n", b"Subject: b\r\n\r\nb\r\n"], capabilities=("USER", "UIDL")) as fake:
        source = sources.open_source(fake.url(), sources.Connect("x", no_tls=True))
        assert isinstance(source, Pop3Source)
        try:
            assert source.uidls() == ["id0", "id1"]
            # Anything but one "n id" line per message, in order, is left to the full listing.
            for reply in (b"1 id0\r\n", b"1 id0\r\n3 id1\r\n", b"1 id0\r\n2 id 1\r\n", b"1 id0\r\n2\r\n", b"2 id1\r\n1 id0\r\n"):
                source._multiline = lambda command, size, reply=reply: reply  # type: ignore[method-assign]  # the server's UIDL reply
                assert source.uidls() is None, reply

            def garbled_stat() -> tuple[int, int]:
                raise ValueError("invalid literal for int() with base 10: b'lots'")  # poplib on "+OK lots"

            source.conn.stat = garbled_stat  # type: ignore[method-assign]  # the server's STAT reply
            assert source.uidls() is None
        finally:
            source.close()


def test_a_line_lost_at_the_checks_quit_goes_to_the_full_backup(dovecot, account, tmp_path: Path, checks: list[str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import ConnectionLost
    from mailbackup.sources.pop3 import Pop3Source

    seed(dovecot, account)
    url = STORES["maildir"](tmp_path)
    pop_backup(account, url)
    original = Pop3Source.close
    closed: list[bool] = []

    def close(self, *, commit: bool = True) -> None:  # type: ignore[no-untyped-def]
        original(self, commit=commit)
        closed.append(commit)
        if len(closed) == 1:
            raise ConnectionLost("the POP3 server closed the connection; rerun to finish")

    monkeypatch.setattr(Pop3Source, "close", close)
    checks.clear()
    summary = pop_backup(account, url)
    assert checks == ["login", "not checked", "login"]  # the full backup logged in again, and found nothing
    assert summary.new == 0 and closed == [True, True]


def test_a_pop3_rerun_while_another_run_writes_is_refused_without_logging_in(dovecot, account, tmp_path: Path, checks: list[str]) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import ArchiveLocked
    from mailbackup.stores import open_store

    seed(dovecot, account)
    url = STORES["maildir"](tmp_path)
    pop_backup(account, url)
    store = open_store(url, mode="write", account=f"{account.user}@127.0.0.1")
    checks.clear()
    try:
        with store.lock(), pytest.raises(ArchiveLocked):
            pop_backup(account, url)
    finally:
        store.close()
    assert checks == ["not checked"]  # the maildrop was not even locked by a login
    checks.clear()
    assert pop_backup(account, url).new == 0
    assert checks == ["login", "answered"]
