"""search: decoded bodies (base64, Latin-1, HTML) are found, filters narrow, reindex catches up."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import BackupOptions, backup, mime
from mailbackup import search as search_module
from mailbackup.cli import main
from mailbackup.errors import UsageError
from mailbackup.mime import document
from mailbackup.search import Filters, reindex, search

LATIN1_B64 = (
    b"From: =?iso-8859-1?q?J=F6rg_M=FCller?= <joerg@example.org>\r\n"
    b"To: anna@example.net\r\n"
    b"Subject: Angebot\r\n"
    b"Date: Tue, 02 Mar 2021 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + base64.encodebytes("Die Größenordnung ist Schlüsselwörterbuch.\n".encode("latin-1")).replace(b"\n", b"\r\n")
    + b"--b1\r\n"
    b"Content-Type: application/octet-stream; name=secret.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + base64.encodebytes(b"attachmentonlyword").replace(b"\n", b"\r\n")
    + b"--b1--\r\n"
)

HTML_ONLY = (
    b"From: Bob <bob@example.com>\r\n"
    b"To: carol@example.com\r\n"
    b"Subject: Newsletter\r\n"
    b"Date: Mon, 10 Jan 2022 08:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"<html><head><style>.hiddenstyle{}</style></head><body><p>Visit <b>Zanzibar</b> =\r\n"
    b"&amp; more &eacute;t=C3=A9</p></body></html>\r\n"
)

PLAIN = b"From: carol@example.com\r\nTo: bob@example.com\r\nSubject: lunch plans\r\nDate: Wed, 05 May 2021 12:00:00 +0000\r\n\r\nsee you at noon\r\n"


def test_document_decodes_base64_latin1_and_reduces_html() -> None:
    doc = document(LATIN1_B64, "x", None)
    assert "Schlüsselwörterbuch" in doc.body and "attachmentonlyword" not in doc.body
    assert doc.sender == "Jörg Müller <joerg@example.org>"
    assert doc.sent_at == "2021-03-02T09:00:00+00:00"
    html = document(HTML_ONLY, "y", None)
    assert "Zanzibar & more été" in html.body
    assert "<b>" not in html.body and "hiddenstyle" not in html.body


def test_body_text_is_capped() -> None:
    raw = b"Subject: big\r\n\r\n" + b"word " * 100_000
    assert len(document(raw, "z", None).body) == mime.BODY_CAP


@pytest.fixture
def archive(dovecot, account, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", LATIN1_B64, (), datetime(2021, 3, 2, 9, tzinfo=timezone.utc))
    dovecot.append(account, "INBOX", HTML_ONLY)
    dovecot.append(account, "Archive", HTML_ONLY)  # the same bytes twice: indexed once, two hits
    dovecot.append(account, "Sent", PLAIN)
    url = f"maildir:{tmp_path / 'md'}"
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).new == 4
    return url


def hits(url: str, **filters: object) -> list[tuple[str, str]]:
    return sorted((h.folder, h.subject) for h in search(url, Filters(**filters)))  # type: ignore[arg-type]


def test_backup_indexes_and_search_finds_decoded_words(archive: str, tmp_path: Path) -> None:
    assert hits(archive, query="schlüsselwörterbuch") == [("INBOX", "Angebot")]
    assert hits(archive, query="Schlusselworterbuch") == [("INBOX", "Angebot")]  # diacritics folded
    assert hits(archive, query="attachmentonlyword") == []
    assert hits(archive, query="zanzibar") == [("Archive", "Newsletter"), ("INBOX", "Newsletter")]
    assert hits(archive, query="hiddenstyle") == []
    assert hits(archive, query="zanz*") == [("Archive", "Newsletter"), ("INBOX", "Newsletter")]
    with sqlite3.connect(tmp_path / "md" / ".mailbackup" / "catalog.sqlite") as db:
        assert db.execute("SELECT count(*) FROM search_docs").fetchone() == (3,)


def test_filters_narrow_the_hits(archive: str) -> None:
    assert hits(archive, sender="Jörg") == [("INBOX", "Angebot")]
    assert hits(archive, sender="joerg@example.org") == [("INBOX", "Angebot")]
    assert hits(archive, recipient="carol@example.com") == [("Archive", "Newsletter"), ("INBOX", "Newsletter")]
    assert hits(archive, subject="lunch") == [("Sent", "lunch plans")]
    assert hits(archive, query="zanzibar", folder="Archive") == [("Archive", "Newsletter")]
    assert hits(archive, since=datetime(2021, 4, 1), before=datetime(2021, 12, 31)) == [("Sent", "lunch plans")]
    assert hits(archive, before=datetime(2021, 4, 1)) == [("INBOX", "Angebot")]
    assert hits(archive, query='odd"quote (syntax') == []  # punctuation is never FTS5 syntax


def test_reindex_builds_an_index_that_backup_could_not_write(dovecot, account, tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    # The indexer process cannot open the database: backup carries on, and says so.
    monkeypatch.setattr(search_module.mime, "SERVE", "import sys; sys.stdin.buffer.read(); sys.exit(3)")
    dovecot.append(account, "INBOX", LATIN1_B64)
    dovecot.append(account, "INBOX", PLAIN)
    url = str(tmp_path / "a.sqlite")
    summary = backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))
    assert summary.ok and summary.new == 2  # the backup itself is untouched
    assert "reindex" in caplog.text
    monkeypatch.undo()
    assert hits(url, query="schlüsselwörterbuch") == []
    assert reindex(url).indexed == 2
    assert hits(url, query="schlüsselwörterbuch") == [("INBOX", "Angebot")]
    assert reindex(url).indexed == 0  # caught up
    assert reindex(url, rebuild=True).indexed == 2


def test_a_search_that_cannot_see_everything_says_so(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "a.sqlite")
    dovecot.append(account, "INBOX", PLAIN)
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).new == 1
    dovecot.append(account, "Sent", LATIN1_B64)
    dovecot.append(account, "Sent", HTML_ONLY)
    options = BackupOptions(no_tls=True, index=False)  # as a cut indexer or --no-index leaves it
    assert backup(account.url("imap"), url, password=account.password, options=options).new == 2
    result = CliRunner().invoke(main, ["search", url, "lunch", "--json"])
    assert result.exit_code == 0
    assert [json.loads(line)["subject"] for line in result.stdout.splitlines()] == ["lunch plans"]
    assert result.stderr.splitlines() == [f"mailbackup: note: 2 messages are not in the search index yet; 'mailbackup reindex {url}' adds them"]
    assert reindex(url).indexed == 2
    result = CliRunner().invoke(main, ["search", url, "zanzibar"])
    assert result.exit_code == 0 and "Newsletter" in result.stdout and result.stderr == ""


def test_cli_prints_one_line_per_hit_and_json(archive: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["search", archive, "zanzibar"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and all("Newsletter" in line and "Bob <bob@example.com>" in line for line in lines)
    as_json = runner.invoke(main, ["search", archive, "--from", "carol", "--json"])
    [hit] = [json.loads(line) for line in as_json.output.splitlines()]
    assert (hit["folder"], hit["subject"], hit["date"]) == ("Sent", "lunch plans", "2021-05-05T12:00:00+00:00")
    shown = runner.invoke(main, ["show", archive, str(hit["id"])])
    assert shown.stdout_bytes == PLAIN


def test_postgresql_archive_says_search_needs_sqlite(dovecot, account, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", PLAIN)
    assert backup(account.url("imap"), pg_url, password=account.password, options=BackupOptions(no_tls=True)).new == 1
    with pytest.raises(UsageError, match="SQLite"):
        list(search(pg_url, Filters(query="noon")))


def test_fast_reader_indexes_the_corpus_like_the_email_package() -> None:
    import re as regex

    from corpus.tricky import tricky_messages

    corpus = Path(__file__).parent / "corpus"
    raws = [p.read_bytes() for p in sorted(corpus.glob("**/*.eml")) + sorted(corpus.glob("cpython/*.txt"))]
    raws += list(tricky_messages().values())

    def words(part) -> list[str]:  # type: ignore[no-untyped-def]
        texts = [mime.body_text(part), mime.header_text(part.get("Subject")), mime.header_text(part.get("From"))]
        return [" ".join(regex.findall(r"\w+", t.lower())) for t in texts]

    fast = 0
    for raw in raws:
        head = raw[: mime.PARSE_CAP]
        parsed = mime.parse(head)
        if isinstance(parsed, mime.FastPart):
            fast += 1
            slow = words(mime._PARSER.parsebytes(head))
            mine = words(parsed)
            # Where the email package reads a malformed boundary line as text, the fast reader does not.
            assert mine == slow or (mine[1:] == slow[1:] and slow[0].startswith(mine[0])), raw[:200]
    assert fast > len(raws) // 2  # most real mail takes the fast path; the rest falls back


def test_indexing_leaves_the_catalog_connection_fully_synchronous(tmp_path: Path) -> None:
    from mailbackup.model import Message
    from mailbackup.stores import open_store

    store = open_store(str(tmp_path / "a.sqlite"), mode="write")
    indexer = search_module.Indexer(store)
    indexer.add([Message(raw=b"Subject: durable\r\n\r\nbody words\r\n")])
    indexer.close()
    with store.catalog.engine.connect() as conn:  # the pool hands back the connection just used
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: POP3 DELE relies on it
        assert conn.exec_driver_sql("SELECT count(*) FROM search_docs").scalar() == 1
    store.close()


def test_the_index_merges_its_segments_eight_at_a_time(tmp_path: Path) -> None:
    from mailbackup.model import Message
    from mailbackup.stores import open_store

    store = open_store(str(tmp_path / "a.sqlite"), mode="write")
    indexer = search_module.Indexer(store)
    indexer.add([Message(raw=b"Subject: merge\r\n\r\nbody words\r\n")])
    indexer.close()
    store.close()
    with sqlite3.connect(tmp_path / "a.sqlite") as db:  # FTS5 keeps its settings in the index
        assert db.execute("SELECT v FROM search_text_config WHERE k = 'automerge'").fetchone() == (8,)


def test_the_index_keeps_words_not_a_second_copy_of_the_text(archive: str, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "md" / ".mailbackup" / "catalog.sqlite") as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert "search_text_content" not in tables  # contentless FTS5: rowids and words only
        assert db.execute("SELECT body FROM search_text").fetchall() == [(None,)] * 3
    assert hits(archive, subject="lunch") == [("Sent", "lunch plans")]  # column filters still work


def test_an_index_made_with_a_copy_of_the_text_keeps_working(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "a.sqlite")
    dovecot.append(account, "INBOX", LATIN1_B64)
    options = BackupOptions(no_tls=True, index=False)
    assert backup(account.url("imap"), url, password=account.password, options=options).new == 1
    with sqlite3.connect(tmp_path / "a.sqlite") as db:  # an index as earlier versions made it
        db.execute(mime.SCHEMA[0])
        db.execute(mime.SCHEMA[1].replace("content = '', ", ""))
    assert reindex(url).indexed == 1
    dovecot.append(account, "Sent", PLAIN)
    assert backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True)).new == 1
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        assert db.execute("SELECT count(*) FROM search_text_content").fetchone() == (2,)
    assert hits(url, query="schlüsselwörterbuch") == [("INBOX", "Angebot")]
    assert hits(url, subject="lunch") == [("Sent", "lunch plans")]
    assert reindex(url, rebuild=True).indexed == 2
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'search_text_content'").fetchall() == []
    assert hits(url, query="schlüsselwörterbuch") == [("INBOX", "Angebot")]
