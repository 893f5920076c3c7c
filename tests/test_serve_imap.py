"""serve --imap: real clients (mbsync, mutt, imaplib, mailbackup's own backup) read an archive, and nothing changes it."""

from __future__ import annotations

import email
import email.policy
import hashlib
import imaplib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup
from mailbackup.cli import main
from mailbackup.search import Filters, search
from mailbackup.serve import ServeSettings, start_imap
from mailbackup.stores import open_store

PASSWORD = "s3rve-pw"


def message(n: int, folder: str, extra: bytes = b"") -> bytes:
    return (
        b"From: Sender %d <sender%d@example.org>\r\n"
        b"To: Anna <anna@example.net>, bob@example.com\r\n"
        b"Subject: note %d in %s\r\n"
        b"Date: Tue, 0%d Mar 2021 10:00:00 +0100\r\n"
        b"Message-ID: <m%d.%s@example.org>\r\n"
        b"\r\n"
        b"body of note %d %s\r\n" % (n, n, n, folder.encode(), 1 + n % 9, n, folder.encode(), n, extra)
    )


MULTIPART = (
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\n"
    b"To: anna@example.net\r\n"
    b"Subject: with attachment\r\n"
    b"Date: Wed, 05 May 2021 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"see the zanzibar file\r\n"
    b"--b1\r\n"
    b"Content-Type: application/pdf; name=\"x.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"x.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--b1--\r\n"
)

FOLDERS = {"INBOX": 6, "Archive/2019": 3, "Sent": 2, "Über": 1}


@pytest.fixture
def filled(dovecot, account):  # type: ignore[no-untyped-def]
    """A Dovecot account with a few folders, flags and one multipart message."""
    for folder, count in FOLDERS.items():
        for n in range(count):
            flags = ("\\Seen",) if n % 2 else ("\\Flagged", "$Label1") if n % 3 == 0 else ()
            dovecot.append(account, folder, message(n, folder), flags)
    dovecot.append(account, "INBOX", MULTIPART, ("\\Seen",))
    return account


def make_archive(account, url: str) -> str:  # type: ignore[no-untyped-def]
    backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    return url


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(params=["maildir", "mbox", "sqlite"])
def archive(request, filled, tmp_path):  # type: ignore[no-untyped-def]
    urls = {"maildir": f"maildir:{tmp_path}/a", "mbox": f"mbox:{tmp_path}/a", "sqlite": f"{tmp_path}/a/archive.sqlite"}
    if request.param == "sqlite":
        (tmp_path / "a").mkdir()
    return make_archive(filled, urls[request.param])


