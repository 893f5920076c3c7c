"""Restore and migrate reconnect to a target that drops the line, and resume from the journal.

A `FaultProxy` (tests/proxy.py) in front of the real Dovecot cuts the first
connections mid-APPEND; the run itself finishes with exit 0 and every message is on
the target exactly once (SHA-256 multiset).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mailbackup.errors import ConnectionLost
from mailbackup.restore import RestoreOptions, migrate, restore
from tests.proxy import FaultProxy
from tests.test_backup_imap import archive_url, run_backup

ROOT = Path(__file__).parent.parent


def seed(dovecot, account, count: int = 150) -> None:  # type: ignore[no-untyped-def]
    # Every fifth message has no Message-ID: after a cut it is matched by hash.
    dovecot.seed_maildir(
        account, "INBOX",
        (
            (b"Subject: %d\r\n%s\r\n%s\r\n" % (i, b"" if i % 5 == 0 else b"Message-ID: <%d@re>\r\n" % i, b"r" * 5000), "S", 1.6e9 + i)
            for i in range(count)
        ),
    )
    dovecot.seed_maildir(account, "Lists", ((b"Subject: list %d\r\n\r\n%s\r\n" % (i, b"l" * 4000), "", 1.6e9) for i in range(40)))


def multiset(dovecot, account) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(
        hashlib.sha256(m.raw).hexdigest() for folder in dovecot.folders(account) for m in dovecot.fetch(account, folder)
    )


def through(proxy: FaultProxy, account) -> str:  # type: ignore[no-untyped-def]
    return f"imap://{account.user}@127.0.0.1:{proxy.port}"


def test_restore_through_a_line_cut_twice_mid_append_finishes_in_one_run(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    env = {**os.environ, "MAILBACKUP_PASSWORD": target.password}
    with FaultProxy(dovecot.imap_port, cut_at=300_000, direction="up", connections_to_cut=2) as proxy:
        done = subprocess.run(
            [sys.executable, "-m", "mailbackup", "restore", url, through(proxy, target), "--no-tls", "--json",
             "--batch-messages", "10"],
            env=env, cwd=ROOT, capture_output=True, text=True,
        )
    assert done.returncode == 0, done.stderr
    assert proxy.cuts == 2 and len(proxy.connections) == 3
    assert "reconnecting" in done.stderr
    result = json.loads(done.stdout)
    assert result["sent"] + result["recovered"] + result["found"] == 190
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_migrate_through_a_target_line_cut_twice_finishes_in_one_run(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    with FaultProxy(dovecot.imap_port, cut_at=300_000, direction="up", connections_to_cut=2) as proxy:
        summary = migrate(
            source.url("imap"), through(proxy, target), password=source.password, target_password=target.password,
            state=tmp_path / "state.sqlite", options=RestoreOptions(no_tls=True, batch_messages=10, reconnect_delay=0.05),
        )
    assert summary.ok and proxy.cuts == 2
    assert summary.sent + summary.as_dict()["recovered"] + summary.as_dict()["found"] == 190
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_a_line_that_never_carries_a_message_stops_after_the_retries(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source, 20)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    # Every connection is cut before the first APPEND completes: no attempt makes progress.
    with FaultProxy(dovecot.imap_port, cut_at=2_000, direction="up", connections_to_cut=100) as proxy:
        with pytest.raises(ConnectionLost):
            restore(url, through(proxy, target), password=target.password,
                    options=RestoreOptions(no_tls=True, reconnects=2, reconnect_delay=0.01))
    assert len(proxy.connections) == 3  # the first attempt and two retries


def test_migrate_through_a_source_line_cut_mid_fetch_finishes_in_one_run(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    with FaultProxy(dovecot.imap_port, cut_at=400_000, direction="down", connections_to_cut=2) as proxy:
        summary = migrate(
            through(proxy, source), target.url("imap"), password=source.password, target_password=target.password,
            state=tmp_path / "state.sqlite", options=RestoreOptions(no_tls=True, batch_messages=10, reconnect_delay=0.05),
        )
    assert summary.ok and proxy.cuts == 2
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_batches_shrink_after_a_drop_so_a_line_that_always_drops_still_carries_everything(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    dovecot.seed_maildir(
        source, "INBOX",
        ((b"Subject: %d\r\nMessage-ID: <%d@big>\r\n\r\n%s\r\n" % (i, i, os.urandom(25_000).hex().encode()), "", 1.6e9 + i) for i in range(60)),
    )
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    # Every connection drops after 600 KB up; the default batch (4 MB) would never arrive whole.
    with FaultProxy(dovecot.imap_port, cut_at=600_000, direction="up", connections_to_cut=1000) as proxy:
        summary = restore(url, through(proxy, target), password=target.password,
                          options=RestoreOptions(no_tls=True, reconnect_delay=0.01))
    assert summary.ok and proxy.cuts >= 3
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_a_dropped_sessions_late_appends_are_waited_for_not_sent_twice(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The client sees the line drop while the server still receives (and commits) the MULTIAPPENDs sent
    # just before: a reconnect that lists the target at once would miss them and send them again.
    source, target = dovecot.add_user(), dovecot.add_user()
    # One folder of 150 messages of about 5 KB, one in five without a Message-ID (matched by hash).
    dovecot.seed_maildir(
        source, "INBOX",
        (
            (b"Subject: %d\r\n%s\r\n%s\r\n" % (i, b"" if i % 5 == 0 else b"Message-ID: <%d@late>\r\n" % i, b"r" * 5000), "S", 1.6e9 + i)
            for i in range(150)
        ),
    )
    # Batches of 10 (about 51 KB) go out two at a time: the first two leave together, later ones one
    # by one as answers come back, each when the batch before it is just arriving. A cut at 75 KB
    # falls in the second batch, so the first, whole, reaches the server `lag` seconds after the client
    # saw the line drop and reconnected within a fraction of a second. The wait outlasts the lag.
    lag = 2.0
    with FaultProxy(dovecot.imap_port, cut_at=75_000, direction="up", connections_to_cut=1, lag=lag) as proxy:
        summary = migrate(
            source.url("imap"), through(proxy, target), password=source.password, target_password=target.password,
            state=tmp_path / "state.sqlite",
            options=RestoreOptions(no_tls=True, batch_messages=10, reconnect_delay=0.05, settle_quiet=lag + 1.0),
        )
    assert summary.ok and proxy.cuts == 1
    assert summary.sent + summary.as_dict()["recovered"] + summary.as_dict()["found"] == 150
    assert multiset(dovecot, target) == multiset(dovecot, source)
