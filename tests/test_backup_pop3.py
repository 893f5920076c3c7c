"""POP3 backup against Dovecot's POP3 service: exact bytes, UIDL tracking, safe deletion."""

from __future__ import annotations

import io
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from mailbackup import BackupOptions, backup
from mailbackup.catalog import Catalog
from mailbackup.errors import ConnectionLost, ServerError, StoreError, TLSError
from mailbackup.sources import pop3 as pop3_source
from mailbackup.sources.pop3 import message_date, read_multiline
from tests.archive_view import archive_url, archived
from tests.corpus.tricky import tricky_messages
from tests.fakes import FakePop3
from tests.proxy import CutProxy

STORES = ["maildir", "mbox", "sqlite"]


def pop_backup(account, url: str, port: int | None = None, **options):  # type: ignore[no-untyped-def]
    source = account.url("pop3") if port is None else f"pop3://{account.user}@127.0.0.1:{port}"
    return backup(source, url, password=account.password, options=BackupOptions(no_tls=True, **options))


def as_pop3_serves(raw: bytes) -> bytes:
    """POP3 cannot end a message without a newline (tests/corpus/NOTES.md)."""
    return raw if raw.endswith(b"\n") else raw + b"\r\n"


def on_server(dovecot, account) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [as_pop3_serves(m.raw) for m in dovecot.fetch(account, "INBOX")]


def seed(dovecot, account, count: int, size: int = 2000) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        dovecot.append(account, "INBOX", b"Subject: %d\r\nMessage-ID: <%d@pop>\r\n\r\n%s\r\n.\r\n..dots\r\n" % (i, i, b"y" * size))


@pytest.mark.parametrize("kind", STORES)
def test_pop3_archive_is_byte_identical(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    for raw in tricky_messages().values():
        dovecot.append(account, "INBOX", raw)
    url = archive_url(kind, tmp_path)
    summary = pop_backup(account, url)
    assert summary.ok and summary.new == len(tricky_messages())
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(on_server(dovecot, account))
    assert pop_backup(account, url).new == 0
    assert len(on_server(dovecot, account)) == len(tricky_messages())  # left on the server


def test_one_new_message_is_one_retr(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 3)
    url = archive_url("sqlite", tmp_path)
    assert pop_backup(account, url).new == 3
    seed(dovecot, account, 1)
    assert pop_backup(account, url).new == 1
    assert len(archived(url)["INBOX"]) == 4


def test_delete_removes_exactly_what_was_archived(dovecot, account, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 6)
    original = pop3_source.Pop3Source.retrieve_batch

    def refuse_third(self, batch):  # type: ignore[no-untyped-def]
        return [(m, pop3_source.ServerError("RETR refused") if m.number == 3 else raw) for m, raw in original(self, batch)]

    monkeypatch.setattr(pop3_source.Pop3Source, "retrieve_batch", refuse_third)
    url = archive_url("maildir", tmp_path)
    summary = pop_backup(account, url, delete=True)
    assert not summary.ok and summary.new == 5 and summary.folders[0].deleted == 5
    left = on_server(dovecot, account)
    assert len(left) == 1 and left[0].startswith(b"Subject: 2\r\n")
    monkeypatch.undo()
    assert pop_backup(account, url, delete=True).new == 1
    assert on_server(dovecot, account) == []
    assert len(archived(url, include_gone=True)["INBOX"]) == 6  # kept, and marked gone from the server


def test_failure_between_write_and_commit_deletes_nothing(dovecot, account, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 9)
    original = Catalog.add
    calls = []

    def fail_second(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise StoreError("injected failure after the write, before the commit")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Catalog, "add", fail_second)
    url = archive_url("maildir", tmp_path)
    with pytest.raises(StoreError):
        pop_backup(account, url, delete=True, batch_messages=3)
    assert len(on_server(dovecot, account)) == 9  # no QUIT, so the first batch's DELEs never happened
    monkeypatch.undo()
    summary = pop_backup(account, url, delete=True, batch_messages=3)
    assert summary.ok and summary.new == 6
    assert on_server(dovecot, account) == []
    view = archived(url, include_gone=True)["INBOX"]
    assert len(view) == len({m.raw for m in view}) == 9
    assert len(os.listdir(tmp_path / "md" / "INBOX" / "cur")) == 9  # the orphaned batch was adopted


@pytest.mark.parametrize("kind", STORES)
def test_connection_cut_mid_retr_stores_no_partial_message(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 10, size=10000)
    url = archive_url(kind, tmp_path)
    with CutProxy(dovecot.pop3_port, cut_after=55000) as proxy:
        with pytest.raises(ConnectionLost):
            pop_backup(account, url, port=proxy.port, delete=True, batch_messages=2, retries=0)
        assert proxy.cuts == 1
        assert len(on_server(dovecot, account)) == 10
        partial = archived(url)["INBOX"]
        served = on_server(dovecot, account)
        assert 0 < len(partial) < 10 and all(m.raw in served for m in partial)
        if kind == "maildir":
            assert len(os.listdir(tmp_path / "md" / "INBOX" / "cur")) == len(partial)
        pop_backup(account, url, port=proxy.port, delete=True)
    view = archived(url, include_gone=True)["INBOX"]
    assert sorted(m.raw for m in view) == sorted(served)
    assert on_server(dovecot, account) == []


def test_delete_older_than_keeps_recent_mail(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 4)
    url = archive_url("sqlite", tmp_path)
    summary = pop_backup(account, url, delete_older_than=7)
    assert summary.new == 4 and summary.folders[0].deleted == 0
    # Pretend two of them were first downloaded a month ago.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    month_ago = (datetime.now(timezone.utc) - timedelta(days=30)).isoformat()
    with engine.begin() as conn:
        conn.execute(sa.text("update messages set fetched_at = :t where id <= 2"), {"t": month_ago})
    engine.dispose()
    summary = pop_backup(account, url, delete_older_than=7)
    assert summary.new == 0 and summary.folders[0].deleted == 2
    assert len(on_server(dovecot, account)) == 2
    assert len(archived(url)["INBOX"]) == 4


def test_pop3_and_imap_store_shared_bytes_once(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 5)
    url = archive_url("sqlite", tmp_path)
    backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    pop_backup(account, url, into="INBOX")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select count(*) from blobs")) == 5
        assert conn.scalar(sa.text("select count(*) from messages")) == 10
    engine.dispose()


def test_pop3s_and_stls_verify_the_certificate(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 1)
    for scheme in ("pop3s", "pop3"):
        summary = backup(account.url(scheme), str(tmp_path / f"{scheme}.db"), password=account.password, options=BackupOptions(ca_file=str(dovecot.cert_path)))
        assert summary.new == 1
        with pytest.raises(TLSError, match="certificate"):
            backup(account.url(scheme), str(tmp_path / f"x{scheme}.db"), password=account.password)


def test_missing_stls_stops_before_credentials(tmp_path: Path) -> None:
    with FakePop3([b"Subject: x\r\n\r\ny\r\n"]) as fake:
        with pytest.raises(TLSError, match="STLS"):
            backup(fake.url(), str(tmp_path / "a.db"), password="secret")
        assert "USER" not in fake.commands and "PASS" not in fake.commands


def test_server_without_uidl_uses_header_hash_fallback(tmp_path: Path) -> None:
    messages = [b"Subject: a\r\n\r\n.hidden dot\r\n", b"Subject: b\r\n\r\nbody\r\n"]
    with FakePop3(messages) as fake:
        url = str(tmp_path / "a.db")
        summary = backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True))
        assert summary.new == 2
        assert any("UIDL" in note for note in summary.as_dict()["notes"])  # type: ignore[union-attr]
        assert backup(fake.url(), url, password="x", options=BackupOptions(no_tls=True)).new == 0
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(messages)