@pytest.fixture
def served(archive) -> Iterator[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    server = start_imap(("127.0.0.1", 0), ServeSettings(archive=archive, user="reader", password=PASSWORD))
    try:
        yield "127.0.0.1", server.port, archive
    finally:
        server.shutdown()
        server.server_close()


def archived(url: str, unix_lines: bool = False) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Folder -> [(sha256, flags)] of live messages, as the catalog has them.

    unix_lines: the SHA-256 of the archived bytes with CRLF made LF (what mbsync writes to a Maildir).
    """
    store = open_store(url, mode="read")
    try:
        out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for folder in store.catalog.folders():
            live = [e for e in store.catalog.entries(folder.id) if not e.gone]
            if unix_lines:
                hashes = [hashlib.sha256(store.get(e.location).replace(b"\r\n", b"\n")).hexdigest() for e in live]
            else:
                hashes = [e.sha256 for e in live]
            out[folder.name] = sorted((h, tuple(sorted(e.flags))) for h, e in zip(hashes, live))
        return out
    finally:
        store.close()


def client(host: str, port: int) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(host, port)
    imap.login("reader", PASSWORD)
    return imap


def test_imaplib_fetches_every_message_byte_identical(served) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    imap = client(host, port)
    got: dict[str, list[str]] = {}
    for folder in archived(url):
        typ, data = imap.select(imap_quote(folder), readonly=True)
        assert typ == "OK"
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[] RFC822.SIZE)")
        bodies = [item[1] for item in data if isinstance(item, tuple)]
        got[folder] = sorted(hashlib.sha256(b).hexdigest() for b in bodies)
    imap.logout()
    assert got == {f: sorted(h for h, _ in items) for f, items in archived(url).items()}


def imap_quote(name: str) -> str:
    from imapclient import imap_utf7

    return '"' + imap_utf7.encode(name).decode("ascii") + '"'


def mbsync_pull(host: str, port: int, into: Path, user: str = "reader") -> subprocess.CompletedProcess[str]:
    into.mkdir(parents=True, exist_ok=True)
    config = into.parent / (into.name + ".mbsyncrc")
    config.write_text(
        f"IMAPAccount served\nHost {host}\nPort {port}\nUser {user}\nPass {PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore far\nAccount served\n\n"
        f"MaildirStore near\nPath {into}/\nInbox {into}/INBOX\nSubFolders Verbatim\n\n"
        "Channel pull\nFar :far:\nNear :near:\nPatterns *\nCreate Near\nSync Pull\nSyncState *\nCopyArrivalDate yes\n"
    )
    return subprocess.run(["mbsync", "-c", str(config), "-a"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(into.parent)})


MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def without_tuid(data: bytes) -> bytes:
    """mbsync adds one 'X-TUID: ...' header line to every message it copies (to find it after a crash)."""
    head, sep, body = data.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.startswith(b"X-TUID: ")]
    assert len(lines) == head.count(b"\n"), "exactly one X-TUID line expected"
    return b"\n".join(lines) + sep + body


def pulled(into: Path) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Folder -> [(sha256 of the file, system flags from its name)] of what mbsync wrote."""
    from imapclient import imap_utf7

    out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for cur in into.rglob("cur"):
        folder = imap_utf7.decode(str(cur.parent.relative_to(into)).encode("ascii"))
        items = []
        for path in [*cur.iterdir(), *(cur.parent / "new").iterdir()]:
            letters = path.name.rpartition(":2,")[2] if ":2," in path.name else ""
            items.append((hashlib.sha256(without_tuid(path.read_bytes())).hexdigest(), tuple(sorted(MAILDIR_FLAGS[c] for c in letters if c in MAILDIR_FLAGS))))
        out[folder] = sorted(items)
    return out


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (Debian's isync) not installed: bash tests/bootstrap.sh")
def test_mbsync_pulls_every_folder_byte_identical_with_flags(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    before = tree_hash(tmp_path / "a")
    result = mbsync_pull(host, port, tmp_path / "pulled")
    assert result.returncode == 0, result.stdout + result.stderr
    system = set(MAILDIR_FLAGS.values())
    # mbsync stores mail with Unix line ends and adds an X-TUID line (it does so from Dovecot too): with those two
    # undone, every file is the archive's bytes.
    want = {f: sorted((h, tuple(x for x in flags if x in system)) for h, flags in items) for f, items in archived(url, unix_lines=True).items()}
    assert pulled(tmp_path / "pulled") == want
    assert tree_hash(tmp_path / "a") == before


def test_backup_from_the_served_archive_gives_identical_hashes_and_flags(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    copy = f"maildir:{tmp_path}/copy"
    summary = backup(f"imap://reader@{host}:{port}", copy, password=PASSWORD, options=BackupOptions(no_tls=True))
    assert summary.ok and summary.new == sum(FOLDERS.values()) + 1
    assert archived(copy) == archived(url)


@pytest.fixture
def imapclient_for(served):  # type: ignore[no-untyped-def]
    from imapclient import IMAPClient

    host, port, _ = served
    clients = []

    def connect() -> IMAPClient:
        imap = IMAPClient(host, port, ssl=False, timeout=30)
        imap.normalise_times = False
        imap.login("reader", PASSWORD)
        clients.append(imap)
        return imap

    yield connect
    for imap in clients:
        try:
            imap.logout()
        except Exception:
            pass


def test_envelope_and_bodystructure_agree_with_the_email_package(imapclient_for) -> None:  # type: ignore[no-untyped-def]
    imap = imapclient_for()
    imap.select_folder("INBOX", readonly=True)
    data = imap.fetch(imap.search("ALL"), ["BODY.PEEK[]", "ENVELOPE", "BODYSTRUCTURE"])
    assert len(data) == FOLDERS["INBOX"] + 1
    for item in data.values():
        parsed = email.message_from_bytes(item[b"BODY[]"], policy=email.policy.compat32)
        envelope = item[b"ENVELOPE"]
        assert envelope.subject.decode() == parsed["Subject"]
        assert envelope.message_id == (parsed["Message-ID"].encode() if parsed["Message-ID"] else None)
        assert envelope.date == email.utils.parsedate_to_datetime(parsed["Date"])
        want_from = email.utils.getaddresses([parsed["From"]])[0][1]
        assert f"{envelope.from_[0].mailbox.decode()}@{envelope.from_[0].host.decode()}" == want_from
        want_to = [a for _, a in email.utils.getaddresses([parsed["To"]])]
        assert [f"{a.mailbox.decode()}@{a.host.decode()}" for a in envelope.to] == want_to
        structure = item[b"BODYSTRUCTURE"]
        if parsed.is_multipart():
            assert structure.is_multipart
            parts, subtype = structure[0], structure[1]
            assert subtype.decode().lower() == parsed.get_content_subtype()
            leaves = list(parsed.get_payload())
            assert [(p[0].decode().lower(), p[1].decode().lower()) for p in parts] == [
                (leaf.get_content_maintype(), leaf.get_content_subtype()) for leaf in leaves]
            # the size of each part is the size of its encoded body
            assert int(parts[1][6]) == len(leaves[1].get_payload().encode())
            assert parts[1][8][0].decode().lower() == "attachment"
        else:
            assert (structure[0].decode().lower(), structure[1].decode().lower()) == ("text", "plain")
            assert structure[6] == len(item[b"BODY[]"].split(b"\r\n\r\n", 1)[1])


def test_sections_and_partials_are_the_archived_bytes(imapclient_for) -> None:  # type: ignore[no-untyped-def]
    imap = imapclient_for()
    imap.select_folder("INBOX", readonly=True)
    uid = imap.search(["SUBJECT", "with attachment"])[0]
    items = ["BODY.PEEK[1]", "BODY.PEEK[2.MIME]", "BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]", "BODY.PEEK[TEXT]", "BODY.PEEK[]<10.20>"]
    data = imap.fetch([uid], items)[uid]
    assert data[b"BODY[1]"] == b"see the zanzibar file"
    assert data[b"BODY[2.MIME]"].startswith(b"Content-Type: application/pdf") and data[b"BODY[2.MIME]"].endswith(b"\r\n\r\n")
    assert data[b"BODY[HEADER.FIELDS (SUBJECT FROM)]"] == b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\nSubject: with attachment\r\n\r\n"
    assert data[b"BODY[TEXT]"] == MULTIPART.split(b"\r\n\r\n", 1)[1]
    assert data[b"BODY[]<10>"] == MULTIPART[10:30]


def fetch_hashes(imap, uids) -> set[str]:  # type: ignore[no-untyped-def]
    return {hashlib.sha256(d[b"BODY[]"]).hexdigest() for d in imap.fetch(uids, ["BODY.PEEK[]"]).values()} if uids else set()


def test_search_finds_what_mailbackup_search_finds(imapclient_for, served) -> None:  # type: ignore[no-untyped-def]
    _, _, url = served
    imap = imapclient_for()
    imap.select_folder("INBOX", readonly=True)

    def hits(filters: Filters) -> set[str]:
        return {hit.sha256 for hit in search(url, filters)}

    cases = [
        (["TEXT", "zanzibar"], Filters(query="zanzibar", folder="INBOX")),
        (["BODY", "note"], Filters(query="note", folder="INBOX")),
        (["FROM", "sender1"], Filters(sender="sender1", folder="INBOX")),
        (["SUBJECT", "attachment"], Filters(subject="attachment", folder="INBOX")),
        (["SENTSINCE", "3-Mar-2021"], Filters(since=datetime_utc(2021, 3, 3), folder="INBOX")),
        (["SENTBEFORE", "3-Mar-2021"], Filters(before=datetime_utc(2021, 3, 3), folder="INBOX")),
    ]
    for criteria, filters in cases:
        want = hits(filters)
        assert want, criteria  # each case finds something, so agreement means something
        assert fetch_hashes(imap, imap.search(criteria)) == want, criteria
    seen = imap.search(["SEEN"])
    assert seen and set(imap.search(["UNSEEN"])) == set(imap.search("ALL")) - set(seen)
    assert set(imap.search(["OR", "FLAGGED", "SEEN"])) >= set(seen)
    assert imap.search(["NOT", "ALL"]) == []


def datetime_utc(*parts: int):  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime(*parts, tzinfo=timezone.utc)


def test_every_write_is_refused_and_the_archive_stays_byte_identical(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    root = tmp_path / "a"
    before = tree_hash(root)
    imap = client(host, port)
    with pytest.raises(imaplib.IMAP4.readonly):
        imap.select("INBOX")  # SELECT answers [READ-ONLY]
    imap = client(host, port)
    flags_before = imap.select("INBOX", readonly=True)[0] and imap.fetch("1:*", "(FLAGS)")[1]
    imap.fetch("1:*", "(BODY[] RFC822)")  # not PEEK: would set \Seen on a writable server
    refused = [
        imap.append("INBOX", "(\\Seen)", None, message(99, "INBOX")),
        imap.store("1:*", "+FLAGS", "(\\Deleted)"),
        imap.uid("STORE", "1:*", "-FLAGS", "(\\Seen)"),
        imap.copy("1", "Sent"),
        imap.uid("COPY", "1:*", "Sent"),
        imap.xatom("MOVE", "1", "Sent"),
        imap.expunge(),
        imap.uid("EXPUNGE", "1:*"),
        imap.create("New"),
        imap.delete("Sent"),
        imap.rename("Sent", "Sent2"),
    ]
    assert [typ for typ, _ in refused] == ["NO"] * len(refused), refused
    assert imap.fetch("1:*", "(FLAGS)")[1] == flags_before
    imap.logout()
    assert tree_hash(root) == before


def test_ten_clients_at_once_fetch_everything(served) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    want = {f: sorted(h for h, _ in items) for f, items in archived(url).items()}
    results: list[object] = []

    def fetch_all() -> None:
        try:
            imap = client(host, port)
            got = {}
            for folder in want:
                imap.select(imap_quote(folder), readonly=True)
                _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[] FLAGS)")
                got[folder] = sorted(hashlib.sha256(item[1]).hexdigest() for item in data if isinstance(item, tuple))
            imap.logout()
            results.append(got)
        except Exception as exc:  # reported below, in the test's own thread
            results.append(exc)

    threads = [threading.Thread(target=fetch_all) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [want] * 10
