"""SQL archives whose message bytes live in S3: a real `rclone serve s3` on loopback, real Dovecot."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailbackup.errors import UsageError
from mailbackup.export import export
from mailbackup.pipeline import BackupOptions, backup
from mailbackup.restore import RestoreOptions, restore
from mailbackup.show import show
from mailbackup.stores import open_store
from mailbackup.stores.blobs import Bucket
from mailbackup.verify import CORRUPT, MISSING, UNRECORDED, verify
from tests.archive_view import archived
from tests.test_backup_imap import seed_tricky

ROOT = Path(__file__).parent.parent


def back_up(account, archive: str, bucket: str | None, **options) -> object:  # type: ignore[no-untyped-def]
    blobs = Bucket(f"s3://{bucket}/mail") if bucket else None
    return backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True, blobs=blobs, **options))


def objects(bucket_dir: Path) -> dict[str, Path]:
    """sha256 -> file of every object rclone keeps under the archive's prefix."""
    return {p.name: p for p in (bucket_dir / "mail").glob("*/*") if p.is_file()}


def hashes_on_server(dovecot, account) -> set[str]:  # type: ignore[no-untyped-def]
    return {hashlib.sha256(m.raw).hexdigest() for f in dovecot.folders(account) for m in dovecot.fetch(account, f)}


def problems(archive: str, mailbox: str | None = None) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    verify(archive, report=lambda p: found.append((p.kind, p.detail)), mailbox=mailbox)
    return found


