"""IMAP backup against a real Dovecot: fidelity, incremental runs, resets and crashes."""

from __future__ import annotations

import hashlib
import mailbox
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailbackup import BackupOptions, backup
from mailbackup.sources import imap as imap_source
from tests.archive_view import archive_url, archived
from tests.corpus.tricky import tricky_messages

CORPUS = Path(__file__).parent / "corpus"
ROOT = Path(__file__).parent.parent
STORES = ["maildir", "mbox", "sqlite"]


def run_backup(account, url: str, **options) -> object:  # type: ignore[no-untyped-def]
    return backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True, **options))


def server_view(dovecot, account) -> dict[str, list[tuple[bytes, frozenset[str], datetime]]]:  # type: ignore[no-untyped-def]
    out = {}
    for folder in dovecot.folders(account):
        out[folder] = [
            (m.raw, frozenset(f.decode() for f in m.flags if f != b"\\Recent"), m.internal_date)
            for m in dovecot.fetch(account, folder)
        ]
    return out


def archive_view(url: str) -> dict[str, list[tuple[bytes, frozenset[str], datetime | None]]]:
    return {name: [(m.raw, m.flags, m.internal_date) for m in msgs] for name, msgs in archived(url).items()}


def corpus_files() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("mikel-mail/**/*.eml"))]


def seed_tricky(dovecot, account) -> int:  # type: ignore[no-untyped-def]
    """Tricky messages in INBOX with varied flags and dates, a nested and a non-ASCII folder."""
    zones = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    count = 0
    for i, raw in enumerate(tricky_messages().values()):
        flags = [("\\Seen", "$Forwarded"), ("\\Flagged", "\\Answered", "ProjectX"), ()][i % 3]
        when = datetime(2019 + i % 5, 1 + i % 12, 1 + i % 28, 10, i % 60, 7, tzinfo=zones[i % 3])
        dovecot.append(account, "INBOX", raw, flags, when)
        count += 1
    for i, raw in enumerate(corpus_files()):
        folder = ["Archive/2024", "Entwürfe/Ökonomie", "INBOX"][i % 3]
        dovecot.append(account, folder, raw, ("\\Seen",) if i % 2 else (), datetime(2020, 2, 3, 4, 5, 6, tzinfo=timezone.utc))
        count += 1
    return count


