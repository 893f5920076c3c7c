"""A long restore APPENDs over several logins at once; a refused message fails alone (real Dovecot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbackup.net import parse_url
from mailbackup.restore import RestoreOptions, migrate, restore
from mailbackup.targets import Outgoing
from mailbackup.targets.imap import ImapTarget
from tests.proxy import FaultProxy
from tests.test_backup_imap import archive_url, run_backup
from tests.test_transfer_reconnect import multiset, seed, through


class AppenderCut(FaultProxy):
    """Cut only connection `number` (the first is the target's own, the next ones its appenders)."""

    def __init__(self, target_port: int, number: int, cut_at: int) -> None:
        super().__init__(target_port, cut_at, "up", connections_to_cut=0)
        self.number = number

    def cut_for(self, number: int) -> int | None:
        return self.cut_at if number == self.number else None


def connect(dovecot, account, parallel_after: int) -> ImapTarget:  # type: ignore[no-untyped-def]
    endpoint = parse_url(account.url("imap"), no_tls=True, schemes=("imap",), role="target")
    return ImapTarget.connect(endpoint, account.password, parallel_after=parallel_after)


@pytest.mark.parametrize("parallel_after", [10_000, 0], ids=["one-login", "appenders"])
def test_a_refused_message_fails_alone_and_the_rest_of_its_multiappend_arrives(dovecot, parallel_after: int) -> None:  # type: ignore[no-untyped-def]
    account = dovecot.add_user()
    target = connect(dovecot, account, parallel_after)
    try:
        destination = target.open("INBOX")
        good = [Outgoing(item=str(i), raw=b"Subject: %d\r\nMessage-ID: <%d@multi>\r\n\r\nbody\r\n" % (i, i)) for i in range(4)]
        # Dovecot refuses a zero-byte message, and with it the whole MULTIAPPEND.
        target.send(destination, [good[0], good[1], Outgoing(item="empty", raw=b""), good[2]])
        target.send(destination, [good[3]])
        outcome = [d for _ in range(2) for d in target.collect()]
        assert target.pending == 0
    finally:
        target.close()
    assert [d.item for d in outcome] == ["0", "1", "empty", "2", "3"]
    assert [d.ok for d in outcome] == [True, True, False, True, True]
    assert "zero byte" in (outcome[2].detail or "")
    assert all(d.uid is not None for d in outcome if d.ok)
    assert sorted(m.raw for m in dovecot.fetch(account, "INBOX")) == sorted(m.raw for m in good)


def test_a_long_restore_appends_over_several_logins_and_arrives_exactly(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    options = RestoreOptions(no_tls=True, batch_messages=10, parallel_after=20, append_connections=3)
    with FaultProxy(dovecot.imap_port, connections_to_cut=0) as proxy:
        summary = restore(url, through(proxy, target), password=target.password, options=options)
    assert summary.ok and summary.sent == 190
    assert len(proxy.connections) == 4  # the target's own login and three appenders
    assert sum(c.up > 100_000 for c in proxy.connections[1:]) == 3  # each appender carried mail
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_an_appender_line_cut_mid_append_resumes_with_nothing_lost_or_duplicated(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    options = RestoreOptions(no_tls=True, batch_messages=10, parallel_after=20, reconnect_delay=0.01)
    with AppenderCut(dovecot.imap_port, number=2, cut_at=150_000) as proxy:
        summary = restore(url, through(proxy, target), password=target.password, options=options)
    assert proxy.cuts == 1
    assert summary.ok
    assert summary.sent + summary.as_dict()["recovered"] + summary.as_dict()["found"] == 190
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_migrate_appends_over_several_logins_and_arrives_exactly(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    options = RestoreOptions(no_tls=True, batch_messages=10, parallel_after=0)
    summary = migrate(
        source.url("imap"), target.url("imap"), password=source.password, target_password=target.password,
        state=tmp_path / "state.sqlite", options=options,
    )
    assert summary.ok and summary.sent == 190
    assert multiset(dovecot, target) == multiset(dovecot, source)