def test_backup_into_sqlite_and_s3_restores_byte_for_byte(dovecot, account, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed_tricky(dovecot, account)
    archive = str(tmp_path / "a.sqlite")
    summary = back_up(account, archive, s3_bucket.name)
    assert summary.ok and summary.new == count
    stored = objects(s3_bucket)
    assert set(stored) == hashes_on_server(dovecot, account)
    for sha256, path in stored.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    import sqlalchemy as sa

    with sa.create_engine(f"sqlite:///{archive}").connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM blobs")) == 0  # no message bytes in the database
        # A mailbackup that knows no bucket refuses the archive rather than finding no bytes in it.
        assert conn.scalar(sa.text("SELECT value FROM meta WHERE key = 'schema'")) == "3+blobs"
    # Later commands find the bucket from the archive itself: no flag.
    assert back_up(account, archive, None).new == 0
    assert problems(archive) == []
    target = dovecot.add_user()
    report = restore(archive, target.url("imap"), password=target.password, options=RestoreOptions(no_tls=True))
    assert report.ok
    original = {f: sorted(m.raw for m in dovecot.fetch(account, f)) for f in dovecot.folders(account)}
    restored = {f: sorted(m.raw for m in dovecot.fetch(target, f)) for f in dovecot.folders(target)}
    assert restored == original


def test_show_and_export_read_the_objects(dovecot, account, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = b"Subject: in the bucket\r\nMessage-ID: <b@x>\r\n\r\nhello\r\n"
    dovecot.append(account, "INBOX", raw)
    archive = str(tmp_path / "a.sqlite")
    back_up(account, archive, s3_bucket.name)
    sha256 = hashlib.sha256(raw).hexdigest()
    assert show(archive, sha256[:12]).raw == raw
    export(archive, f"maildir:{tmp_path / 'out'}")
    assert [m.raw for m in archived(f"maildir:{tmp_path / 'out'}")["INBOX"]] == [raw]


def test_verify_names_a_deleted_and_a_corrupted_object(dovecot, account, s3_server, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        dovecot.append(account, "INBOX", b"Subject: %d\r\nMessage-ID: <%d@v>\r\n\r\nbody %d\r\n" % (i, i, i))
    archive = str(tmp_path / "a.sqlite")
    back_up(account, archive, s3_bucket.name)
    stored = sorted(objects(s3_bucket).items())
    (gone, _), (bad, bad_path), _ = stored
    s3_server.client().delete_object(Bucket=s3_bucket.name, Key=f"mail/{gone[:2]}/{gone}")
    bad_path.write_bytes(bad_path.read_bytes().replace(b"body", b"BODY"))
    found = problems(archive)
    assert {kind for kind, _ in found} == {MISSING, CORRUPT}
    assert any(kind == MISSING and gone in detail for kind, detail in found)
    assert any(kind == CORRUPT and bad[:16] in detail for kind, detail in found)
    cli = subprocess.run([sys.executable, "-m", "mailbackup", "verify", archive], cwd=ROOT, capture_output=True, text=True, check=False)
    assert cli.returncode != 0 and gone in cli.stdout


def test_verify_reports_an_object_no_entry_names(dovecot, account, s3_server, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: one\r\n\r\none\r\n")
    archive = str(tmp_path / "a.sqlite")
    back_up(account, archive, s3_bucket.name)
    stray = hashlib.sha256(b"stray").hexdigest()
    s3_server.client().put_object(Bucket=s3_bucket.name, Key=f"mail/{stray[:2]}/{stray}", Body=b"stray")
    found = problems(archive)
    assert [kind for kind, _ in found] == [UNRECORDED]
    assert stray in found[0][1]


def test_postgresql_archive_with_s3_blobs(dovecot, account, pg_url: str, s3_bucket: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed_tricky(dovecot, account)
    assert back_up(account, pg_url, s3_bucket.name).new == count
    other = dovecot.add_user()
    dovecot.append(other, "INBOX", b"Subject: bob\r\n\r\nbob's\r\n")
    assert back_up(other, pg_url, None).new == 1  # a second account, same archive, same bucket
    assert set(objects(s3_bucket)) == hashes_on_server(dovecot, account) | hashes_on_server(dovecot, other)
    for who in (account, other):
        assert problems(pg_url, f"{who.user}@{who.host}") == []
    store = open_store(pg_url, mode="read", account=f"{account.user}@{account.host}")
    try:
        entries = list(store.catalog.entries())
        assert len(entries) == count
        for entry in entries:
            assert hashlib.sha256(store.get(entry.location)).hexdigest() == entry.sha256
    finally:
        store.close()


def test_a_20_mb_message_goes_up_in_parts_and_comes_back_exact(dovecot, account, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    body = b"".join(b"%07d " % i + os.urandom(30).hex().encode() + b"\r\n" for i in range(20 * 1024 * 1024 // 70))
    raw = b"Subject: big\r\nMessage-ID: <big@x>\r\n\r\n" + body
    assert len(raw) > 20_000_000
    dovecot.seed_maildir(account, "INBOX", [(raw, "S", 1.6e9)])
    archive = str(tmp_path / "a.sqlite")
    assert back_up(account, archive, s3_bucket.name).new == 1
    sha256 = hashlib.sha256(raw).hexdigest()
    stored = objects(s3_bucket)[sha256]
    assert stored.stat().st_size == len(raw)
    store = open_store(archive, mode="read")
    try:
        assert store.get(sha256) == raw
    finally:
        store.close()


def test_big_messages_use_multipart_upload(s3_bucket: Path) -> None:
    from mailbackup.stores.blobs import BIG, Blob, S3Blobs

    raw = os.urandom(BIG * 2 + 12345)
    sha256 = hashlib.sha256(raw).hexdigest()
    bucket = S3Blobs(f"s3://{s3_bucket.name}/mail")
    calls: list[str] = []
    bucket.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    try:
        bucket.put([Blob(sha256, raw)])
        assert "CreateMultipartUpload" in calls and calls.count("UploadPart") == 3 and "PutObject" not in calls
        assert bucket.get(sha256) == raw
        calls.clear()
        bucket.put([Blob(sha256, raw)])  # there already (a crashed run's): not sent again
        assert calls == ["HeadObject"]
    finally:
        bucket.close()


KILL_AFTER_UPLOAD = textwrap.dedent(
    """
    import os, signal, sys
    from mailbackup import catalog
    from mailbackup.pipeline import BackupOptions, backup
    from mailbackup.stores.blobs import Bucket

    def die(*args, **kwargs):  # the objects are written, the catalog not yet
        os.kill(os.getpid(), signal.SIGKILL)

    catalog.Catalog.add = die
    backup(sys.argv[1], sys.argv[2], password=os.environ["MAILBACKUP_PASSWORD"],
           options=BackupOptions(no_tls=True, blobs=Bucket(sys.argv[3]), batch_messages=10))
    """
)


def test_kill_9_between_upload_and_commit_then_rerun_leaves_each_message_once(dovecot, account, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    total = 30
    dovecot.seed_maildir(account, "INBOX", ((b"Subject: %d\r\nMessage-ID: <%d@k>\r\n\r\nbody\r\n" % (i, i), "", 1.6e9 + i) for i in range(total)))
    archive = str(tmp_path / "a.sqlite")
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_UPLOAD, account.url("imap"), archive, f"s3://{s3_bucket.name}/mail"],
                            env=env, cwd=ROOT, capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr
    orphans = objects(s3_bucket)
    assert len(orphans) == 10  # the first batch went up, and nothing names it
    assert [kind for kind, _ in problems(archive)] == [UNRECORDED] * 10
    rerun = subprocess.run([sys.executable, "-m", "mailbackup", "backup", account.url("imap"), archive, "--no-tls", "--json"],
                           env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["new"] == total
    view = archived(archive)["INBOX"]
    assert len(view) == total and len({m.raw for m in view}) == total
    assert set(objects(s3_bucket)) == hashes_on_server(dovecot, account)
    assert problems(archive) == []


def test_blobs_refused_for_an_archive_that_keeps_bytes_in_the_database(dovecot, account, s3_bucket: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: x\r\n\r\nx\r\n")
    archive = str(tmp_path / "a.sqlite")
    back_up(account, archive, None)
    with pytest.raises(UsageError, match="keeps its messages in the database"):
        back_up(account, archive, s3_bucket.name)
    with pytest.raises(UsageError, match="for SQL archives"):
        back_up(account, f"maildir:{tmp_path / 'md'}", s3_bucket.name)


def test_blobs_url_must_be_s3() -> None:
    from mailbackup.stores.blobs import parse_bucket_url

    assert parse_bucket_url("s3://mail/org/2026/") == ("mail", "org/2026")
    with pytest.raises(UsageError):
        parse_bucket_url("https://mail/x")


def test_two_accounts_write_one_postgresql_archive_at_once(dovecot, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import ArchiveLocked

    alice, bob = dovecot.add_user(), dovecot.add_user()
    stores = [open_store(pg_url, mode="write", account=f"{who.user}@{who.host}") for who in (alice, bob, alice)]
    whole = open_store(pg_url, mode="write")  # no account: a run over the whole archive
    try:
        with stores[0].lock(), stores[1].lock():  # two accounts side by side
            with pytest.raises(ArchiveLocked, match=alice.user):
                with stores[2].lock():  # the same account twice: refused
                    pass
            with pytest.raises(ArchiveLocked), whole.lock():
                pass
        with whole.lock(), pytest.raises(ArchiveLocked), stores[1].lock():
            pass
    finally:
        for store in [*stores, whole]:
            store.close()


def test_writers_opening_a_fresh_postgresql_archive_at_once_all_succeed(dovecot, pg_url: str, s3_bucket: Path) -> None:  # type: ignore[no-untyped-def]
    """Queue workers starting together on a new shared archive: one creates the tables and records the bucket."""
    import threading

    users = [dovecot.add_user() for _ in range(6)]
    start = threading.Barrier(len(users))
    errors: list[BaseException] = []
    stores = []

    def open_one(user) -> None:  # type: ignore[no-untyped-def]
        start.wait()
        try:
            stores.append(open_store(pg_url, mode="write", account=f"{user.user}@{user.host}",
                                     blobs=Bucket(f"s3://{s3_bucket.name}/mail")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    assert len(stores) == len(users)
