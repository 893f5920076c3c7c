"""Interop with Cyrus IMAP 3.6: backup, restore and migrate against a second real server.

Cyrus's classic namespace puts every personal folder under "INBOX." with '.' as
delimiter, refuses folders outside it, and refuses some messages on APPEND.
The quirks are listed in the README's compatibility notes.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from imapclient.exceptions import IMAPClientError

from tests.archive_view import archived
from tests.corpus.tricky import tricky_messages
from tests.test_backup_imap import STORES, archive_url, archive_view, corpus_files, run_backup, server_view
from tests.test_migrate import normalised, run_migrate
from tests.test_migrate import seed as seed_dovecot
from tests.test_restore_imap import restore_to

NESTED, NON_ASCII = "INBOX.Archive.2024", "INBOX.Entwürfe.Ökonomie"


def seed(cyrus, account, corpus: int = 45) -> int:  # type: ignore[no-untyped-def]
    """Tricky messages in INBOX with flags, keywords and dates; corpus mail in nested folders."""
    zones = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    count = 0
    for i, raw in enumerate(tricky_messages().values()):
        flags = [("\\Seen", "$Forwarded"), ("\\Flagged", "\\Answered", "ProjectX"), ()][i % 3]
        when = datetime(2019 + i % 5, 1 + i % 12, 1 + i % 28, 10, i % 60, 7, tzinfo=zones[i % 3])
        cyrus.append(account, "INBOX", raw, flags, when)
        count += 1
    for i, raw in enumerate(corpus_files()[:corpus]):
        folder = [NESTED, NON_ASCII, "INBOX"][i % 3]
        try:
            cyrus.append(account, folder, raw, ("\\Seen",) if i % 2 else (), datetime(2020, 2, 3, 4, 5, 6, tzinfo=timezone.utc))
        except IMAPClientError as exc:  # "Message contains invalid header": see refused_by_cyrus
            assert "invalid header" in str(exc), exc
            continue
        count += 1
    return count


def test_server_layout_is_what_the_tests_assume(cyrus, account_cyrus) -> None:  # type: ignore[no-untyped-def]
    with cyrus.client(account_cyrus) as imap:
        assert imap.namespace().personal == (("INBOX.", "."),)
        with pytest.raises(IMAPClientError, match="Permission denied"):
            imap.create_folder("Archive")  # outside INBOX.
    cyrus.append(account_cyrus, NESTED, b"Subject: x\r\n\r\ny\r\n")
    # The parent comes into being on its own.
    assert cyrus.folders(account_cyrus) == ["INBOX", "INBOX.Archive", NESTED]


@pytest.mark.parametrize("kind", STORES)
def test_archive_matches_cyrus_byte_for_byte(cyrus, account_cyrus, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    count = seed(cyrus, account_cyrus)
    url = archive_url(kind, tmp_path)
    summary = run_backup(account_cyrus, url)
    assert summary.ok and summary.new == count
    server = server_view(cyrus, account_cyrus)
    got = archive_view(url)
    assert set(got) == set(server) >= {"INBOX", NESTED, NON_ASCII}
    for folder, messages in server.items():
        assert got[folder] == messages, folder
    store_sums = sorted(hashlib.sha256(m[0]).hexdigest() for msgs in got.values() for m in msgs)
    assert store_sums == sorted(hashlib.sha256(m[0]).hexdigest() for msgs in server.values() for m in msgs)
    if kind == "maildir":  # '.' maps to nested directories, as for a '.' Dovecot
        assert (tmp_path / "md" / "INBOX" / "Entwürfe" / "Ökonomie" / "cur").is_dir()
    again = run_backup(account_cyrus, url)
    assert (again.new, again.bytes) == (0, 0)


def test_flag_change_and_new_mail_reach_the_archive(cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uid = cyrus.append(account_cyrus, "INBOX", b"Subject: flags\r\n\r\nbody\r\n", ("\\Seen",))
    cyrus.append(account_cyrus, "INBOX", b"Subject: other\r\n\r\nbody\r\n")
    url = archive_url("maildir", tmp_path)
    assert run_backup(account_cyrus, url).new == 2
    with cyrus.client(account_cyrus) as imap:
        imap.select_folder("INBOX")
        imap.add_flags([uid], [b"\\Flagged", b"Important"])
    cyrus.append(account_cyrus, "INBOX", b"Subject: new\r\n\r\nbody\r\n")
    summary = run_backup(account_cyrus, url)
    assert summary.new == 1 and sum(f.flags_updated for f in summary.folders) == 1
    flagged = [m for m in archived(url)["INBOX"] if m.uid == uid][0]
    assert flagged.flags == {"\\Seen", "\\Flagged", "Important"}
    assert sum(n.endswith(":2,FS") for n in os.listdir(tmp_path / "md" / "INBOX" / "cur")) == 1


def test_uidvalidity_change_stores_no_duplicate(cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raws = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(4)]
    for raw in raws:
        cyrus.append(account_cyrus, "INBOX.Work", raw, ("\\Seen",))
    for kind in STORES:
        run_backup(account_cyrus, archive_url(kind, tmp_path))
    old = cyrus.uid_validity(account_cyrus, "INBOX.Work")
    assert cyrus.recreate_folder(account_cyrus, "INBOX.Work") != old
    for raw in raws[:3]:
        cyrus.append(account_cyrus, "INBOX.Work", raw, ("\\Seen", "\\Answered"))
    for kind in STORES:
        url = archive_url(kind, tmp_path)
        report = [f for f in run_backup(account_cyrus, url).folders if f.name == "INBOX.Work"][0]
        assert (report.new, report.adopted, report.gone) == (0, 3, 1), kind
        view = archived(url, include_gone=True)["INBOX.Work"]
        assert sorted(m.raw for m in view) == sorted(raws), kind


@pytest.mark.parametrize("kind", STORES)
def test_restore_into_an_empty_cyrus_account_is_exact(cyrus, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, target = cyrus.add_user(), cyrus.add_user()
    count = seed(cyrus, source, corpus=30)
    url = archive_url(kind, tmp_path)
    assert run_backup(source, url).new == count
    summary = restore_to(target, url)
    assert summary.ok and summary.sent == count
    want, got = server_view(cyrus, source), server_view(cyrus, target)
    assert sorted(got) == sorted(want)
    for folder, messages in want.items():
        assert [(hashlib.sha256(m[0]).hexdigest(), m[1], m[2]) for m in got[folder]] == [
            (hashlib.sha256(m[0]).hexdigest(), m[1], m[2]) for m in messages
        ], folder
    again = restore_to(target, url)
    assert (again.sent, again.as_dict()["done_before"]) == (0, count)


def test_restore_of_a_dovecot_archive_into_cyrus(dovecot, account, cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed_dovecot(dovecot, account)
    dovecot.append(account, "Sent", b"Subject: s\r\n\r\nx\r\n", ("\\Seen",))
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url)
    summary = restore_to(account_cyrus, url)
    assert summary.ok and summary.sent == count + 1
    want = normalised(server_view(dovecot, account), "/")
    got = {name.removeprefix("INBOX/"): messages for name, messages in normalised(server_view(cyrus, account_cyrus), ".").items()}
    assert got == {"Entwürfe": [], "Archive": [], **want}  # parents Cyrus made itself
    with cyrus.client(account_cyrus) as imap:
        attributes = {name: flags for flags, _, name in imap.list_folders()}
    assert b"\\Sent" in attributes["INBOX.Sent"]


def test_migrate_dovecot_to_cyrus_and_back_then_rerun_copies_nothing(dovecot, account, cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed_dovecot(dovecot, account)
    summary = run_migrate(account, account_cyrus, tmp_path / "to.sqlite")
    assert summary.ok and summary.sent == count
    assert NON_ASCII in cyrus.folders(account_cyrus)
    want = normalised(server_view(dovecot, account), "/")
    on_cyrus = normalised(server_view(cyrus, account_cyrus), ".")
    assert {k.removeprefix("INBOX/"): v for k, v in on_cyrus.items()} == {"Entwürfe": [], "Archive": [], **want}
    again = run_migrate(account, account_cyrus, tmp_path / "to.sqlite")
    assert (again.sent, again.as_dict()["done_before"]) == (0, count)
    back = dovecot.add_user()
    assert run_migrate(account_cyrus, back, tmp_path / "back.sqlite").sent == count
    returned = normalised(server_view(dovecot, back), "/")
    assert {k: v for k, v in returned.items() if v} == {k: v for k, v in want.items() if v}
    assert run_migrate(account_cyrus, back, tmp_path / "back.sqlite").sent == 0


def test_messages_cyrus_refuses_are_reported_not_fatal(dovecot, account, cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raws = [b"Subject: fine\r\n\r\nbody\r\n", b"Subject: nul\r\n\r\nnul \x00 byte\r\n",
            b"Subject: ok\r\nBad Header Line\r\n\r\nbody\r\n"]
    url = archive_url("mbox", tmp_path)
    from mailbackup.model import Folder, Message
    from mailbackup.stores import open_store

    store = open_store(url, mode="write")
    folder = store.catalog.ensure_folder(Folder("INBOX", "/"), "INBOX")
    messages = [Message(raw=raw, uid=i + 1) for i, raw in enumerate(raws)]
    store.catalog.add(folder.id, 1, list(zip(messages, store.put(folder, messages))))
    store.close()
    summary = restore_to(account_cyrus, url)
    assert summary.sent == 1
    reasons = " ".join(reason for _, reason in summary.failed)
    assert "NUL" in reasons and "invalid header" in reasons, reasons
    assert [m.raw for m in cyrus.fetch(account_cyrus, "INBOX")] == [raws[0]]


def test_pop3_backup_from_cyrus_is_byte_identical(cyrus, account_cyrus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_backup_pop3 import on_server, pop_backup

    for raw in tricky_messages().values():
        cyrus.append(account_cyrus, "INBOX", raw)
    url = archive_url("sqlite", tmp_path)
    summary = pop_backup(account_cyrus, url)
    assert summary.ok and summary.new == len(tricky_messages())
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(on_server(cyrus, account_cyrus))
    assert pop_backup(account_cyrus, url).new == 0