@pytest.mark.parametrize("kind", STORES)
def test_archive_matches_server_byte_for_byte(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    count = seed_tricky(dovecot, account)
    url = archive_url(kind, tmp_path)
    summary = run_backup(account, url)
    assert summary.ok and summary.new == count
    server = server_view(dovecot, account)
    got = archive_view(url)
    assert set(got) >= set(server)
    for folder, messages in server.items():
        assert got[folder] == messages, folder
    # The catalog's SHA-256 is of the exact bytes the server sent.
    store_sums = sorted(hashlib.sha256(m[0]).hexdigest() for msgs in got.values() for m in msgs)
    server_sums = sorted(hashlib.sha256(m[0]).hexdigest() for msgs in server.values() for m in msgs)
    assert store_sums == server_sums


def test_internal_date_is_kept_as_the_server_sends_it(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Dovecot's Maildir keeps the moment but not the offset (tests/corpus/NOTES.md),
    # so the archive must hold what the server sends, offset included.
    when = datetime(2022, 7, 1, 23, 59, 58, tzinfo=timezone(timedelta(hours=-3, minutes=-30)))
    dovecot.append(account, "INBOX", b"Subject: x\r\n\r\ny\r\n", (), when)
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url)
    [message] = archived(url)["INBOX"]
    [served] = dovecot.fetch(account, "INBOX")
    assert message.internal_date == when == served.internal_date
    assert message.internal_date.utcoffset() == served.internal_date.utcoffset()


def test_rerun_fetches_nothing_and_one_new_message_is_one_fetch(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(5):
        dovecot.append(account, "INBOX", b"Subject: %d\r\n\r\nbody\r\n" % i)
    url = archive_url("maildir", tmp_path)
    assert run_backup(account, url).new == 5
    again = run_backup(account, url)
    assert (again.new, again.bytes) == (0, 0)
    dovecot.append(account, "INBOX", b"Subject: new\r\n\r\nbody\r\n")
    assert run_backup(account, url).new == 1
    assert len(archived(url)["INBOX"]) == 6


@pytest.mark.parametrize("condstore", [True, False])
def test_flag_change_on_server_reaches_archive(dovecot, account, tmp_path: Path, monkeypatch, condstore: bool) -> None:  # type: ignore[no-untyped-def]
    if not condstore:
        original = imap_source.ImapSource.__init__

        def no_condstore(self, session):  # type: ignore[no-untyped-def]
            original(self, session)
            self.condstore = False

        monkeypatch.setattr(imap_source.ImapSource, "__init__", no_condstore)
    uid = dovecot.append(account, "INBOX", b"Subject: flags\r\n\r\nbody\r\n", ("\\Seen",))
    dovecot.append(account, "INBOX", b"Subject: other\r\n\r\nbody\r\n")
    url = archive_url("maildir", tmp_path)
    run_backup(account, url)
    with dovecot.client(account) as imap:
        imap.select_folder("INBOX")
        imap.add_flags([uid], [b"\\Flagged", b"Important"])
    summary = run_backup(account, url)
    assert summary.new == 0
    assert sum(f.flags_updated for f in summary.folders) == 1
    flagged = [m for m in archived(url)["INBOX"] if m.uid == uid][0]
    assert flagged.flags == {"\\Seen", "\\Flagged", "Important"}
    names = os.listdir(tmp_path / "md" / "INBOX" / "cur")
    assert sum(n.endswith(":2,FS") for n in names) == 1


def test_uidvalidity_change_stores_no_duplicate(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raws = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(4)]
    for raw in raws:
        dovecot.append(account, "Work", raw, ("\\Seen",))
    for kind in STORES:
        run_backup(account, archive_url(kind, tmp_path))
    old = dovecot.uid_validity(account, "Work")
    assert dovecot.recreate_folder(account, "Work") != old
    for raw in raws[:3]:  # same mail back, one message lost on the server
        dovecot.append(account, "Work", raw, ("\\Seen", "\\Answered"))
    for kind in STORES:
        url = archive_url(kind, tmp_path)
        summary = run_backup(account, url)
        report = [f for f in summary.folders if f.name == "Work"][0]
        assert (report.new, report.adopted, report.gone) == (0, 3, 1), kind
        view = archived(url, include_gone=True)["Work"]
        assert sorted(m.raw for m in view) == sorted(raws), kind
        assert [m.gone for m in view].count(True) == 1
        assert all(m.flags == {"\\Seen", "\\Answered"} for m in view if not m.gone)
    assert len(os.listdir(tmp_path / "md" / "Work" / "cur")) == 4
    assert len(mailbox.mbox(tmp_path / "mb" / "Work.mbox")) == 4
    # A third run is quiet: the folder's checkpoint moved to the new UIDVALIDITY.
    assert run_backup(account, archive_url("sqlite", tmp_path)).new == 0


def test_expunged_message_stays_and_is_marked_gone(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uid = dovecot.append(account, "INBOX", b"Subject: doomed\r\n\r\nbody\r\n")
    dovecot.append(account, "INBOX", b"Subject: stays\r\n\r\nbody\r\n")
    url = archive_url("mbox", tmp_path)
    run_backup(account, url)
    with dovecot.client(account) as imap:
        imap.select_folder("INBOX")
        imap.delete_messages([uid])
        imap.expunge()
    summary = run_backup(account, url)
    assert sum(f.gone for f in summary.folders) == 1
    view = archived(url, include_gone=True)["INBOX"]
    assert [(m.uid, m.gone) for m in view] == [(uid, True), (uid + 1, False)]
    assert view[0].raw == b"Subject: doomed\r\n\r\nbody\r\n"


def test_message_in_three_folders_is_stored_once_in_sqlite(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    raw = b"Subject: everywhere\r\n\r\n" + b"x" * 10000 + b"\r\n"
    for folder in ("INBOX", "Sent", "Archive/2024"):
        dovecot.append(account, folder, raw)
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select count(*) from blobs")) == 1
        assert conn.scalar(sa.text("select count(*) from messages")) == 3
    engine.dispose()


def test_reserved_and_odd_folder_names_stay_inside(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    names = ["cur", "new/tmp", "a\\b", "50 percent", "Entwürfe/日本"]
    for name in names:
        dovecot.append(account, name, f"Subject: {name}\r\n\r\nbody\r\n".encode())
    url = archive_url("maildir", tmp_path)
    run_backup(account, url)
    view = archived(url)
    for name in names:
        assert view[name][0].raw == f"Subject: {name}\r\n\r\nbody\r\n".encode()
    md = mailbox.Maildir(tmp_path / "md" / "%63ur", create=False)
    assert len(md) == 1


def test_folder_globs_select_and_exclude(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for folder in ("INBOX", "Archive/2023", "Archive/2024", "Spam"):
        dovecot.append(account, folder, f"Subject: {folder}\r\n\r\n.\r\n".encode())
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url, include=("Archive/*", "INBOX"), exclude=("*/2023",))
    assert sorted(n for n, msgs in archived(url).items() if msgs) == ["Archive/2024", "INBOX"]


def test_maildir_and_mbox_open_in_python_mailbox(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = 0
    for i, raw in enumerate(corpus_files()[:30]):
        dovecot.append(account, "INBOX", raw, ("\\Seen",) if i % 2 else ())
        count += 1
    run_backup(account, archive_url("maildir", tmp_path))
    run_backup(account, archive_url("mbox", tmp_path))
    server = [m.raw for m in dovecot.fetch(account, "INBOX")]
    md = mailbox.Maildir(tmp_path / "md" / "INBOX", create=False)
    assert len(md) == len(set(server))
    assert sum("S" in m.get_flags() for m in md) == 15
    mb = mailbox.mbox(tmp_path / "mb" / "INBOX.mbox", create=False)
    assert len(mb) == count
    # Corpus files that open with their own "From " line read differently once quoted.
    plain = [raw for raw in server if not raw.startswith(b"From ")]
    assert sum(m["Subject"] is not None for m in mb) >= sum(b"\nSubject:" in b"\n" + raw for raw in plain)


@pytest.mark.parametrize("kind", STORES)
def test_kill_9_mid_run_then_rerun_leaves_each_message_once(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    total = 400
    body = b"x" * 3000
    dovecot.seed_maildir(
        account, "INBOX", ((b"Subject: %d\r\nMessage-ID: <%d@k>\r\n\r\n%s\r\n" % (i, i, body), "S" if i % 2 else "", 1.6e9 + i) for i in range(total))
    )
    dovecot.fetch(account, "INBOX")[:1]  # let Dovecot index before the clock starts
    url = archive_url(kind, tmp_path)
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    command = [sys.executable, "-m", "mailbackup", "backup", account.url("imap"), url, "--no-tls", "-q", "--batch-messages", "10"]
    for delay in (0.6, 0.9, 1.2):
        process = subprocess.Popen(command, env=env, cwd=ROOT)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = subprocess.run(command + ["--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    view = archived(url)["INBOX"]
    assert len(view) == total
    assert len({m.raw for m in view}) == total
    if kind == "maildir":
        assert len(os.listdir(tmp_path / "md" / "INBOX" / "cur")) == total
    if kind == "mbox":
        assert len(mailbox.mbox(tmp_path / "mb" / "INBOX.mbox")) == total


def test_postgresql_archive(dovecot, account, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    raw = b"Subject: pg\r\n\r\n" + "ünïcode body\r\n".encode("latin-1") + b"\x00nul\r\n"
    for folder in ("INBOX", "Sent"):
        dovecot.append(account, folder, raw, ("\\Seen", "Keyword1"))
    dovecot.append(account, "INBOX", tricky_messages()[next(iter(tricky_messages()))])
    summary = run_backup(account, pg_url)
    assert summary.ok and summary.new == 3
    server = server_view(dovecot, account)
    got = archive_view(pg_url)
    for folder, messages in server.items():
        assert got[folder] == messages
    assert run_backup(account, pg_url).new == 0
    import sqlalchemy as sa

    from mailbackup.catalog import engine_url

    engine = sa.create_engine(engine_url(pg_url))
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select count(*) from blobs")) == 2
    engine.dispose()


def test_special_use_and_delimiter_are_kept(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "Sent", b"Subject: sent\r\n\r\nbody\r\n")
    dovecot.append(account, "Junk", b"Subject: junk\r\n\r\nbody\r\n")
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url)
    from mailbackup.stores import open_store

    store = open_store(url, mode="read")
    folders = {f.name: f for f in store.catalog.folders()}
    store.close()
    assert "\\Sent" in folders["Sent"].attributes
    assert "\\Junk" in folders["Junk"].attributes
    assert folders["Sent"].delimiter == "/"


def test_dot_delimiter_maps_to_nested_directories(dovecot_dot, account_dot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot_dot.append(account_dot, "INBOX.Archive.2024", b"Subject: nested\r\n\r\nbody\r\n")
    dovecot_dot.append(account_dot, "INBOX.Entwürfe", b"Subject: umlaut\r\n\r\nbody\r\n")
    url = archive_url("maildir", tmp_path)
    run_backup(account_dot, url)
    assert mailbox.Maildir(tmp_path / "md" / "INBOX" / "Archive" / "2024", create=False).keys()
    assert mailbox.Maildir(tmp_path / "md" / "INBOX" / "Entwürfe", create=False).keys()
    assert archived(url)["INBOX.Archive.2024"][0].raw == b"Subject: nested\r\n\r\nbody\r\n"


@pytest.mark.parametrize("kind", STORES)
def test_a_connection_cut_mid_fetch_reconnects_and_finishes(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    from tests.proxy import CutProxy

    raws = [b"Subject: %d\r\nMessage-ID: <%d@cut>\r\n\r\n%s\r\n" % (i, i, b"c" * 9000) for i in range(30)]
    dovecot.seed_maildir(account, "INBOX", ((raw, "S", 1.6e9 + i) for i, raw in enumerate(raws)))
    url = archive_url(kind, tmp_path)
    with CutProxy(dovecot.imap_port, cut_after=120000) as proxy:
        summary = backup(
            f"imap://{account.user}@127.0.0.1:{proxy.port}", url, password=account.password,
            options=BackupOptions(no_tls=True, batch_messages=4, retry_delay=0.01),
        )
        assert proxy.cuts == 1
    assert summary.ok and summary.new == 30
    view = archived(url)["INBOX"]
    assert sorted(m.raw for m in view) == sorted(raws)


def test_a_folder_deleted_on_the_server_stays_in_the_archive_marked_gone(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "Projects", b"Subject: keep me\r\n\r\nbody\r\n")
    dovecot.append(account, "INBOX", b"Subject: inbox\r\n\r\nbody\r\n")
    url = archive_url("mbox", tmp_path)
    run_backup(account, url)
    with dovecot.client(account) as imap:
        imap.delete_folder("Projects")
    summary = run_backup(account, url)
    report = [f for f in summary.folders if f.name == "Projects"][0]
    assert (report.gone, report.skipped) == (1, "no longer on the server")
    [kept] = archived(url, include_gone=True)["Projects"]
    assert kept.gone and kept.raw == b"Subject: keep me\r\n\r\nbody\r\n"
    assert not any(f.name == "Projects" for f in run_backup(account, url).folders)  # once marked, quiet
