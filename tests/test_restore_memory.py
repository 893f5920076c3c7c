"""What a restore holds in memory: no batch read ahead of the one it sends, small catalog caches (real Dovecot)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from mailbackup.restore import RestoreOptions, restore
from mailbackup.sources.archive import ArchiveSource
from mailbackup.targets.imap import ImapTarget
from tests.test_backup_imap import archive_url, run_backup
from tests.test_transfer_reconnect import multiset, seed


def test_a_restore_reads_a_batch_only_once_the_one_before_it_is_sent(dovecot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A batch read ahead is one more held in memory per worker; from an archive it buys nothing,
    # because the batches in flight keep the target busy while the next is read.
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    url = archive_url("maildir", tmp_path)
    run_backup(source, url)
    events: list[str] = []
    fetch, send = ArchiveSource.fetch, ImapTarget.send

    def fetching(self, batch, *args):  # type: ignore[no-untyped-def]
        events.append("fetch")
        return fetch(self, batch, *args)

    def sending(self, destination, batch) -> None:  # type: ignore[no-untyped-def]
        events.append("send")
        send(self, destination, batch)

    monkeypatch.setattr(ArchiveSource, "fetch", fetching)
    monkeypatch.setattr(ImapTarget, "send", sending)
    summary = restore(url, target.url("imap"), password=target.password, state=tmp_path / "state.sqlite",
                      options=RestoreOptions(no_tls=True, batch_messages=10, workers=1))
    assert summary.ok and summary.sent == 190
    assert multiset(dovecot, target) == multiset(dovecot, source)
    # Batches of 10 are read and sent alike. A batch goes out when the first message after it is
    # offered, so one batch is read beyond the last one sent: never two.
    fetched = sent = 0
    for kind in events:
        fetched, sent = fetched + (kind == "fetch"), sent + (kind == "send")
        assert fetched <= sent + 2, events


def test_a_restore_reads_the_catalog_with_small_page_caches(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Every worker and its reader take a catalog connection: at SQLite's default 2 MB cache each,
    # they added 5 MB to the peak of a restore of 20,000 messages.
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source, 30)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    caches: list[int] = []

    @event.listens_for(sa.pool.Pool, "checkout")
    def _checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        database = dbapi_connection.execute("PRAGMA database_list").fetchone()[2]
        # The workers' and their readers' threads (opening the store, before, is the main thread's).
        if Path(database).name == Path(url).name and threading.current_thread() is not threading.main_thread():
            caches.append(dbapi_connection.execute("PRAGMA cache_size").fetchone()[0])

    try:
        summary = restore(url, target.url("imap"), password=target.password, state=tmp_path / "state.sqlite",
                          options=RestoreOptions(no_tls=True, workers=3, parallel_after=0))
    finally:
        event.remove(sa.pool.Pool, "checkout", _checkout)
    assert summary.ok and summary.sent == 70
    assert caches and all(-64 <= size < 0 for size in caches), caches  # KiB, as SQLite writes it: negative