def wire(data: bytes, buffer_size: int) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data), buffer_size=buffer_size)


def test_read_multiline_undoes_dot_stuffing_and_keeps_line_endings() -> None:
    stream = wire(b"Subject: x\r\n\r\n..\r\n..leading\nxxxxxxxxxx\r\n.\r\n+OK next", 7)
    assert read_multiline(stream, 1000) == b"Subject: x\r\n\r\n.\r\n.leading\nxxxxxxxxxx\r\n"
    assert stream.read() == b"+OK next"  # a pipelined reply behind it is left alone
    assert read_multiline(wire(b".\r\n", 1), 10) == b""
    with pytest.raises(ConnectionLost):
        read_multiline(wire(b"a\r\nb", 4), 1000)
    with pytest.raises(ServerError):
        read_multiline(wire(b"x" * 5000 + b"\r\n.\r\n", 64), 1000)


@given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\n", b"From ", b".\r\n"]), max_size=40), st.integers(1, 20))
def test_read_multiline_reverses_dot_stuffing(pieces: list[bytes], buffer_size: int) -> None:
    body = b"".join(pieces)
    if body and not body.endswith(b"\n"):
        body += b"\r\n"  # POP3 cannot carry a body without a final newline
    stuffed = re.sub(rb"(?m)^\.", b"..", body)
    assert read_multiline(wire(stuffed + b".\r\n+OK", buffer_size), 10**6) == body


def test_message_date_prefers_newest_received_then_date() -> None:
    raw = (
        b"Received: from a by b; Tue, 02 Jan 2024 10:00:00 +0100\r\n"
        b"Received: from c by d; Mon, 01 Jan 2024 09:00:00 +0000\r\n"
        b"Date: Sun, 31 Dec 2023 08:00:00 -0500\r\n\r\nbody\r\n"
    )
    when, how = message_date(raw)
    assert how == "received" and when == datetime(2024, 1, 2, 10, tzinfo=timezone(timedelta(hours=1)))
    when, how = message_date(b"Date: Sun, 31 Dec 2023 08:00:00 -0500\r\n\r\nbody")
    assert how == "date" and when is not None and when.utcoffset() == timedelta(hours=-5)
    assert message_date(b"Subject: none\r\n\r\n") == (None, "download")


def test_a_dropped_line_is_retried_within_the_run(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 12, size=10000)
    url = archive_url("maildir", tmp_path)
    with CutProxy(dovecot.pop3_port, cut_after=60000) as proxy:
        summary = pop_backup(account, url, port=proxy.port, delete=True, batch_messages=3, retry_delay=0.01)
        assert proxy.cuts == 1
    assert summary.ok and summary.new == 12
    assert summary.folders[0].deleted == 12  # the DELEs of the cut attempt never counted: no QUIT
    assert on_server(dovecot, account) == []
    assert len(archived(url, include_gone=True)["INBOX"]) == 12
