"""Archives at recovery time: read-only archives, read commands that create nothing,
archive identity, catalog repair and the archive as it stood at a moment (issue 10)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailbackup import BackupOptions, backup
from mailbackup.errors import AccountMismatch, CatalogDamaged, UsageError
from mailbackup.repair import repair
from mailbackup.show import listing
from mailbackup.stores import open_store
from mailbackup.verify import DUPLICATE, AgainstOptions, Problem, verify
from tests.archive_view import archive_url

STORES = ["maildir", "mbox", "sqlite"]
NO_OVERRIDE = ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"]


def archive_root(url: str) -> Path:
    return Path(url.partition(":")[2]) if url.startswith(("maildir:", "mbox:")) else Path(url)


def seed(dovecot, account, count: int = 4) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        dovecot.append(account, "INBOX", b"Subject: zanzibar %d\r\n\r\nbody %d\r\n" % (i, i), ("\\Seen",) if i % 2 else (),
                       datetime(2021, 1, 1 + i, tzinfo=timezone.utc))
    dovecot.append(account, "Archive/2024", b"Subject: lf only\n\nbare LF body\n")


def back_up(account, url: str):  # type: ignore[no-untyped-def]
    return backup(account.url("imap"), url, password=account.password, options=BackupOptions(no_tls=True))


def tree_hash(path: Path) -> str:
    """Names, modes and bytes of every file and directory under path (or of the file itself)."""
    digest = hashlib.sha256()
    items = [path] if path.is_file() else sorted(path.rglob("*"))
    for item in items:
        info = item.lstat()
        digest.update(f"{item}\0{info.st_mode}\0".encode())
        if item.is_file():
            digest.update(item.read_bytes())
    if path.is_file():  # a SQLite archive: its directory too (-wal, -shm, .lock beside it)
        digest.update("\0".join(sorted(os.listdir(path.parent))).encode())
    return digest.hexdigest()


def cli(*args: str, unprivileged: bool = False, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run mailbackup in a child process, optionally without CAP_DAC_OVERRIDE (tests run as root)."""
    env = {**os.environ, "MAILBACKUP_PASSWORD": password or "x"}
    command = [sys.executable, "-m", "mailbackup", *args]
    return subprocess.run((NO_OVERRIDE if unprivileged else []) + command, capture_output=True, text=True, env=env, timeout=120)


def write_protect(path: Path) -> None:
    subprocess.run(["chmod", "-R", "a-w", str(path if path.is_dir() else path.parent)], check=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailbackup: error: "), result.stderr
    return lines[0]


# read-only archives


@pytest.mark.parametrize("kind", STORES)
def test_read_commands_work_on_a_write_protected_archive_and_change_no_byte(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = archive_url(kind, tmp_path / "archive")
    (tmp_path / "archive").mkdir()
    assert back_up(account, url).new == 5
    root = archive_root(url)
    write_protect(root)
    before = tree_hash(root.parent)
    try:
        ls = cli("ls", url, "--json", unprivileged=True)
        assert ls.returncode == 0, ls.stderr
        assert {json.loads(line)["folder"]: json.loads(line)["messages"] for line in ls.stdout.splitlines()} == {"INBOX": 4, "Archive/2024": 1}
        checked = cli("verify", url, "--json", unprivileged=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert json.loads(checked.stdout.splitlines()[-1])["checked"] == 5
        found = cli("search", url, "zanzibar", "--json", unprivileged=True)
        assert found.returncode == 0, found.stderr
        hits = [json.loads(line) for line in found.stdout.splitlines()]
        assert len(hits) == 4
        shown = cli("show", url, str(hits[0]["id"]), unprivileged=True)
        assert shown.returncode == 0 and shown.stdout.startswith("Subject: zanzibar"), shown.stderr
        copy = tmp_path / "copy.sqlite"
        exported = cli("export", url, str(copy), unprivileged=True)
        assert exported.returncode == 0, exported.stderr
        assert tree_hash(root.parent) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path / "archive")], check=True)
    assert {r.folder.name: r.messages for r in listing(str(copy))} == {"INBOX": 4, "Archive/2024": 1}


