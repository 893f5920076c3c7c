"""Hostile or broken IMAP servers: a clear error, bounded memory, nothing outside the archive."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup
from mailbackup.cli import main
from mailbackup.errors import ConnectionLost, HostileServer
from tests.archive_view import archived
from tests.fakes import FakeImap

MESSAGES = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(1, 6)]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": "x"}, catch_exceptions=False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("claimed", [999_999_999_999, 50 << 20])
def test_an_absurd_literal_is_refused_before_it_is_allocated(tmp_path: Path, claimed: int) -> None:
    before = peak_rss_mb()
    with FakeImap({"INBOX": MESSAGES}, announce={3: claimed}) as fake:
        result = invoke("backup", fake.url(), f"maildir:{tmp_path / 'md'}", "--no-tls", "--batch-messages", "1")
    assert result.exit_code == 1, result.output
    assert "refusing it" in result.output and "Traceback" not in result.output
    assert peak_rss_mb() - before < 30  # a 50 MB or 1 TB claim allocated nothing like it
    # What came before the hostile message is archived; nothing went anywhere else.
    assert [m.raw for m in archived(f"maildir:{tmp_path / 'md'}")["INBOX"]] == MESSAGES[:2]
    assert {p.name for p in tmp_path.iterdir()} == {"md"}


def test_malformed_fetch_replies_fail_those_messages_only(tmp_path: Path) -> None:
    with FakeImap({"INBOX": MESSAGES}, malformed_body=True) as fake:
        result = invoke("backup", fake.url(), str(tmp_path / "a.db"), "--no-tls", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert len(summary["failed"]["INBOX"]) == len(MESSAGES)
    assert all("UID" in line for line in summary["failed"]["INBOX"])


def test_uidvalidity_that_changes_on_every_select_stores_nothing_twice(tmp_path: Path) -> None:
    url = str(tmp_path / "a.db")
    with FakeImap({"INBOX": MESSAGES, "Sent": MESSAGES[:2]}, rotate_uid_validity=True) as fake:
        first = backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True, index=False))
        again = backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True, index=False))
    assert first.new == 7 and again.new == 0
    assert sum(f.adopted for f in again.folders) == 7  # recognised by SHA-256, not stored again
    view = archived(url)
    assert sorted(m.raw for m in view["INBOX"]) == sorted(MESSAGES)
    assert len(archived(url, include_gone=True)["INBOX"]) == len(MESSAGES)


def test_a_stalled_server_hits_the_read_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    with FakeImap({"INBOX": MESSAGES}, stall_on_body=True) as fake:
        with pytest.raises(ConnectionLost, match="timed out"):
            backup(fake.url(), str(tmp_path / "a.db"), password="x", options=BackupOptions(no_tls=True, timeout=1, retries=1, retry_delay=0.1))
    assert time.monotonic() - started < 15


def test_hostile_server_error_is_not_retried(tmp_path: Path) -> None:
    with FakeImap({"INBOX": MESSAGES}, announce={1: 999_999_999_999}) as fake:
        with pytest.raises(HostileServer):
            backup(fake.url(), str(tmp_path / "a.db"), password="x", options=BackupOptions(no_tls=True, retry_delay=5))
        assert fake.commands.count("LOGIN") == 1
