"""Gmail's label model and provider limits, against tests/fake_gmail.py (a stand-in
for Gmail built to Google's documentation: Google cannot be reached from here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup, pipeline
from mailbackup.cli import main
from mailbackup.errors import ProviderLimit
from mailbackup.imapconn import limit_hit, lost
from mailbackup.limits import TokenBucket
from mailbackup.model import Folder, Message
from mailbackup.prune import prune_server
from mailbackup.restore import RestoreOptions, restore
from mailbackup.sources.gmail import DAILY_BUDGET as GMAIL_DAILY_BUDGET
from mailbackup.stores import open_store
from mailbackup.verify import AgainstOptions, verify
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


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": "secret"}, catch_exceptions=False)


def test_the_servers_overquota_stops_the_run_cleanly_and_the_next_run_goes_on(gmail: FakeGmail, tmp_path: Path) -> None:
    for n in range(1, 6):
        gmail.add(raw(n, 1000), {"\\Inbox"})
    gmail.budget = 2500  # two messages and a half
    archive = str(tmp_path / "a.sqlite")
    result = invoke("backup", gmail.url(), archive, "--no-tls", "--no-index", "--retries", "5")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if "error" in line]) == 1 and "[OVERQUOTA]" in lines[-1] and "limit reached" in lines[-1]
    assert gmail.commands.count("LOGIN") == 1  # not retried
    assert live(archive)[ALL_MAIL] == [raw(1, 1000), raw(2, 1000)]  # what arrived whole was stored
    gmail.budget = None  # a day later
    result = invoke("backup", gmail.url(), archive, "--no-tls", "--no-index")
    assert result.exit_code == 0, result.output
    assert live(archive)[ALL_MAIL] == [raw(n, 1000) for n in range(1, 6)]
    assert live(archive)["INBOX"] == [raw(n, 1000) for n in range(1, 6)]
    assert sum(gmail.bodies_sent.values()) == 5


def test_our_daily_byte_budget_is_remembered_across_runs_and_stops_before_the_provider_does(
    gmail: FakeGmail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(1, 6):
        gmail.add(raw(n, 1000), {"\\Inbox"})
    size = len(raw(1, 1000))
    archive = str(tmp_path / "a.sqlite")
    args = ("backup", gmail.url(), archive, "--no-tls", "--no-index", "--batch-messages", "1", "--max-bytes-per-day", str(3 * size))
    monkeypatch.setattr(pipeline, "utc_day", lambda: "2026-12-01")
    result = invoke(*args)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("mailbackup: error: daily byte budget reached (max_bytes_per_day")
    assert len(live(archive)[ALL_MAIL]) == 3
    again = invoke(*args)  # the same day: the budget is spent, nothing more is asked for
    assert again.exit_code == 1 and "daily byte budget reached" in again.stderr
    assert sum(gmail.bodies_sent.values()) == 3
    monkeypatch.setattr(pipeline, "utc_day", lambda: "2026-12-02")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert live(archive)[ALL_MAIL] == [raw(n, 1000) for n in range(1, 6)]
    assert sum(gmail.bodies_sent.values()) == 5


def test_gmail_gets_a_daily_budget_under_googles_limit_by_default(gmail: FakeGmail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gmail.add(raw(1), {"\\Inbox"})
    monkeypatch.setattr(pipeline, "utc_day", lambda: "2026-12-01")
    archive = str(tmp_path / "a.sqlite")
    store = open_store(archive, mode="write", account="alice@gmail.com@127.0.0.1")
    store.catalog.add_bytes_fetched("2026-12-01", GMAIL_DAILY_BUDGET - 10)  # another run used nearly all of today
    store.close()
    with pytest.raises(ProviderLimit, match=f"max_bytes_per_day {GMAIL_DAILY_BUDGET} bytes"):
        run(gmail, archive)
    assert GMAIL_DAILY_BUDGET < 2500 * 1000 * 1000 and sum(gmail.bodies_sent.values()) == 0


def test_too_many_connections_at_login_stops_cleanly_without_retrying(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.refuse_login = True
    result = invoke("backup", gmail.url(), str(tmp_path / "a.sqlite"), "--no-tls", "--no-index")
    assert result.exit_code == 1
    assert "too many connections" in result.stderr and gmail.commands.count("LOGIN") == 1


def test_trash_and_spam_are_left_out_unless_asked_for(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"\\Inbox"})
    gmail.add(raw(2), {"\\Trash"})
    gmail.add(raw(3), {"\\Spam"})
    without = str(tmp_path / "a.sqlite")
    assert run(gmail, without).new == 1
    assert live(without) == {ALL_MAIL: [raw(1)], "INBOX": [raw(1)]}
    with_them = str(tmp_path / "b.sqlite")
    assert run(gmail, with_them, gmail_trash_and_spam=True).new == 3
    assert live(with_them) == {ALL_MAIL: [raw(1)], "INBOX": [raw(1)], "[Gmail]/Trash": [raw(2)], "[Gmail]/Spam": [raw(3)]}


def test_the_rate_cap_spaces_reads_to_the_rate() -> None:
    clock = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(1000, clock=lambda: clock[0], sleep=slept.append)
    bucket.take(1000)  # the first second's worth goes at once
    bucket.take(500)
    assert slept == [0.5]


def test_ls_shows_each_label_as_a_folder(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"\\Inbox", "Work", "Travel"})
    archive = f"maildir:{tmp_path / 'md'}"
    assert run(gmail, archive).ok
    result = invoke("ls", archive)
    assert result.exit_code == 0, result.output
    for name in ("INBOX", "Work", "Travel", ALL_MAIL):
        assert name in result.stdout


def test_restore_to_dovecot_creates_one_folder_per_label_with_every_message_exact(gmail: FakeGmail, tmp_path: Path, dovecot, account) -> None:  # type: ignore[no-untyped-def]
    gmail.add(raw(1), {"\\Inbox", "Work", "Travel"}, {"\\Seen"})
    gmail.add(raw(2), {"\\Inbox", "\\Sent"})
    gmail.add(raw(3), {"Work/Clients"})
    gmail.add(raw(4), set())
    archive = f"maildir:{tmp_path / 'md'}"
    assert run(gmail, archive).ok
    summary = restore(archive, account.url("imap"), password=account.password, options=RestoreOptions(no_tls=True))
    assert summary.ok, summary
    on_server = {folder: sorted(hashlib.sha256(m.raw).hexdigest() for m in dovecot.fetch(account, folder)) for folder in dovecot.folders(account)}
    digest = {n: hashlib.sha256(raw(n)).hexdigest() for n in range(1, 5)}
    expected = {"INBOX": [1, 2], "Work": [1], "Travel": [1], "Work/Clients": [3], "[Gmail]/Sent Mail": [2]}
    for folder, numbers in expected.items():
        assert on_server[folder] == sorted(digest[n] for n in numbers), folder
    assert on_server[ALL_MAIL] == sorted(digest.values())
    assert on_server["[Gmail]/Starred"] == []  # a label folder with nothing in it is still a folder


def test_restore_to_gmail_appends_each_message_once_and_sets_its_labels(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"\\Inbox", "Work", "Travel"}, {"\\Seen"})
    gmail.add(raw(2), {"\\Inbox", "\\Sent"})
    gmail.add(raw(3), {"Work/Clients"})
    gmail.add(raw(4), set())
    archive = str(tmp_path / "a.sqlite")
    assert run(gmail, archive).ok
    with FakeGmail() as fresh:
        options = RestoreOptions(no_tls=True)
        state = tmp_path / "restore.sqlite"
        summary = restore(archive, fresh.url(), password="secret", options=options, state=state)
        assert summary.ok and summary.sent == 4
        assert fresh.appended == [ALL_MAIL] * 4  # one APPEND per message, none per label
        restored = {m.raw: (m.labels, m.flags) for m in fresh.messages}
        assert restored == {
            raw(1): ({"\\Inbox", "Work", "Travel"}, {"\\Seen"}),
            raw(2): ({"\\Inbox", "\\Sent"}, set()),
            raw(3): ({"Work/Clients"}, set()),
            raw(4): (set(), set()),
        }
        again = restore(archive, fresh.url(), password="secret", options=options, state=state)
        assert again.ok and again.sent == 0 and len(fresh.messages) == 4
        assert {m.raw: m.labels for m in fresh.messages}[raw(1)] == {"\\Inbox", "Work", "Travel"}


def test_without_an_all_mail_folder_every_folder_is_walked_as_on_any_server(gmail: FakeGmail, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gmail.add(raw(1), {"\\Inbox", "Work"})
    real = gmail.folders
    monkeypatch.setattr(gmail, "folders", lambda: {n: v for n, v in real().items() if n != ALL_MAIL})
    archive = str(tmp_path / "a.sqlite")
    assert run(gmail, archive).new == 2  # nothing is left out for want of All Mail
    assert live(archive) == {"INBOX": [raw(1)], "Work": [raw(1)]}


def test_restoring_only_a_label_folder_to_gmail_still_restores_its_messages(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"Work"})
    gmail.add(raw(2), {"\\Inbox"})
    archive = str(tmp_path / "a.sqlite")
    assert run(gmail, archive).ok
    with FakeGmail() as fresh:
        options = RestoreOptions(no_tls=True, include=("Work",))
        summary = restore(archive, fresh.url(), password="secret", options=options, state=tmp_path / "r.sqlite")
        assert summary.ok and summary.sent == 1
        assert [(m.raw, m.labels) for m in fresh.messages] == [(raw(1), {"Work"})]


def test_a_schema_2_catalog_is_upgraded_in_place_and_read_as_it_is_when_read_only(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "a.sqlite"
    store = open_store(str(path), mode="write", account="alice@example.com")
    folder = store.catalog.ensure_folder(Folder("INBOX"), store.folder_path(Folder("INBOX")))
    message = Message(raw=raw(1), uid=1)
    store.catalog.add(folder.id, 5, list(zip([message], store.put(folder, [message]))))
    store.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE gmail_messages; DROP TABLE gmail_views; DROP TABLE daily_bytes; UPDATE meta SET value = '2' WHERE key = 'schema'")
    db.commit()
    db.close()
    assert [m.raw for m in archived(str(path))["INBOX"]] == [raw(1)]  # read-only: schema 2 as it is
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    store = open_store(str(path), mode="write", account="alice@example.com")
    store.catalog.add_bytes_fetched("2026-12-01", 10)
    assert store.catalog.bytes_fetched("2026-12-01") == 10
    store.close()
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    assert [m.raw for m in archived(str(path))["INBOX"]] == [raw(1)]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)", "OVERQUOTA"),
        ("[THROTTLED] Too many commands", "THROTTLED"),
        ("UID FETCH [LIMIT] Request too large", "LIMIT"),
        ("[ALERT] Too many simultaneous connections. (Failure)", "too many connections"),
        ("Maximum number of connections from user+IP exceeded: too many connections", "too many connections"),
    ],
)
def test_provider_limit_responses_are_named(text: str, name: str) -> None:
    limit = limit_hit(text)
    assert isinstance(limit, ProviderLimit) and f"({name})" in str(limit) and limit.exit_code == 1
    assert isinstance(lost(OSError(f"BYE {text}")), ProviderLimit)


def test_ordinary_refusals_are_not_limits() -> None:
    assert limit_hit("[AUTHENTICATIONFAILED] Invalid credentials (Failure)") is None
    assert limit_hit("[UNAVAILABLE] Temporary System Error") is None


def test_verify_against_gmail_checks_labels_through_all_mail(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"\\Inbox", "Work"})
    gmail.add(raw(2), {"\\Trash"})
    archive = str(tmp_path / "a.sqlite")
    assert run(gmail, archive).ok
    problems: list[object] = []
    against = AgainstOptions(source=gmail.url(), password="secret", no_tls=True)
    summary = verify(archive, report=problems.append, against=against)
    assert problems == [] and summary.compared == 1


def test_prune_server_on_gmail_looks_at_all_mail_only(gmail: FakeGmail, tmp_path: Path) -> None:
    gmail.add(raw(1), {"\\Inbox", "Work"})
    archive = str(tmp_path / "a.sqlite")
    assert run(gmail, archive).ok
    report = prune_server(gmail.url(), archive, password="secret", older_than_days=30, options=BackupOptions(no_tls=True))
    assert report.ok and [(f.name, f.candidates) for f in report.folders if f.candidates or f.refused] == [(ALL_MAIL, 1)]