@pytest.mark.parametrize("kind", STORES)
def test_backup_into_a_write_protected_archive_says_so_in_one_line(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 1)
    url = archive_url(kind, tmp_path / "archive")
    (tmp_path / "archive").mkdir()
    back_up(account, url)
    root = archive_root(url)
    write_protect(root)
    before = tree_hash(root.parent)
    try:
        result = cli("backup", account.url("imap"), url, "--no-tls", unprivileged=True, password=account.password)
        assert result.returncode == 2
        assert "needs write access" in one_line_error(result)
        assert tree_hash(root.parent) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path / "archive")], check=True)


def test_ls_on_a_plain_directory_creates_nothing_and_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "Mail"
    (plain / "cur").mkdir(parents=True)
    (plain / "cur" / "1.eml").write_bytes(b"Subject: mine\r\n\r\nx\r\n")
    before = tree_hash(plain)
    for kind in ("maildir", "mbox"):
        result = cli("ls", f"{kind}:{plain}")
        assert result.returncode == 2
        assert "not a mailbackup archive" in one_line_error(result)
    assert cli("verify", f"maildir:{plain}").returncode == 2
    assert tree_hash(plain) == before
    assert not (plain / ".mailbackup").exists()


def test_ls_on_an_empty_directory_lists_nothing_and_creates_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("ls", f"maildir:{empty}")
    assert result.returncode == 0, result.stderr
    assert list(empty.iterdir()) == []


def test_ls_on_an_unrelated_sqlite_file_leaves_it_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
    db.close()
    before = tree_hash(path)
    result = cli("ls", str(path))
    assert result.returncode == 2
    assert "not a mailbackup archive" in one_line_error(result)
    backed = cli("backup", "imap://a@127.0.0.1:1", str(path), "--no-tls")
    assert backed.returncode == 2
    assert "not a mailbackup archive" in one_line_error(backed)
    assert tree_hash(path) == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_tilde_in_an_archive_argument_is_the_home_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    store = open_store("maildir:~/Mail/backup", mode="write")
    store.close()
    assert (tmp_path / "home" / "Mail" / "backup" / ".mailbackup").is_dir()
    assert not (tmp_path / "~").exists()


# archive identity


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_a_second_account_is_refused_by_a_file_archive_which_stays_unchanged(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 2)
    url = archive_url(kind, tmp_path)
    back_up(account, url)
    other = dovecot.add_user()
    dovecot.append(other, "INBOX", b"Subject: carol\r\n\r\nnot alice's\r\n")
    before = tree_hash(archive_root(url))
    with pytest.raises(AccountMismatch, match=other.user):
        back_up(other, url)
    result = cli("backup", other.url("imap"), url, "--no-tls", password=other.password)
    assert result.returncode == 2 and "holds the mail of" in one_line_error(result)
    assert tree_hash(archive_root(url)) == before
    assert back_up(account, url).ok  # its own account still backs up


def test_two_accounts_in_one_sqlite_archive_stay_apart(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 3)
    other = dovecot.add_user()
    dovecot.append(other, "INBOX", b"Subject: carol\r\n\r\ncarol's own\r\n")
    url = str(tmp_path / "a.sqlite")
    assert back_up(account, url).new == 4
    assert back_up(other, url).new == 1
    assert back_up(account, url).new == 0 and back_up(other, url).new == 0  # and nothing is gone
    alice, carol = f"{account.user}@127.0.0.1", f"{other.user}@127.0.0.1"
    rows = {(r.account, r.folder.name): (r.messages, r.gone) for r in listing(url)}
    assert rows == {(alice, "INBOX"): (3, 0), (alice, "Archive/2024"): (1, 0), (carol, "INBOX"): (1, 0)}
    with pytest.raises(UsageError, match="2 accounts"):
        verify(url)
    assert verify(url, mailbox=alice).checked == 4
    assert verify(url, mailbox=carol).checked == 1
    checked = verify(url, against=AgainstOptions(other.url("imap"), other.password, no_tls=True))
    assert checked.ok and checked.checked == 1 and checked.compared == 1  # the account --against logs in as
    # What restore reads: the folders and entries of one account.
    store = open_store(url, mode="read", account=carol)
    try:
        assert [f.name for f in store.catalog.folders()] == ["INBOX"]
        assert [e.size for e in store.catalog.entries()] == [len(b"Subject: carol\r\n\r\ncarol's own\r\n")]
    finally:
        store.close()
    result = cli("ls", url)
    assert result.returncode == 0 and alice in result.stdout and carol in result.stdout
    assert cli("verify", url).returncode == 2
    assert cli("verify", url, "--mailbox", carol).returncode == 0


