"""restore --as-of DATE puts back the mailbox as it stood at that time (real Dovecot)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailbackup.errors import UsageError
from mailbackup.model import Entry, Folder, Message
from mailbackup.restore import RestoreOptions, parse_as_of, selection
from mailbackup.stores import open_store
from tests.test_backup_imap import archive_url, run_backup

ROOT = Path(__file__).parent.parent


def multiset(dovecot, account) -> Counter[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return Counter(
        (folder, hashlib.sha256(m.raw).hexdigest()) for folder in dovecot.folders(account) for m in dovecot.fetch(account, folder)
    )


@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_as_of_the_first_backup_gives_back_exactly_the_first_set(dovecot, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, then, now = dovecot.add_user(), dovecot.add_user(), dovecot.add_user()
    for i in range(12):
        dovecot.append(source, ["INBOX", "Work"][i % 2], b"Subject: first %d\r\nMessage-ID: <f%d@asof>\r\n\r\nbody\r\n" % (i, i))
    url = archive_url(kind, tmp_path)
    run_backup(source, url)
    first = multiset(dovecot, source)
    first_time = datetime.now(timezone.utc)
    time.sleep(1.1)  # the catalog keeps times to the second
    with dovecot.client(source) as imap:
        for folder, count in (("INBOX", 3), ("Work", 2)):  # expunge five
            imap.select_folder(folder)
            imap.delete_messages(sorted(imap.search("ALL"))[:count])
            imap.expunge()
    for i in range(3):  # add three
        dovecot.append(source, "INBOX", b"Subject: later %d\r\nMessage-ID: <l%d@asof>\r\n\r\nbody\r\n" % (i, i))
    run_backup(source, url)
    second = multiset(dovecot, source)
    assert sum(first.values()) == 12 and sum(second.values()) == 10
    env = {**os.environ, "MAILBACKUP_PASSWORD": then.password}
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "restore", url, then.url("imap"), "--no-tls", "-q",
         "--as-of", first_time.isoformat(timespec="seconds")],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert multiset(dovecot, then) == first
    # Without --as-of: the mailbox as the last backup saw it.
    from mailbackup.restore import restore

    assert restore(url, now.url("imap"), password=now.password, options=RestoreOptions(no_tls=True)).ok
    assert multiset(dovecot, now) == second


def entry(archived: str, gone: str | None = None) -> Entry:
    return Entry(
        id=1, folder_id=1, uid=1, uid_validity=1, source_id=None, sha256="0" * 64, size=1, flags=(),
        internal_date=None, location="x", gone=gone is not None,
        archived_at=datetime.fromisoformat(archived), gone_at=datetime.fromisoformat(gone) if gone else None,
    )


def selected(entry: Entry, options: RestoreOptions) -> bool:
    """Whether the catalog picks this entry, stored in an archive of its own, for a restore with these options."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{tmp}/a.sqlite", mode="write")
        try:
            catalog = store.catalog
            folder = catalog.ensure_folder(Folder("INBOX"), "INBOX")
            catalog.add(folder.id, 1, [(Message(raw=b"x", uid=1, internal_date=entry.internal_date), "x")])
            with catalog.engine.begin() as conn:
                conn.execute(
                    sa.text("update messages set fetched_at = :archived, gone_at = :gone"),
                    {
                        "archived": entry.archived_at.astimezone(timezone.utc).isoformat() if entry.archived_at else None,
                        "gone": entry.gone_at.astimezone(timezone.utc).isoformat() if entry.gone_at else None,
                    },
                )
            return bool(catalog.selected_ids(folder.id, selection(options)))
        finally:
            store.close()


def test_a_message_counts_if_archived_by_then_and_not_yet_gone() -> None:
    as_of = RestoreOptions(as_of=datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc))
    assert selected(entry("2024-05-01T12:00:00+00:00"), as_of)
    assert not selected(entry("2024-05-01T12:00:01+00:00"), as_of)
    assert selected(entry("2024-04-01T00:00:00+00:00", gone="2024-05-01T12:00:01+00:00"), as_of)
    assert not selected(entry("2024-04-01T00:00:00+00:00", gone="2024-05-01T12:00:00+00:00"), as_of)
    assert not selected(entry("2024-04-01T00:00:00+00:00", gone="2024-04-02T00:00:00+00:00"), RestoreOptions())


def test_as_of_takes_a_date_as_the_end_of_that_day_and_local_time_without_an_offset() -> None:
    end = parse_as_of("2024-05-01")
    assert end.tzinfo is not None and end.astimezone().date().isoformat() == "2024-05-01"
    assert (end + timedelta(microseconds=1)).astimezone().date().isoformat() == "2024-05-02"
    assert parse_as_of("2024-05-01T14:30+02:00") == datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    assert parse_as_of("2024-05-01T14:30").utcoffset() is not None
    with pytest.raises(UsageError, match="2024-05-01"):
        parse_as_of("last tuesday")
