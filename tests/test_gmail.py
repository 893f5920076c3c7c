"""Gmail's label model and provider limits, against tests/fake_gmail.py (a stand-in
for Gmail built to Google's documentation: Google cannot be reached from here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbackup import BackupOptions, backup
from mailbackup.errors import ProviderLimit
from mailbackup.stores import open_store
from tests.archive_view import archived
from tests.fake_gmail import ALL_MAIL, FakeGmail


def raw(n: int, size: int = 200) -> bytes:
    return b"From: a@example.com\r\nSubject: gmail %d\r\nMessage-ID: <m%d@example.com>\r\n\r\n" % (n, n) + b"y" * size + b"\r\n"


def run(fake: FakeGmail, url: str, **options: object):  # type: ignore[no-untyped-def]
    opts = BackupOptions(no_tls=True, index=False, retry_delay=0, **options)  # type: ignore[arg-type]
    return backup(fake.url(), url, password="secret", options=opts)


def live(url: str) -> dict[str, list[bytes]]:
    return {name: [m.raw for m in msgs] for name, msgs in archived(url).items() if msgs}


@pytest.fixture
def gmail() -> FakeGmail:
    with FakeGmail() as fake:
        yield fake


@pytest.mark.parametrize("kind", ["sqlite", "maildir", "mbox"])
def test_a_message_with_three_labels_is_downloaded_once_and_shows_in_three_folders(gmail: FakeGmail, tmp_path: Path, kind: str) -> None:
    three = gmail.add(raw(1), {"\\Inbox", "Work", "Travel"}, {"\\Seen"})
    gmail.add(raw(2), {"\\Inbox"})
    gmail.add(raw(3), set())  # archived: All Mail only
    url = str(tmp_path / "a.sqlite") if kind == "sqlite" else f"{kind}:{tmp_path / kind}"
    summary = run(gmail, url)
    assert summary.ok and summary.new == 3
    assert gmail.bodies_sent[three.msgid] == 1 and sum(gmail.bodies_sent.values()) == 3
    view = live(url)
    assert view == {ALL_MAIL: [raw(1), raw(2), raw(3)], "INBOX": [raw(1), raw(2)], "Work": [raw(1)], "Travel": [raw(1)]}
    assert {m.flags for m in archived(url)["Work"]} == {frozenset({"\\Seen"})}
    again = run(gmail, url)
    assert again.ok and again.new == 0 and sum(gmail.bodies_sent.values()) == 3
    assert live(url) == view


def test_a_label_change_reaches_the_archive_on_the_next_run_through_changedsince(gmail: FakeGmail, tmp_path: Path) -> None:
    first = gmail.add(raw(1), {"\\Inbox", "Travel"})
    second = gmail.add(raw(2), {"\\Inbox"})
    url = str(tmp_path / "a.sqlite")
    assert run(gmail, url).ok
    mark = gmail.highest_modseq
    gmail.relabel(first, remove={"Travel", "\\Inbox"}, add={"Work"})
    gmail.relabel(second, add={"\\Starred"})
    second.flags.add("\\Flagged")
    gmail.commands.clear()
    summary = run(gmail, url)
    assert summary.ok and summary.new == 0
    assert live(url) == {ALL_MAIL: [raw(1), raw(2)], "INBOX": [raw(2)], "Work": [raw(1)], "[Gmail]/Starred": [raw(2)]}
    assert [m.gone for m in archived(url, include_gone=True)["Travel"]] == [True]
    assert sum(gmail.bodies_sent.values()) == 2
    assert gmail.changedsince == [mark]  # one metadata pass, only what changed since the first run
    store = open_store(url, mode="read")
    try:
        all_mail = store.catalog.folder(ALL_MAIL)
        labels = store.catalog.gmail_labels(all_mail.id, all_mail.uid_validity)
    finally:
        store.close()
    assert labels == {1: (first.msgid, first.thrid, ("Work",)), 2: (second.msgid, second.thrid, ("\\Inbox", "\\Starred"))}
