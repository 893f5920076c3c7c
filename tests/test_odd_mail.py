"""Odd and malformed mail goes in and comes back byte for byte: IMAP and POP3, every store, and restore."""

from __future__ import annotations

import base64
import hashlib
import random
from pathlib import Path

import pytest

from mailbackup import BackupOptions, RestoreOptions, backup, restore
from tests.archive_view import archived
from tests.corpus.tricky import tricky_messages

CORPUS = Path(__file__).parent / "corpus"
STORES = ["maildir", "mbox", "sqlite"]


def odd_messages() -> list[bytes]:
    odd = [
        b"Subject: nul\r\n\r\nbefore\x00after\r\n",
        b"\r\na body with no headers at all\r\n",
        b"no header and no blank line, just text\r\n",
        b"Subject: headers only, no body\r\nX-Empty:\r\n",
        b"Subject: =?iso-8859-1?q?caf=E9?=\r\nContent-Type: text/plain; charset=koi8-r\r\n\r\n\xf0\xd2\xc9\xd7\xc5\xd4\r\n",
        b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n--never-closed\r\nbroken MIME\r\n',
        b"Subject: " + b"x" * 3000 + b"\r\n\r\n" + b"y" * 5000 + b"\r\n",
    ]
    corpus = [p.read_bytes() for p in sorted(CORPUS.glob("mikel-mail/error_emails/*.eml"))]
    corpus += [p.read_bytes() for p in sorted(CORPUS.glob("mikel-mail/multi_charset/*.eml"))]
    return odd + corpus + [raw for name, raw in tricky_messages().items() if name != "attachment_5mb"]


def huge_message(megabytes: int = 50) -> bytes:
    payload = base64.encodebytes(random.Random(50).randbytes(megabytes * 3 // 4 << 20)).replace(b"\n", b"\r\n")
    return b"Subject: huge\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + payload


def pop3_served(dovecot, account) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Every message as Dovecot's POP3 RETR gives it (read raw: poplib drops line endings)."""
    import poplib

    from mailbackup.sources.pop3 import read_multiline

    conn = poplib.POP3("127.0.0.1", dovecot.pop3_port)
    conn.user(account.user)
    conn.pass_(account.password)
    out = []
    for number in range(1, conn.stat()[0] + 1):
        conn._putcmd(f"RETR {number}")
        conn._getresp()
        out.append(read_multiline(conn.file, 1 << 30))
    conn.quit()
    return out


def digests(raws: list[bytes]) -> list[str]:
    return sorted(hashlib.sha256(r).hexdigest() for r in raws)


def archive_url(kind: str, tmp_path: Path, tag: str) -> str:
    return {"maildir": f"maildir:{tmp_path / tag}-md", "mbox": f"mbox:{tmp_path / tag}-mb", "sqlite": str(tmp_path / f"{tag}.sqlite")}[kind]


@pytest.mark.parametrize("kind", STORES)
def test_odd_mail_round_trips_through_imap_pop3_and_restore(dovecot, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    for raw in odd_messages():
        dovecot.append(source, "INBOX", raw)
    served = [m.raw for m in dovecot.fetch(source, "INBOX")]
    assert len(served) == len(odd_messages())
    options = BackupOptions(no_tls=True, index=False)

    imap_archive = archive_url(kind, tmp_path, "imap")
    assert backup(source.url("imap"), imap_archive, password=source.password, options=options).ok
    assert digests([m.raw for m in archived(imap_archive)["INBOX"]]) == digests(served)

    pop_archive = archive_url(kind, tmp_path, "pop")
    assert backup(source.url("pop3"), pop_archive, password=source.password, options=options).ok
    # POP3 serves its own form: a NUL stays NUL (IMAP gives 0x80), a missing final newline gets one.
    assert digests([m.raw for m in archived(pop_archive)["INBOX"]]) == digests(pop3_served(dovecot, source))

    summary = restore(imap_archive, target.url("imap"), password=target.password, options=RestoreOptions(no_tls=True))
    assert summary.ok
    assert digests([m.raw for m in dovecot.fetch(target, "INBOX")]) == digests(served)


def test_a_50_mb_message_round_trips_in_every_store(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = dovecot.add_user()
    raw = huge_message()
    dovecot.seed_maildir(source, "INBOX", [(raw, "S", 1.6e9)])
    [served] = [m.raw for m in dovecot.fetch(source, "INBOX")]
    options = BackupOptions(no_tls=True, index=False)
    for kind in STORES:
        for scheme in ("imap", "pop3"):
            url = archive_url(kind, tmp_path, scheme)
            assert backup(source.url(scheme), url, password=source.password, options=options).new == 1
            [stored] = archived(url)["INBOX"]
            assert hashlib.sha256(stored.raw).digest() == hashlib.sha256(served).digest(), (kind, scheme)
    target = dovecot.add_user()
    restore(archive_url("sqlite", tmp_path, "imap"), target.url("imap"), password=target.password, options=RestoreOptions(no_tls=True))
    [back] = [m.raw for m in dovecot.fetch(target, "INBOX")]
    assert hashlib.sha256(back).digest() == hashlib.sha256(served).digest()
