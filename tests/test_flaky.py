"""Progress on a flaky link: every connection is cut somewhere, and one run still finishes.

What arrived whole before a drop is committed; IMAP resumes a cut message from
where it broke off; a POP3 message bigger than what one connection carries is
listed as failed instead of being retried forever.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections import Counter
from pathlib import Path

from mailbackup import BackupOptions, backup
from tests.archive_view import archived
from tests.proxy import FaultProxy

FAST_RETRY = dict(no_tls=True, index=False, retry_delay=0.01)


class FlakyProxy(FaultProxy):
    """Cut every connection after a random number of server -> client bytes."""

    def __init__(self, target_port: int, low: int, high: int, seed: int) -> None:
        super().__init__(target_port, None, "down", connections_to_cut=0)
        self.random = random.Random(seed)
        self.low, self.high = low, high

    def cut_for(self, number: int) -> int | None:
        return self.random.randint(self.low, self.high)


def message(rng: random.Random, number: int, size: int) -> bytes:
    head = b"Subject: flaky %d\r\nMessage-ID: <%d@flaky>\r\n\r\n" % (number, number)
    body = base64.encodebytes(rng.randbytes(max(size - len(head), 1) * 3 // 4)).replace(b"\n", b"\r\n")
    return head + body


def account_of(rng: random.Random, count: int, largest: int) -> list[bytes]:
    """Sizes spread evenly on a log scale from 1 KB up to largest, and a few at largest."""
    sizes = [int(1000 * (largest / 1000) ** rng.random()) for _ in range(count - 5)] + [largest - 100] * 5
    rng.shuffle(sizes)
    return [message(rng, n, size) for n, size in enumerate(sizes)]


def digests(raws: list[bytes]) -> Counter[str]:
    return Counter(hashlib.sha256(raw).hexdigest() for raw in raws)


def test_imap_backup_through_a_link_cut_every_20kb_to_2mb_finishes_in_one_run(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    raws = account_of(rng, 300, 1_500_000)
    dovecot.seed_maildir(account, "INBOX", ((raw, "", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = f"maildir:{tmp_path / 'md'}"
    with FlakyProxy(dovecot.imap_port, 20_000, 2_000_000, seed) as proxy:
        summary = backup(
            f"imap://{account.user}@127.0.0.1:{proxy.port}", url, password=account.password, options=BackupOptions(**FAST_RETRY)
        )
        cuts = proxy.cuts
    print(f"seed {seed}: {cuts} connections cut, {summary.new} messages, {summary.elapsed:.1f} s")
    assert cuts > 20  # the link really was flaky
    assert summary.ok and summary.new == 300, summary.failed
    assert digests([m.raw for m in archived(url)["INBOX"]]) == digests(raws)  # every message exactly once


def test_pop3_backup_through_a_flaky_link_finishes_in_one_run(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    raws = account_of(rng, 120, 150_000)
    dovecot.seed_maildir(account, "INBOX", ((raw, "", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = str(tmp_path / "a.sqlite")
    with FlakyProxy(dovecot.pop3_port, 200_000, 1_000_000, seed) as proxy:
        summary = backup(
            f"pop3://{account.user}@127.0.0.1:{proxy.port}", url, password=account.password,
            options=BackupOptions(**FAST_RETRY, delete=True),
        )
        cuts = proxy.cuts
    assert cuts > 3
    assert summary.ok and summary.new == 120, summary.failed
    assert digests([m.raw for m in archived(url, include_gone=True)["INBOX"]]) == digests(raws)
    assert dovecot.fetch(account, "INBOX") == []  # the last, clean connection QUIT: all deleted


def test_imap_resumes_a_message_bigger_than_any_one_connection_carries(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    raws = [message(rng, 1, 2000), message(rng, 2, 600_000), message(rng, 3, 2000)]
    dovecot.seed_maildir(account, "INBOX", ((raw, "", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = str(tmp_path / "a.sqlite")
    with FlakyProxy(dovecot.imap_port, 120_000, 120_000, 0) as proxy:
        summary = backup(
            f"imap://{account.user}@127.0.0.1:{proxy.port}", url, password=account.password, options=BackupOptions(**FAST_RETRY)
        )
        assert proxy.cuts >= 5  # 600 KB through 120 KB connections
    assert summary.ok and summary.new == 3
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(raws)


def test_pop3_message_bigger_than_a_connection_is_listed_as_failed_not_retried_forever(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(8)
    raws = [message(rng, 1, 2000), message(rng, 2, 400_000), message(rng, 3, 2000)]
    dovecot.seed_maildir(account, "INBOX", ((raw, "", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = str(tmp_path / "a.sqlite")
    with FlakyProxy(dovecot.pop3_port, 100_000, 100_000, 0) as proxy:
        summary = backup(
            f"pop3://{account.user}@127.0.0.1:{proxy.port}", url, password=account.password, options=BackupOptions(**FAST_RETRY)
        )
        assert proxy.cuts <= 10
    assert not summary.ok and summary.new == 2
    [(folder, line)] = summary.failed
    assert folder == "INBOX" and "more than one connection carried" in line
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted([raws[0], raws[2]])
