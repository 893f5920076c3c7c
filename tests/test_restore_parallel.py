"""A long restore or migrate takes several folders at once; a refused message fails alone (real Dovecot)."""

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


class HelperCut(FaultProxy):
    """Cut only connection `number` upward (the first is the attempt's own, the next a helper's)."""

    def __init__(self, target_port: int, number: int, cut_at: int) -> None:
        super().__init__(target_port, cut_at, "up", connections_to_cut=0)
        self.number = number

    def cut_for(self, number: int) -> int | None:
        return self.cut_at if number == self.number else None


def connect(account) -> ImapTarget:  # type: ignore[no-untyped-def]
    endpoint = parse_url(account.url("imap"), no_tls=True, schemes=("imap",), role="target")
    return ImapTarget.connect(endpoint, account.password)


def test_a_refused_message_fails_alone_and_the_rest_of_its_multiappend_arrives(dovecot) -> None:  # type: ignore[no-untyped-def]
    account = dovecot.add_user()
    target = connect(account)
    try:
        assert target.multiappend and target.literal_plus  # the pipelined MULTIAPPEND path
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


def more_folders(dovecot, account) -> None:  # type: ignore[no-untyped-def]
    for name in ("Archive", "Sent"):
        dovecot.seed_maildir(
            account, name, ((b"Subject: %s %d\r\nMessage-ID: <%d@%s>\r\n\r\n%s\r\n" % (name.encode(), i, i, name.encode(), b"a" * 3000), "S", 1.6e9) for i in range(30))
        )


@pytest.mark.parametrize("kind", ["sqlite", "maildir"])
def test_a_long_restore_takes_folders_in_parallel_and_arrives_exactly(dovecot, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    more_folders(dovecot, source)
    url = archive_url(kind, tmp_path)
    run_backup(source, url)
    options = RestoreOptions(no_tls=True, batch_messages=10, workers=3, parallel_after=0)
    with FaultProxy(dovecot.imap_port, connections_to_cut=0) as proxy:
        summary = restore(url, through(proxy, target), password=target.password, options=options)
    assert summary.ok and summary.sent == 250
    assert len(proxy.connections) >= 2  # the attempt's own and at least one helper's
    assert [r.source for r in summary.folders] == sorted(r.source for r in summary.folders)  # in the archive's order
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_a_helper_line_cut_mid_append_resumes_with_nothing_lost_or_duplicated(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    more_folders(dovecot, source)
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    options = RestoreOptions(no_tls=True, batch_messages=10, workers=2, parallel_after=0, reconnect_delay=0.01)
    with HelperCut(dovecot.imap_port, number=1, cut_at=60_000) as proxy:
        summary = restore(url, through(proxy, target), password=target.password, options=options)
    assert proxy.cuts == 1
    assert summary.ok
    assert summary.sent + summary.as_dict()["recovered"] + summary.as_dict()["found"] == 250
    assert multiset(dovecot, target) == multiset(dovecot, source)


def test_migrate_takes_folders_in_parallel_and_arrives_exactly(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed(dovecot, source)
    more_folders(dovecot, source)
    options = RestoreOptions(no_tls=True, batch_messages=10, workers=3, parallel_after=0)
    summary = migrate(
        source.url("imap"), target.url("imap"), password=source.password, target_password=target.password,
        state=tmp_path / "state.sqlite", options=options,
    )
    assert summary.ok and summary.sent == 250
    assert multiset(dovecot, target) == multiset(dovecot, source)