def test_a_schema_1_catalog_is_read_as_it_is_and_upgraded_by_a_backup(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "old.sqlite")
    with sqlite3.connect(url) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO meta VALUES ('schema', '1')")
        db.execute("INSERT INTO folders (id, name, delimiter, attributes, path, uid_validity) VALUES (1, 'INBOX', '/', '', 'INBOX', 1)")
    db.close()
    assert [r.folder.name for r in listing(url)] == ["INBOX"]
    with sqlite3.connect(url) as db:
        assert db.execute("SELECT value FROM meta").fetchall() == [("1",)]  # reading changed nothing
    db.close()
    seed(dovecot, account, 1)
    assert back_up(account, url).new == 2
    rows = {(r.account, r.folder.name) for r in listing(url)}
    assert rows == {(f"{account.user}@127.0.0.1", "INBOX"), (f"{account.user}@127.0.0.1", "Archive/2024")}


SCHEMA_1 = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE folders (id INTEGER NOT NULL, name TEXT NOT NULL, delimiter VARCHAR(8), attributes TEXT DEFAULT '' NOT NULL,
    path TEXT NOT NULL, uid_validity BIGINT, highest_modseq BIGINT, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE messages (id INTEGER NOT NULL, folder_id INTEGER NOT NULL, uid BIGINT, uid_validity BIGINT, source_id TEXT,
    sha256 VARCHAR(64) NOT NULL, size BIGINT NOT NULL, flags TEXT DEFAULT '' NOT NULL, internal_date VARCHAR(40),
    date_source VARCHAR(16), fetched_at VARCHAR(40) NOT NULL, location TEXT NOT NULL, gone_at VARCHAR(40),
    PRIMARY KEY (id), FOREIGN KEY(folder_id) REFERENCES folders (id));
CREATE UNIQUE INDEX ix_messages_folder_uid ON messages (folder_id, uid_validity, uid);
"""


# repair


def catalog_file(url: str) -> Path:
    return archive_root(url) / ".mailbackup" / "catalog.sqlite"


def contents(url: str) -> list[tuple[str, str]]:
    """(folder, SHA-256) of every live entry, sorted: each message exactly once."""
    store = open_store(url, mode="read")
    try:
        names = {f.id: f.name for f in store.catalog.folders()}
        return sorted((names[e.folder_id], e.sha256) for e in store.catalog.entries() if not e.gone)
    finally:
        store.close()


def store_files(url: str) -> list[str]:
    root = archive_root(url)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".mailbackup" not in p.parts)


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_a_truncated_catalog_is_named_repair_and_repair_brings_every_message_back_once(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = archive_url(kind, tmp_path)
    back_up(account, url)
    expected = contents(url)
    files = store_files(url)
    path = catalog_file(url)
    os.truncate(path, path.stat().st_size // 2)
    for command in (["ls", url], ["verify", url], ["backup", account.url("imap"), url, "--no-tls"]):
        result = cli(*command, password=account.password)
        assert result.returncode != 0
        assert "repair" in one_line_error(result)
    summary = repair(url)
    assert summary.messages == 5 and summary.set_aside is not None and Path(summary.set_aside).exists()
    assert contents(url) == expected
    found: list[Problem] = []
    assert verify(url, report=found.append).ok, found
    # A backup from the same server recognises every message by SHA-256: nothing is stored twice.
    rerun = back_up(account, url)
    assert rerun.ok and rerun.new == 0
    assert contents(url) == expected
    assert store_files(url) == files
    assert verify(url).ok


@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_an_emptied_catalog_is_not_an_empty_archive(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = archive_url(kind, tmp_path)
    back_up(account, url)
    expected = contents(url)
    database = catalog_file(url) if kind == "maildir" else Path(url)
    with sqlite3.connect(database) as db:
        db.execute("DELETE FROM messages")
    db.close()
    with pytest.raises(CatalogDamaged, match="repair"):
        back_up(account, url)
    for command in (["ls", url], ["verify", url]):
        assert "repair" in one_line_error(cli(*command))
    assert repair(url).messages == 5
    assert verify(url).ok
    if kind == "maildir":
        assert contents(url) == expected
        assert back_up(account, url).new == 0
        assert contents(url) == expected
    else:  # the database keeps no folder for a blob: they come back in one folder...
        assert sorted(sha for _, sha in contents(url)) == sorted(sha for _, sha in expected)
        assert {folder for folder, _ in contents(url)} == {"Recovered"}
        # ...until a backup sees where each one is on the server, and moves it there.
        again = back_up(account, url)
        assert again.new == 0 and sum(f.adopted for f in again.folders) == 5
        assert contents(url) == expected
        assert verify(url).ok


def test_a_lost_catalog_comes_back_with_folders_and_flags(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = archive_url("maildir", tmp_path)
    back_up(account, url)
    store = open_store(url, mode="read")
    flags = sorted((e.sha256, e.flags) for e in store.catalog.entries())
    store.close()
    catalog_file(url).unlink()
    assert "repair" in one_line_error(cli("ls", url))
    assert repair(url).messages == 5
    store = open_store(url, mode="read")
    assert sorted((e.sha256, e.flags) for e in store.catalog.entries()) == flags
    assert store.catalog.account == f"{account.user}@127.0.0.1"  # the identity outlives the catalog
    store.close()


def test_verify_reports_a_second_copy_of_a_message_in_one_folder(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account, 1)
    url = archive_url("maildir", tmp_path)
    back_up(account, url)
    cur = archive_root(url) / "INBOX" / "cur"
    [original] = list(cur.iterdir())
    copy = cur / (original.name.partition(":")[0] + ":2,F")
    copy.write_bytes(original.read_bytes())
    found: list[Problem] = []
    verify(url, report=found.append)
    assert [p.kind for p in found if p.kind == DUPLICATE] == [DUPLICATE]
    assert "2 files" in next(p.detail for p in found if p.kind == DUPLICATE)


# the archive as it stood


def test_ls_as_of_shows_the_archive_as_it_stood(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    url = archive_url("sqlite", tmp_path)
    back_up(account, url)
    time.sleep(1.1)  # the catalog keeps times to the second
    first = datetime.now(timezone.utc)
    time.sleep(1.1)
    dovecot.append(account, "INBOX", b"Subject: later\r\n\r\nlater\r\n")
    client = dovecot.client(account)
    client.select_folder("INBOX")
    client.delete_messages([1, 2])
    client.expunge()
    client.logout()
    back_up(account, url)
    now = {r.folder.name: (r.messages, r.gone) for r in listing(url)}
    then = {r.folder.name: (r.messages, r.gone) for r in listing(url, as_of=first)}
    assert now == {"INBOX": (3, 2), "Archive/2024": (1, 0)}
    assert then == {"INBOX": (4, 0), "Archive/2024": (1, 0)}
    result = cli("ls", url, "--as-of", first.isoformat(timespec="seconds"), "--json")
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["folder"]: json.loads(line)["messages"] for line in result.stdout.splitlines()} == {"INBOX": 4, "Archive/2024": 1}
    store = open_store(url, mode="read")
    try:
        assert len([e for e in store.catalog.entries(as_of=first)]) == 5
    finally:
        store.close()


def test_postgresql_schema_1_upgrades_in_place_and_then_holds_two_accounts(dovecot, account, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        for statement in SCHEMA_1_PG.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO meta VALUES ('schema', '1')")
        conn.exec_driver_sql("INSERT INTO folders (name, delimiter, path) VALUES ('INBOX', '/', 'INBOX')")
    engine.dispose()
    seed(dovecot, account, 2)
    other = dovecot.add_user()
    dovecot.append(other, "INBOX", b"Subject: carol\r\n\r\ncarol's own\r\n")
    assert back_up(account, pg_url).new == 3
    assert back_up(other, pg_url).new == 1
    rows = {(r.account, r.folder.name): r.messages for r in listing(pg_url)}
    alice, carol = f"{account.user}@127.0.0.1", f"{other.user}@127.0.0.1"
    assert rows == {(alice, "INBOX"): 2, (alice, "Archive/2024"): 1, (carol, "INBOX"): 1}
    assert verify(pg_url, mailbox=carol).ok


SCHEMA_1_PG = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE folders (id BIGSERIAL NOT NULL, name TEXT NOT NULL, delimiter VARCHAR(8), attributes TEXT DEFAULT '' NOT NULL,
    path TEXT NOT NULL, uid_validity BIGINT, highest_modseq BIGINT, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE messages (id BIGSERIAL NOT NULL, folder_id BIGINT NOT NULL, uid BIGINT, uid_validity BIGINT, source_id TEXT,
    sha256 VARCHAR(64) NOT NULL, size BIGINT NOT NULL, flags TEXT DEFAULT '' NOT NULL, internal_date VARCHAR(40),
    date_source VARCHAR(16), fetched_at VARCHAR(40) NOT NULL, location TEXT NOT NULL, gone_at VARCHAR(40),
    PRIMARY KEY (id), FOREIGN KEY(folder_id) REFERENCES folders (id));
CREATE UNIQUE INDEX ix_messages_folder_uid ON messages (folder_id, uid_validity, uid);
"""


@pytest.mark.parametrize("kind", ["mbox", "sqlite"])
def test_after_repair_a_pop3_backup_claims_messages_by_hash_and_stores_nothing_twice(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        dovecot.append(account, "INBOX", b"Subject: pop %d\r\nDate: Mon, 4 Jan 2021 10:00:00 +0000\r\n\r\nbody %d\r\n" % (i, i))
    url = archive_url(kind, tmp_path)
    pop3 = lambda: backup(account.url("pop3"), url, password=account.password, options=BackupOptions(no_tls=True))  # noqa: E731
    assert pop3().new == 3
    expected = contents(url)
    if kind == "mbox":
        os.truncate(catalog_file(url), catalog_file(url).stat().st_size // 2)
    else:
        with sqlite3.connect(url) as db:
            db.execute("DELETE FROM messages")
        db.close()
    mbox = archive_root(url) / "INBOX.mbox"
    before = mbox.read_bytes() if kind == "mbox" else b""
    assert repair(url).messages == 3
    again = pop3()
    assert again.new == 0 and again.folders[0].adopted == 3
    if kind == "mbox":
        assert mbox.read_bytes() == before  # nothing appended a second time
    assert contents(url) == expected
    assert verify(url).ok
    assert pop3().new == 0  # and the UIDLs are known again


@pytest.mark.parametrize("protection", [{"compress": True}, {"encrypt": True}])
def test_an_archive_whose_bytes_need_the_codec_is_refused_by_a_mailbackup_that_lacks_it(
    dovecot, account, tmp_path: Path, protection: dict[str, bool]  # type: ignore[no-untyped-def]
) -> None:
    from mailbackup import keys
    from mailbackup.errors import StoreError
    from tests.test_backup_imap import run_backup
    from tests.test_encryption import source_for

    dovecot.append(account, "INBOX", b"Subject: kept\r\n\r\nbody\r\n")
    url = str(tmp_path / "a.sqlite")
    with keys.using(source_for(tmp_path, **protection)):
        run_backup(account, url)
        # The schema value says so, where every earlier mailbackup looks first: it knows only "2" and "3".
        value = sqlite3.connect(url).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert value == "3+codec"
        assert open_store(url).catalog.features == {"codec"}  # this one reads it
        with sqlite3.connect(url) as db:
            db.execute("UPDATE meta SET value = '3+codec+sharded' WHERE key = 'schema'")
        for mode in ("read", "write"):
            with pytest.raises(StoreError, match="needs a newer mailbackup .*sharded"):
                open_store(url, mode=mode)


def test_a_plain_archive_keeps_the_schema_every_version_reads(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_backup_imap import run_backup

    dovecot.append(account, "INBOX", b"Subject: kept\r\n\r\nbody\r\n")
    url = str(tmp_path / "a.sqlite")
    run_backup(account, url)
    assert sqlite3.connect(url).execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
