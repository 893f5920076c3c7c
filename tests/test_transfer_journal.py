"""The transfer journal's schema: a journal written by the previous version resumes (real Dovecot)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailbackup.restore import RestoreOptions, restore
from tests.test_backup_imap import archive_url, run_backup
from tests.test_transfer_reconnect import multiset, seed

# The journal table as the previous version (2) created it.
VERSION_2 = """
CREATE TABLE transfer_journal (
    id INTEGER NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    source_folder TEXT NOT NULL,
    item VARCHAR(64) NOT NULL,
    state VARCHAR(16) NOT NULL,
    target_folder TEXT NOT NULL,
    target_uid_validity BIGINT,
    target_uid BIGINT,
    message_id TEXT,
    size BIGINT,
    sha256 VARCHAR(64),
    flags TEXT,
    detail TEXT,
    updated_at VARCHAR(40) NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_transfer_journal_item UNIQUE (source, target, target_folder, source_folder, item)
)
"""
COLUMNS = ("source", "target", "source_folder", "item", "state", "target_folder", "target_uid_validity", "target_uid",
           "message_id", "size", "sha256", "flags", "detail", "updated_at")


def test_a_journal_from_the_previous_version_resumes_where_it_stopped(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)  # INBOX 150, Lists 40
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    options = RestoreOptions(no_tls=True, batch_messages=10)
    done = restore(url, target.url("imap"), password=target.password, state=tmp_path / "now.sqlite", options=options)
    assert done.ok and done.sent == 190
    # What the previous version would have left after a cut: the rows of that run, in its table,
    # with the last INBOX batch still in flight and the last 30 INBOX messages never sent.
    with sqlite3.connect(tmp_path / "now.sqlite") as now:
        rows = now.execute(
            "SELECT f.source, f.target, f.source_folder, i.item, i.state, f.target_folder, i.target_uid_validity,"
            " i.target_uid, i.message_id, i.size, i.sha256, i.flags, i.detail, i.updated_at"
            " FROM journal_items i JOIN journal_folders f ON f.id = i.folder_id ORDER BY f.source_folder, i.target_uid"
        ).fetchall()
    assert len(rows) == 190
    inbox = [row for row in rows if row[2] == "INBOX"]
    unsent, in_flight = inbox[-30:], inbox[-40:-30]
    with dovecot.client(target) as imap:
        imap.select_folder("INBOX")
        imap.delete_messages([row[7] for row in unsent])
        imap.expunge()
    old = [list(row) for row in rows if row not in unsent]
    for row in old:
        if tuple(row) in in_flight:
            row[4], row[7] = "in_flight", None
    with sqlite3.connect(tmp_path / "old.sqlite") as previous:
        previous.execute(VERSION_2)
        previous.executemany(f"INSERT INTO transfer_journal ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", old)
    previous.close()

    # A dry run reads the old table where it is and writes nothing.
    dry = restore(url, target.url("imap"), password=target.password, state=tmp_path / "old.sqlite",
                  options=RestoreOptions(no_tls=True, dry_run=True))
    assert {r.source: (r.done_before, r.planned) for r in dry.folders} == {"INBOX": (110, 40), "Lists": (40, 0)}
    with sqlite3.connect(tmp_path / "old.sqlite") as untouched:
        assert untouched.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("transfer_journal",)]
    untouched.close()

    resumed = restore(url, target.url("imap"), password=target.password, state=tmp_path / "old.sqlite", options=options)
    assert resumed.ok
    # Trusted from the old rows: 120 done ones; the 10 in flight are found on the target; 30 go again.
    counts = {r.source: (r.done_before, r.recovered, r.found, r.sent) for r in resumed.folders}
    assert counts == {"INBOX": (110, 10, 0, 30), "Lists": (40, 0, 0, 0)}
    assert multiset(dovecot, target) == multiset(dovecot, source)
    with sqlite3.connect(tmp_path / "old.sqlite") as moved:
        tables = {name for (name,) in moved.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "transfer_journal" not in tables
        states = dict(moved.execute("SELECT state, count(*) FROM journal_items GROUP BY state").fetchall())
        assert states == {"done": 180, "found": 10}
    moved.close()


def test_rows_of_both_versions_are_kept_when_an_older_version_ran_after_this_one(tmp_path: Path) -> None:
    from mailbackup.catalog import create_engine
    from mailbackup.journal import DONE, IN_FLIGHT, Journal, Record

    engine = create_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    Journal(engine, "archive", "imap://me@host:143").write("INBOX", [Record("1", DONE, "INBOX", 7, 1)])
    with sqlite3.connect(tmp_path / "state.sqlite") as older:
        older.execute(VERSION_2)
        row = ("archive", "imap://me@host:143", "INBOX", "{}", IN_FLIGHT, "INBOX", 7, None, None, None, None, "", None, "now")
        older.executemany(f"INSERT INTO transfer_journal ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                          [(*row[:3], "1", *row[4:]), (*row[:3], "2", *row[4:])])
    older.close()
    records = Journal(engine, "archive", "imap://me@host:143").records("INBOX", "INBOX")
    assert {item: r.state for item, r in records.items()} == {"1": DONE, "2": IN_FLIGHT}
    engine.dispose()
