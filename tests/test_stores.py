"""Every store gives back the exact bytes it was given, and other mail tools can read it."""

from __future__ import annotations

import mailbox
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailbackup.errors import UsageError
from mailbackup.model import Folder, Message
from mailbackup.stores import Store, open_store
from tests.corpus.tricky import tricky_messages

CORPUS = Path(__file__).parent / "corpus"
WHEN = datetime(2021, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-5)))


def sample_messages() -> list[bytes]:
    files = sorted(CORPUS.glob("**/*.eml")) + sorted(CORPUS.glob("cpython/*.txt"))
    raws = [p.read_bytes() for p in files]
    raws += list(tricky_messages().values())
    # What an IMAP server typically sends: CRLF everywhere.
    raws += [r.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for r in raws[:20]]
    return raws


def store_urls(tmp_path: Path) -> dict[str, str]:
    return {
        "maildir": f"maildir:{tmp_path / 'md'}",
        "mbox": f"mbox:{tmp_path / 'mb'}",
        "sqlite": str(tmp_path / "archive.sqlite"),
    }


@pytest.fixture(params=["maildir", "mbox", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    opened = open_store(store_urls(tmp_path)[request.param], mode="write")
    yield opened
    opened.close()


def put_all(store: Store, folder: Folder, raws: list[bytes], flags: tuple[str, ...] = (), first_uid: int = 1) -> list[str]:
    archived = store.catalog.ensure_folder(folder, store.folder_path(folder))
    messages = [Message(raw=r, flags=flags, internal_date=WHEN, uid=first_uid + i) for i, r in enumerate(raws)]
    locations = store.put(archived, messages)
    store.catalog.add(archived.id, 1, list(zip(messages, locations)))
    return locations


def test_every_store_gives_back_exact_bytes(store: Store) -> None:
    raws = sample_messages()
    assert len(raws) > 20
    locations = put_all(store, Folder("INBOX"), raws, ("\\Seen",))
    for raw, location in zip(raws, locations):
        assert store.get(location) == raw


def test_flags_change_keeps_bytes(store: Store) -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    [location] = put_all(store, Folder("INBOX"), [raw])
    moved = store.set_flags(location, ("\\Seen", "\\Answered", "$Custom"))
    assert store.get(moved) == raw
    assert store.get(location) == raw  # a stale location still resolves


def test_archive_files_are_private(tmp_path: Path) -> None:
    for url in store_urls(tmp_path).values():
        store = open_store(url, mode="write")
        put_all(store, Folder("A/B"), [b"Subject: x\r\n\r\ny\r\n"])
        store.close()
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            assert path.stat().st_mode & 0o777 == 0o700, path
        elif not path.name.endswith(("-wal", "-shm")):
            assert path.stat().st_mode & 0o777 == 0o600, path


def test_python_mailbox_reads_maildir_and_mbox(tmp_path: Path) -> None:
    raws = sample_messages()
    urls = store_urls(tmp_path)
    for kind in ("maildir", "mbox"):
        store = open_store(urls[kind], mode="write")
        put_all(store, Folder("Archive/2024"), raws, ("\\Seen", "\\Flagged"))
        store.close()
    md = mailbox.Maildir(tmp_path / "md" / "Archive" / "2024", create=False)
    assert len(md) == len({r for r in raws})  # same bytes twice share one file
    assert all(m.get_flags() == "FS" for m in md)
    mb = mailbox.mbox(tmp_path / "mb" / "Archive.d" / "2024.mbox", create=False)
    assert len(mb) == len(raws)


def test_maildir_adopts_a_file_left_by_a_crash(tmp_path: Path) -> None:
    store = open_store(f"maildir:{tmp_path / 'md'}", mode="write")
    folder = store.catalog.ensure_folder(Folder("INBOX"), "INBOX")
    message = Message(raw=b"Subject: x\r\n\r\ny\r\n", uid=1)
    [first] = store.put(folder, [message])  # written, but the catalog never heard of it
    [again] = store.put(folder, [message])
    assert first == again
    assert len(os.listdir(tmp_path / "md" / "INBOX" / "cur")) == 1


def test_mbox_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    store = open_store(f"mbox:{tmp_path / 'mb'}", mode="write")
    raws = [b"Subject: one\r\n\r\nFrom me\r\n", b"Subject: two\r\n\r\n>From you\r\n"]
    locations = put_all(store, Folder("INBOX"), raws[:1])
    path = tmp_path / "mb" / "INBOX.mbox"
    committed = path.read_bytes()
    with open(path, "ab") as f:  # a crashed run: written, never catalogued
        f.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2021\nSubject: torn")
    store.close()
    store = open_store(f"mbox:{tmp_path / 'mb'}", mode="write")
    locations += put_all(store, Folder("INBOX"), raws[1:], first_uid=2)
    assert path.read_bytes().startswith(committed)
    assert b"torn" not in path.read_bytes()
    assert [store.get(loc) for loc in locations] == raws
    assert len(mailbox.mbox(path)) == 2


def test_sqlite_stores_shared_bytes_once(tmp_path: Path) -> None:
    import sqlalchemy as sa

    store = open_store(str(tmp_path / "a.sqlite"), mode="write")
    raw = b"Subject: same\r\n\r\nbody\r\n"
    for name in ("INBOX", "Archive", "Sent"):
        put_all(store, Folder(name), [raw])
    with store.catalog.engine.connect() as conn:
        assert conn.scalar(sa.text("select count(*) from blobs")) == 1
        assert conn.scalar(sa.text("select count(*) from messages")) == 3


def test_wrong_kind_of_archive_is_refused(tmp_path: Path) -> None:
    open_store(f"maildir:{tmp_path / 'x'}", mode="write").close()
    with pytest.raises(UsageError, match="maildir archive"):
        open_store(f"mbox:{tmp_path / 'x'}", mode="write")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        open_store(f"maildir:{tmp_path / 'other'}", mode="write")
    with pytest.raises(UsageError):
        open_store(str(tmp_path / "archive.txt"), mode="write")


def test_sqlite_streams_a_big_message_and_still_stores_it_once(tmp_path: Path) -> None:
    import sqlalchemy as sa

    store = open_store(str(tmp_path / "a.sqlite"), mode="write")
    raw = b"Subject: big\r\n\r\n" + bytes(range(256)) * 12000 + b"\r\n"  # about 3 MB, every byte value
    locations = put_all(store, Folder("INBOX"), [raw, raw])
    locations += put_all(store, Folder("Archive"), [raw])
    assert [store.get(loc) for loc in locations] == [raw, raw, raw]
    with store.catalog.engine.connect() as conn:
        assert conn.scalar(sa.text("select count(*) from blobs")) == 1
    store.close()


def test_a_new_sqlite_archive_has_big_pages_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    import sqlite3

    store = open_store(str(tmp_path / "new.sqlite"), mode="write")
    put_all(store, Folder("INBOX"), sample_messages()[:5])
    store.close()
    with sqlite3.connect(tmp_path / "new.sqlite") as db:
        assert db.execute("PRAGMA page_size").fetchone() == (16384,)
    with sqlite3.connect(tmp_path / "old.sqlite") as db:  # what earlier versions made
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE early (x)")
        db.execute("DROP TABLE early")
    raws = sample_messages()[:5]
    store = open_store(str(tmp_path / "old.sqlite"), mode="write")
    locations = put_all(store, Folder("INBOX"), raws)
    assert [store.get(loc) for loc in locations] == raws
    store.close()
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        assert db.execute("PRAGMA page_size").fetchone() == (4096,)
