"""serve --imap: real clients (mbsync, mutt, imaplib, mailbackup's own backup) read an archive, and nothing changes it."""

from __future__ import annotations

import email
import email.policy
import hashlib
import imaplib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC
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


@pytest.fixture(params=["maildir", "mbox", "sqlite", "postgresql"])
def archive(request, filled, tmp_path):  # type: ignore[no-untyped-def]
    """The filled account backed up; for PostgreSQL the tree under tmp_path/a is empty (and stays so)."""
    (tmp_path / "a").mkdir()
    if request.param == "postgresql":
        return make_archive(filled, request.getfixturevalue("pg_url"))
    urls = {"maildir": f"maildir:{tmp_path}/a", "mbox": f"mbox:{tmp_path}/a", "sqlite": f"{tmp_path}/a/archive.sqlite"}
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
    return subprocess.run(["mbsync", "-c", str(config), "-a"], capture_output=True, text=True, timeout=120, check=False,
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


def offlineimap_pull(host: str, port: int, into: Path) -> subprocess.CompletedProcess[str]:
    """One offlineimap run (-o) from the served archive into a Maildir, the remote read-only."""
    into.mkdir(parents=True, exist_ok=True)
    config = into.parent / (into.name + ".offlineimaprc")
    config.write_text(
        f"[general]\naccounts = served\nmetadata = {into.parent}/offlineimap-state\n\n"
        "[Account served]\nlocalrepository = near\nremoterepository = far\n\n"
        f"[Repository near]\ntype = Maildir\nlocalfolders = {into}\nsep = /\n\n"
        f"[Repository far]\ntype = IMAP\nremotehost = {host}\nremoteport = {port}\nremoteuser = reader\n"
        f"remotepass = {PASSWORD}\nssl = no\nstarttls = no\nreadonly = True\n"
    )
    return subprocess.run(["offlineimap", "-c", str(config), "-o", "-u", "basic"], capture_output=True, text=True,
                          timeout=180, check=False, env={**os.environ, "HOME": str(into.parent)})


@pytest.mark.skipif(shutil.which("offlineimap") is None, reason="offlineimap (Debian's offlineimap3) not installed: bash tests/bootstrap.sh")
def test_offlineimap_pulls_every_folder_byte_identical_with_flags(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, url = served
    before = tree_hash(tmp_path / "a")
    result = offlineimap_pull(host, port, tmp_path / "pulled")
    assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    system = set(MAILDIR_FLAGS.values())
    got: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    from imapclient import imap_utf7

    for cur in (tmp_path / "pulled").rglob("cur"):
        folder = imap_utf7.decode(str(cur.parent.relative_to(tmp_path / "pulled")).encode("ascii"))
        items = []
        for path in [*cur.iterdir(), *(cur.parent / "new").iterdir()]:
            letters = path.name.rpartition(":2,")[2] if ":2," in path.name else ""
            items.append((hashlib.sha256(path.read_bytes()).hexdigest(), tuple(sorted(MAILDIR_FLAGS[c] for c in letters if c in MAILDIR_FLAGS))))
        got[folder] = sorted(items)
    # offlineimap keeps a downloaded message's bytes but for line ends (CRLF -> LF, as its docs say);
    # it adds its X-OfflineIMAP header only to messages it uploads, and here it uploads none.
    want = {f: sorted((h, tuple(x for x in flags if x in system)) for h, flags in items) for f, items in archived(url, unix_lines=True).items()}
    assert got == want
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
        except Exception:  # noqa: BLE001, S110  (a test that failed may have left it logged out)
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

    if url.startswith("postgresql"):  # no search index there: TEXT matches the bytes
        assert fetch_hashes(imap, imap.search(["TEXT", "zanzibar"])) == {hashlib.sha256(MULTIPART).hexdigest()}
        pytest.skip("mailbackup search needs a SQLite catalog; SEARCH matched the bytes")

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
    from datetime import datetime

    return datetime(*parts, tzinfo=UTC)


def test_every_write_is_refused_and_the_archive_stays_byte_identical(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, _ = served
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
        except Exception as exc:  # noqa: BLE001  (reported below, in the test's own thread)
            results.append(exc)

    threads = [threading.Thread(target=fetch_all) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [want] * 10


class Tmux:
    """A tmux server of our own (its own socket), one window running a program."""

    def __init__(self, directory: Path, command: list[str]) -> None:
        self.socket = str(directory / "tmux.sock")
        self.run("new-session", "-d", "-x", "160", "-y", "45", "-s", "t", *command)

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30, check=True).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30, check=False)


@pytest.mark.skipif(shutil.which("mutt") is None or shutil.which("tmux") is None, reason="mutt and tmux: bash tests/bootstrap.sh")
def test_mutt_opens_the_served_archive_lists_folders_and_shows_a_message(served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port, _ = served
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set folder="imap://reader@{host}:{port}/"\nset spoolfile="+INBOX"\nset imap_pass="{PASSWORD}"\n'
        "set ssl_starttls=no\nset ssl_force_tls=no\nset sort=date\nset mail_check=600\nset timeout=600\n"
        "set header_cache=\nset message_cachedir=\nset move=no\nset confirmappend=no\nset charset=utf-8\n"
        f"set tmpdir={tmp_path}\n"
    )
    before = tree_hash(tmp_path / "a")
    tmux = Tmux(tmp_path, ["env", "TERM=xterm", "LANG=C.UTF-8", f"HOME={tmp_path}", "mutt", "-n", "-F", str(rc)])
    try:
        index = tmux.wait_for("with attachment")
        assert "note 0 in INBOX" in index
        tmux.keys("/", "attachment", "Enter")  # find the message in the index, then open it
        tmux.keys("Enter")
        tmux.wait_for("see the zanzibar file")
        tmux.keys("q")
        tmux.wait_for("note 0 in INBOX")
        tmux.keys("c", "?")  # change folder: the server's folder list
        listing = tmux.wait_for("Sent")
        assert "Archive" in listing and "INBOX" in listing and "Über" in listing
        tmux.keys("q", "q")
    finally:
        tmux.close()
    assert tree_hash(tmp_path / "a") == before


def serve(url: str, **settings: object):  # type: ignore[no-untyped-def]
    return start_imap(("127.0.0.1", 0), ServeSettings(archive=url, user="reader", password=PASSWORD, **settings))  # type: ignore[arg-type]


def test_gone_messages_are_hidden_unless_asked_for_then_in_gone_folders(dovecot, filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(filled, f"maildir:{tmp_path}/a")
    with dovecot.client(filled) as imap:
        imap.select_folder("INBOX")
        first = imap.search(["SUBJECT", "note 0 in INBOX"])
        imap.delete_messages(first)
        imap.expunge()
    backup(filled.url("imap"), url, password=filled.password, options=BackupOptions(no_tls=True))
    gone_hash = next(hashlib.sha256(b).hexdigest() for b in [message(0, "INBOX")])
    for include_gone in (False, True):
        server = serve(url, include_gone=include_gone)
        try:
            imap = client("127.0.0.1", server.port)
            names = [line.decode().rsplit(" ", 1)[1].strip('"') for line in imap.list()[1]]
            imap.select("INBOX", readonly=True)
            inbox = {hashlib.sha256(i[1]).hexdigest() for i in imap.fetch("1:*", "(BODY.PEEK[])")[1] if isinstance(i, tuple)}
            assert gone_hash not in inbox and len(inbox) == FOLDERS["INBOX"]
            if include_gone:
                assert "Gone/INBOX" in names
                imap.select('"Gone/INBOX"', readonly=True)
                gone = [hashlib.sha256(i[1]).hexdigest() for i in imap.fetch("1:*", "(BODY.PEEK[])")[1] if isinstance(i, tuple)]
                assert gone == [gone_hash]
            else:
                assert not any(n.startswith("Gone") for n in names)
            imap.logout()
        finally:
            server.shutdown()
            server.server_close()


def test_pop3_archive_without_uids_gets_stable_uids_from_entry_ids(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"maildir:{tmp_path}/pop"
    backup(filled.url("pop3"), url, password=filled.password, options=BackupOptions(no_tls=True))
    store = open_store(url, mode="read")
    try:
        folder = store.catalog.folders()[0]
        ids = sorted(e.id for e in store.catalog.entries(folder.id))
        assert all(e.uid is None for e in store.catalog.entries(folder.id))
    finally:
        store.close()
    seen = []
    for _ in range(2):  # a restarted server gives the same UIDVALIDITY and UIDs
        server = serve(url)
        try:
            imap = client("127.0.0.1", server.port)
            imap.select("INBOX", readonly=True)
            validity = imap.response("UIDVALIDITY")[1][0]
            uids = [int(u) for u in imap.uid("SEARCH", "ALL")[1][0].split()]
            imap.logout()
        finally:
            server.shutdown()
            server.server_close()
        seen.append((validity, uids))
    assert seen[0] == seen[1] and seen[0][1] == ids


def tls_files(dovecot) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {"tls_cert": str(dovecot.cert_path), "tls_key": str(dovecot.cert_path.parent / "key.pem")}


def test_starttls_and_implicit_tls_with_the_given_certificate(dovecot, filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ssl

    url = make_archive(filled, f"maildir:{tmp_path}/a")
    context = ssl.create_default_context(cafile=str(dovecot.cert_path))
    server = serve(url, **tls_files(dovecot))
    try:
        imap = imaplib.IMAP4("127.0.0.1", server.port)
        assert "STARTTLS" in imap.capabilities
        imap.starttls(context)
        assert "STARTTLS" not in imap.capabilities
        imap.login("reader", PASSWORD)
        assert imap.select("INBOX", readonly=True)[1] == [str(FOLDERS["INBOX"] + 1).encode()]
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()
    server = serve(url, implicit_tls=True, **tls_files(dovecot))
    try:
        imap = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=context)
        imap.login("reader", PASSWORD)
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()


def test_login_and_authenticate_plain_check_user_and_password(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(filled, f"maildir:{tmp_path}/a")
    server = serve(url)
    try:
        for user, password in (("reader", "wrong"), ("other", PASSWORD)):
            imap = imaplib.IMAP4("127.0.0.1", server.port)
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(user, password)
            imap.send(b"x1 EXAMINE INBOX\r\n")
            assert imap.readline() == b"x1 NO log in first\r\n"
            imap.logout()
        imap = imaplib.IMAP4("127.0.0.1", server.port)
        typ, _ = imap.authenticate("PLAIN", lambda _: f"\0reader\0{PASSWORD}".encode())
        assert typ == "OK" and imap.select("INBOX", readonly=True)[0] == "OK"
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_non_loopback_address_without_tls(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(filled, f"maildir:{tmp_path}/a")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    result = CliRunner().invoke(main, ["serve", url, "--imap", "0.0.0.0:0", "--password-file", str(tmp_path / "pw")])
    assert result.exit_code != 0 and "refusing to serve 0.0.0.0 without TLS" in result.output


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_serve_command_serves_until_interrupted(filled, tmp_path, stop: str) -> None:  # type: ignore[no-untyped-def]
    import signal
    import sys

    from servers.dovecot import free_port

    url = make_archive(filled, f"maildir:{tmp_path}/a")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbackup", "serve", url, "--imap", f"127.0.0.1:{port}", "--password-file", str(tmp_path / "pw")],
        stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal's foreground job gets it: a suite started in the background inherits it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert f"at 127.0.0.1:{port} as user {filled.user}" in line  # the archive's account user name by default
        imap = imaplib.IMAP4("127.0.0.1", port)
        imap.login(filled.user, PASSWORD)
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        imap.logout()
    finally:
        process.send_signal(getattr(signal, stop))
        assert process.wait(20) == 0


# pure functions over bytes: no server


def test_tokenize_reads_quoted_strings_literals_lists_and_sections() -> None:
    from mailbackup.serve.wire import parse_command

    command = parse_command(b'a1 UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (From "To")]<0.10> FLAGS)\r\n')
    assert (command.tag, command.name) == ("a1", "UID FETCH")
    assert command.args == ["1:*", ["UID", 'BODY.PEEK[HEADER.FIELDS (From "To")]<0.10>', "FLAGS"]]
    command = parse_command(b'a2 LOGIN {5}\r\nr"e d "p\\\\w"\r\n')
    assert command.args == [b'r"e d', b"p\\w"]


def test_sequence_sets_take_star_as_the_largest_and_any_order() -> None:
    from mailbackup.serve.view import Snapshot
    from mailbackup.serve.wire import sequence_set

    assert sequence_set("3:1,7,9:*", 12) == [(1, 3), (7, 7), (9, 12)]
    snap = Snapshot(1, [2, 5, 9], [])  # type: ignore[arg-type]
    assert list(snap.by_uid_ranges(sequence_set("20:*", 9))) == [2]  # '*' is the last UID even below 20
    assert list(snap.by_uid_ranges(sequence_set("1:5,5", 9))) == [0, 1]  # each message once
    assert list(snap.by_seq_ranges(sequence_set("2:*", 3))) == [1, 2]


NESTED = (
    b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n"
    b"--o\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
    b"--o\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n"
    b"--i\r\nContent-Type: text/plain\r\n\r\ninner plain\r\n--i\r\nContent-Type: text/html\r\n\r\n<p>inner</p>\r\n--i--\r\n"
    b"\r\n--o--\r\n"
)


def test_sections_reach_into_an_attached_message() -> None:
    from mailbackup.serve.parts import bodystructure, parse, section

    tree = parse(NESTED)
    assert section(tree, "1") == b"first"
    assert section(tree, "2.HEADER").startswith(b"Subject: inner\r\n")
    assert section(tree, "2.1") == b"inner plain"
    assert section(tree, "2.2") == b"<p>inner</p>"
    assert section(tree, "2.MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert section(tree, "3") is None
    structure = bodystructure(tree)
    assert structure.startswith(b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 5 0')
    assert b'"message" "rfc822"' in structure and b'"alternative"' in structure and structure.endswith(b' "mixed" ("boundary" "o") NIL NIL NIL)')


def test_append_is_refused_before_its_message_is_sent_and_big_commands_before_login(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(filled, f"maildir:{tmp_path}/a")
    server = serve(url)
    try:
        imap = imaplib.IMAP4("127.0.0.1", server.port)
        imap.send(b"x1 LOGIN {100000}\r\n")
        assert imap.readline() == b"* BYE command too large\r\n"
        imap = client("127.0.0.1", server.port)
        imap.send(b"x2 APPEND INBOX (\\Seen) {5000000}\r\n")
        assert imap.readline().startswith(b"x2 NO [CANNOT] the archive is read-only")
        assert imap.noop()[0] == "OK"  # still in step
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()


def test_list_shows_special_use_and_parents_and_idle_waits_for_done(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    (tmp_path / "a").mkdir()
    url = make_archive(filled, f"{tmp_path}/a/archive.sqlite")
    with sqlite3.connect(f"{tmp_path}/a/archive.sqlite") as db:  # as if the server had said Sent is \Sent
        db.execute("UPDATE folders SET attributes = '\\HasNoChildren \\Sent' WHERE name = 'Sent'")
    server = serve(url)
    try:
        imap = client("127.0.0.1", server.port)
        listed = {line.decode().rsplit(" ", 1)[1].strip('"'): line.decode().split(")")[0] for line in imap.list()[1]}
        assert "\\Sent" in listed["Sent"] and "\\HasNoChildren" in listed["Sent"]
        assert "\\Noselect" in listed["Archive"] and "\\HasChildren" in listed["Archive"]
        assert listed["&ANw-ber"] == "(\\HasNoChildren"  # modified UTF-7 on the wire
        typ, _ = imap._simple_command("LIST", "(SPECIAL-USE)", '""', '"*"')
        assert typ == "OK" and [line.decode() for line in imap.untagged_responses.pop("LIST")] == ['(\\Sent \\HasNoChildren) "/" "Sent"']
        imap.send(b"x1 IDLE\r\n")
        assert imap.readline().startswith(b"+ ")
        imap.send(b"DONE\r\n")
        assert imap.readline() == b"x1 OK IDLE terminated\r\n"
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()


# encrypted archives: unlocked once, before anything listens; worker threads never prompt


def served_hashes(host: str, port: int, folders: list[str]) -> dict[str, list[str]]:
    """Folder -> sorted SHA-256s of every message as imaplib fetches it."""
    imap = client(host, port)
    got = {}
    for folder in folders:
        assert imap.select(imap_quote(folder), readonly=True)[0] == "OK"
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        got[folder] = sorted(hashlib.sha256(item[1]).hexdigest() for item in data if isinstance(item, tuple))
    imap.logout()
    return got


def plain_hashes(url: str) -> dict[str, list[str]]:
    return {folder: sorted(h for h, _ in items) for folder, items in archived(url).items()}


def assert_served_as(url: str, ring, plain: str) -> None:  # type: ignore[no-untyped-def]
    """Serve url over IMAP with the keys in ring and check every message against the plain archive."""
    server = start_imap(("127.0.0.1", 0), ServeSettings(archive=url, user="reader", password=PASSWORD), ring)
    try:
        expected = plain_hashes(plain)
        assert served_hashes("127.0.0.1", server.port, list(expected)) == expected
    finally:
        server.shutdown()
        server.server_close()


def encrypted_archive(account, tmp_path: Path, source) -> str:  # type: ignore[no-untyped-def]
    from mailbackup import keys

    url = str(tmp_path / "sealed.sqlite")
    with keys.using(source):
        make_archive(account, url)
    return url


def test_encrypted_archive_is_served_over_imap_and_web_byte_identical_with_one_prompt(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    from mailbackup import keys
    from mailbackup.credentials import Login

    pytest.importorskip("starlette")
    from mailbackup.web import WebServer

    plain = make_archive(filled, str(tmp_path / "plain.sqlite"))
    writer = keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=lambda: "sealed pass",
                            protection=keys.Protection(encrypt=True))
    url = encrypted_archive(filled, tmp_path, writer)
    assert b"Subject: message 0" not in (tmp_path / "sealed.sqlite").read_bytes()
    prompts: list[str] = []

    def prompt() -> str:
        prompts.append(threading.current_thread().name)
        return "sealed pass"

    ring = keys.KeyRing(keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=prompt))
    server = start_imap(("127.0.0.1", 0), ServeSettings(archive=url, user="reader", password=PASSWORD), ring)
    web = WebServer(url, "127.0.0.1:0", key_ring=ring)
    web.start()
    try:
        assert prompts == [threading.current_thread().name]  # asked once, here, before a client could connect
        expected = plain_hashes(plain)
        # several clients, each in its own server thread with no key context of its own
        results: list[dict[str, list[str]]] = []
        threads = [threading.Thread(target=lambda: results.append(served_hashes("127.0.0.1", server.port, list(expected))))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [expected] * 3
        # the web viewer: every .eml download, from uvicorn's worker threads
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        opener.open(web.url).read()
        with keys.using(ring):
            store = open_store(url)
            ids = {folder.name: [e.id for e in store.catalog.entries(folder.id) if not e.gone] for folder in store.catalog.folders()}
            store.close()
        base = f"http://127.0.0.1:{web.port}"
        downloaded = {
            folder: sorted(hashlib.sha256(opener.open(f"{base}/m/0/{i}/eml").read()).hexdigest() for i in found)
            for folder, found in ids.items()
        }
        assert downloaded == expected
        with opener.open(f"{base}/search?q=message") as response:  # search reopens the archive in a worker thread
            assert response.status == 200
        assert len(prompts) == 1
    finally:
        web.stop()
        server.shutdown()
        server.server_close()


def test_encrypted_postgresql_archive_is_served_byte_identical(filled, tmp_path, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from mailbackup import keys
    from mailbackup.catalog import engine_url
    from mailbackup.credentials import Login

    plain = make_archive(filled, str(tmp_path / "plain.sqlite"))
    writer = keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=lambda: "pg pass",
                            protection=keys.Protection(encrypt=True))
    with keys.using(writer):
        make_archive(filled, pg_url)
    engine = sa.create_engine(engine_url(pg_url))
    with engine.connect() as conn:  # sealed in the database, not only on the way out
        raws = [bytes(raw) for (raw,) in conn.execute(sa.text("SELECT raw FROM blobs"))]
    engine.dispose()
    assert raws and not any(b"Subject: message" in raw for raw in raws)
    ring = keys.KeyRing(keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=lambda: "pg pass"))
    assert_served_as(pg_url, ring, plain)


def test_wrong_passphrase_is_one_line_exit_3_before_anything_listens(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import sys

    from servers.dovecot import free_port

    from mailbackup import keys
    from mailbackup.credentials import Login
    from mailbackup.errors import WrongPassphrase

    url = encrypted_archive(filled, tmp_path, keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"),
                                                              prompt=lambda: "right", protection=keys.Protection(encrypt=True)))
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "wrong").write_text("not it\n")
    imap_port, web_port = free_port(), free_port()
    result = subprocess.run(
        [sys.executable, "-m", "mailbackup", "serve", url, "--imap", f"127.0.0.1:{imap_port}", "--web", f"127.0.0.1:{web_port}",
         "--password-file", str(tmp_path / "pw"), "--passphrase-file", str(tmp_path / "wrong")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 3
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and "wrong passphrase" in result.stderr
    # the library: nothing was bound when the passphrase failed
    ring = keys.KeyRing(keys.KeySource(passphrase=Login(password_file=str(tmp_path / "wrong"))))
    with pytest.raises(WrongPassphrase):
        start_imap(("127.0.0.1", imap_port), ServeSettings(archive=url, user="reader", password=PASSWORD), ring)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", imap_port)) != 0


def test_public_key_archive_is_served_only_with_its_identity_file(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys

    from mailbackup import keys
    from mailbackup.credentials import Login
    from mailbackup.errors import ArchiveKeyError

    pyrage = pytest.importorskip("pyrage")
    identity = pyrage.x25519.Identity.generate()
    (tmp_path / "id.txt").write_text(str(identity) + "\n")
    plain = make_archive(filled, str(tmp_path / "plain.sqlite"))
    writer = keys.KeySource(passphrase=Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=lambda: "append only",
                            protection=keys.Protection(encrypt=True, recipients=(str(identity.to_public()),)))
    url = encrypted_archive(filled, tmp_path, writer)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "append").write_text("append only\n")
    # the backup machine's append passphrase does not read: one line, exit 3
    result = subprocess.run(
        [sys.executable, "-m", "mailbackup", "serve", url, "--imap", "127.0.0.1:0", "--password-file", str(tmp_path / "pw"),
         "--passphrase-file", str(tmp_path / "append")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1 and "--identity-file" in result.stderr
    with pytest.raises(ArchiveKeyError):
        start_imap(("127.0.0.1", 0), ServeSettings(archive=url, user="reader", password=PASSWORD), keys.KeyRing(keys.KeySource()))
    assert_served_as(url, keys.KeyRing(keys.KeySource(identity_file=str(tmp_path / "id.txt"))), plain)


THUNDERBIRD_FIELDS = "From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To"


def test_what_thunderbird_relies_on_answers_cleanly(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Thunderbird is a GUI and is not automated here: its opening commands, sent with imaplib."""
    from mailbackup.serve import parts as mime_parts

    url = make_archive(filled, f"maildir:{tmp_path}/a")
    server = serve(url)
    try:
        imap = imaplib.IMAP4("127.0.0.1", server.port)
        capabilities = set(imap.capabilities)
        assert "CONDSTORE" not in capabilities and "QRESYNC" not in capabilities  # not implemented, so not offered
        assert "XLIST" not in capabilities
        typ, data = imap.xatom("ID", '("name" "Thunderbird" "version" "115.0")')
        assert typ == "OK" and imap.untagged_responses.pop("ID")[0].startswith(b'("name" "mailbackup serve"')
        imap.login("reader", PASSWORD)
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            imap.xatom("XLIST", '""', '"*"')  # refused cleanly: the connection carries on
        assert imap.noop()[0] == "OK"
        typ, _ = imap._simple_command("SELECT", "INBOX")  # as Thunderbird sends it (imaplib's select() wants EXAMINE here)
        assert typ == "OK" and "READ-ONLY" in imap.untagged_responses
        imap.state, imap.is_readonly = "SELECTED", True
        typ, data = imap.uid("FETCH", "1:*", f"(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({THUNDERBIRD_FIELDS})])")
        assert typ == "OK"
        store = open_store(url)
        try:
            folder = store.catalog.folder("INBOX")
            assert folder is not None
            by_uid = {e.uid: e for e in store.catalog.entries(folder.id) if not e.gone}
            wanted = {name.lower() for name in THUNDERBIRD_FIELDS.split()}
            answers = [item for item in data if isinstance(item, tuple)]
            assert len(answers) == len(by_uid)
            for head, fields in answers:
                uid = int(head.split(b"UID ")[1].split()[0])
                raw = store.get(by_uid[uid].location)
                assert b"RFC822.SIZE %d" % len(raw) in head
                assert fields == mime_parts.header_fields(mime_parts.split_header(raw)[0], wanted, True)
                assert fields.startswith(b"From: ") or fields.startswith(b"To: ") or b"Subject: " in fields
            # Thunderbird reads a message body in 10 KiB pieces with BODY[]<offset.length>
            uid = next(iter(by_uid))
            typ, data = imap.uid("FETCH", str(uid), "(UID RFC822.SIZE BODY[]<0.10240>)")
            assert typ == "OK" and data[0][1] == store.get(by_uid[uid].location)[:10240]  # type: ignore[index]
        finally:
            store.close()
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()


def test_a_damaged_or_missing_message_costs_only_itself_in_a_batched_fetch(filled, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    url = make_archive(filled, str(tmp_path / "a.sqlite"))
    expected = plain_hashes(url)["INBOX"]
    store = open_store(url)
    folder = store.catalog.folder("INBOX")
    assert folder is not None
    entries = sorted((e for e in store.catalog.entries(folder.id) if not e.gone), key=lambda e: e.uid or 0)
    store.close()
    damaged, missing = entries[1], entries[4]
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("UPDATE blobs SET raw = CAST(raw || X'20' AS BLOB) WHERE sha256 = ?", (damaged.sha256,))
        db.execute("DELETE FROM blobs WHERE sha256 = ?", (missing.sha256,))
    server = serve(url)
    try:
        imap = client("127.0.0.1", server.port)
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "NO" and re.search(rb"(missing|does not match).*\(and 1 more\)", data[0]), data  # type: ignore[arg-type]
        served = sorted(hashlib.sha256(item[1]).hexdigest() for item in imap.untagged_responses.pop("FETCH", []) if isinstance(item, tuple))
        assert served == sorted(h for h in expected if h not in (damaged.sha256, missing.sha256))
        imap.logout()
    finally:
        server.shutdown()
        server.server_close()
