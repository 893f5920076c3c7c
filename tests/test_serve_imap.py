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


def archived(url: str) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Folder -> [(sha256, flags)] of live messages, as the catalog has them."""
    store = open_store(url, mode="read")
    try:
        out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for folder in store.catalog.folders():
            out[folder.name] = sorted((e.sha256, tuple(sorted(e.flags))) for e in store.catalog.entries(folder.id) if not e.gone)
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
