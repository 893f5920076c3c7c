"""Encrypted and compressed SQL archives: nothing readable at rest, key slots, public-key mode, integrity."""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailbackup import keys
from mailbackup.errors import ArchiveCorrupt, ArchiveKeyError, UsageError, WrongPassphrase
from mailbackup.restore import RestoreOptions, restore
from mailbackup.stores import open_store
from mailbackup.verify import verify
from tests.test_backup_imap import corpus_files, run_backup, seed_tricky, server_view

ROOT = Path(__file__).parent.parent
PASSPHRASE = "correct horse battery staple"


def source_for(tmp_path: Path, secret: str = PASSPHRASE, **protection: object) -> keys.KeySource:
    path = tmp_path / f"pass-{hashlib.sha256(secret.encode()).hexdigest()[:8]}"
    path.write_text(secret + "\n")
    return keys.KeySource(
        passphrase=keys.Login(password_file=str(path), password_env="MAILBACKUP_PASSPHRASE"),
        protection=keys.Protection(**protection),  # type: ignore[arg-type]
    )


def backup_encrypted(account, url: str, source: keys.KeySource) -> object:  # type: ignore[no-untyped-def]
    with keys.using(source):
        return run_backup(account, url)


def restore_with(source: keys.KeySource, url: str, target) -> object:  # type: ignore[no-untyped-def]
    with keys.using(source):
        return restore(url, target.url("imap"), password=target.password, options=RestoreOptions(no_tls=True))


def secrets_of(raws: list[bytes]) -> set[bytes]:
    """Subjects, addresses, Message-IDs and long body words of the corpus: none may be found at rest."""
    found: set[bytes] = set()
    for raw in raws:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        for header in ("Subject", "Message-ID"):
            value = message.get(header)
            if isinstance(value, str) and len(value.strip()) >= 8 and value.isascii():
                found.add(value.strip().encode())
        found.update(a.encode() for a in re.findall(r"[\w.+-]{3,}@[\w-]+\.[\w.-]+", raw.decode("latin-1")))
        found.update(w for w in re.findall(rb"[A-Za-z]{12,}", raw.split(b"\n\n", 1)[-1])[:5])
    return found


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.name.startswith("pass-")}


def test_nothing_of_the_corpus_is_readable_in_any_file_of_an_encrypted_archive(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "archive"
    directory.mkdir()
    url = str(directory / "a.sqlite")
    source = source_for(tmp_path, encrypt=True)
    dovecot.append(account, "INBOX", b"Subject: first of all\r\n\r\nwarmup\r\n")
    backup_encrypted(account, url, source)
    # A reader holds the database open, so the second run's -wal file stays for the grep.
    watcher = sqlite3.connect(url)
    watcher.execute("SELECT count(*) FROM meta").fetchall()
    count = seed_tricky(dovecot, account)
    assert backup_encrypted(account, url, source).new == count
    files = files_of(directory)
    assert "a.sqlite-wal" in files and len(files["a.sqlite-wal"]) > 0
    raws = corpus_files() + [raw for raw in (m[0] for ms in server_view(dovecot, account).values() for m in ms)]
    folder_words = {b"Archive", b"INBOX", b"Sent"}
    needles = {n for n in secrets_of(raws) if not any(w in n for w in folder_words)}
    assert len(needles) > 100  # the test must be able to fail
    leaks = sorted((name, needle) for needle in needles for name, data in files.items() if needle in data)
    assert leaks == []
    # a plain archive of the same mail does leak: the check is sound
    plain = tmp_path / "plain.sqlite"
    run_backup(account, str(plain))
    assert sum(needle in plain.read_bytes() for needle in needles) > len(needles) // 2
    watcher.close()


def test_object_names_and_catalog_hashes_are_not_the_plain_sha256(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "a.sqlite")
    raws = [b"Subject: n%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]
    for raw in raws:
        dovecot.append(account, "INBOX", raw)
    backup_encrypted(account, url, source_for(tmp_path, encrypt=True))
    plain = {hashlib.sha256(m.raw).hexdigest() for m in dovecot.fetch(account, "INBOX")}
    with sqlite3.connect(url) as db:
        names = {row[0] for row in db.execute("SELECT sha256 FROM blobs")}
        catalog = {row[0] for row in db.execute("SELECT sha256 FROM messages")}
        locations = {row[0] for row in db.execute("SELECT location FROM messages")}
        fts = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%fts%' OR name LIKE 'search%'")]
    assert len(names) == 5 and names == catalog == locations
    assert not names & plain
    assert fts == []  # no search index in clear


def test_restore_from_an_encrypted_archive_is_byte_identical(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed_tricky(dovecot, source)
    url = str(tmp_path / "a.sqlite")
    keysource = source_for(tmp_path, encrypt=True)
    backup_encrypted(source, url, keysource)
    summary = restore_with(keysource, url, target)
    assert summary.ok  # type: ignore[attr-defined]
    assert server_view(dovecot, target) == server_view(dovecot, source)
    again = restore_with(keysource, url, target)
    assert again.sent == 0  # type: ignore[attr-defined]  # the target is asked about plain hashes, not MACs


def test_compressed_archive_restores_exactly_and_is_smaller(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed_tricky(dovecot, source)
    url = str(tmp_path / "c.sqlite")
    backup_encrypted(source, url, keys.KeySource(protection=keys.Protection(compress=True)))
    plain = str(tmp_path / "p.sqlite")
    run_backup(source, plain)
    with sqlite3.connect(url) as db, sqlite3.connect(plain) as pdb:
        packed = db.execute("SELECT sum(length(raw)) FROM blobs").fetchone()[0]
        raw = pdb.execute("SELECT sum(length(raw)) FROM blobs").fetchone()[0]
    assert packed < 0.8 * raw  # mostly one 5 MB base64 attachment here; see benchmarks/encrypted.py for mail at large
    # no passphrase needed for a compressed, unencrypted archive
    restore(url, target.url("imap"), password=target.password, options=RestoreOptions(no_tls=True))
    assert server_view(dovecot, target) == server_view(dovecot, source)


def test_wrong_or_missing_passphrase_is_one_line_and_exit_3(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: x\r\n\r\ny\r\n")
    url = str(tmp_path / "a.sqlite")
    backup_encrypted(account, url, source_for(tmp_path, encrypt=True))
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    env = {k: v for k, v in os.environ.items() if k != "MAILBACKUP_PASSPHRASE"}
    for extra in (["--passphrase-file", str(wrong)], []):
        done = subprocess.run([sys.executable, "-m", "mailbackup", "ls", url, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 3, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("mailbackup: error:"), done.stderr
    with keys.using(source_for(tmp_path, "not it")), pytest.raises(WrongPassphrase):
        open_store(url)
    with pytest.raises(ArchiveKeyError):
        open_store(url)


def test_key_change_add_remove_leave_every_object_byte_identical(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        dovecot.append(account, "INBOX", b"Subject: k%d\r\n\r\nbody\r\n" % i)
    url = str(tmp_path / "a.sqlite")
    old = source_for(tmp_path, encrypt=True)
    backup_encrypted(account, url, old)

    def objects() -> list[tuple[str, bytes]]:
        with sqlite3.connect(url) as db:
            return db.execute("SELECT sha256, raw FROM blobs ORDER BY sha256").fetchall()

    before = objects()
    (tmp_path / "new").write_text("a new passphrase\n")
    (tmp_path / "third").write_text("a third one\n")
    cli = [sys.executable, "-m", "mailbackup", "key"]
    env = {**os.environ, "MAILBACKUP_PASSPHRASE": PASSPHRASE}
    done = subprocess.run(cli + ["change", url, "--new-passphrase-file", str(tmp_path / "new")], cwd=ROOT, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert objects() == before
    with keys.using(source_for(tmp_path, PASSPHRASE)), pytest.raises(WrongPassphrase):
        open_store(url)
    new = source_for(tmp_path, "a new passphrase")
    with keys.using(new):
        store = open_store(url)
        assert len([store.get(e.location) for e in store.catalog.entries()]) == 3
        store.close()
    env = {**os.environ, "MAILBACKUP_PASSPHRASE": "a new passphrase"}
    added = subprocess.run(cli + ["add", url, "--new-passphrase-file", str(tmp_path / "third")], cwd=ROOT, env=env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert added.returncode == 0, added.stderr
    listed = subprocess.run(cli + ["list", url], cwd=ROOT, env=env, capture_output=True, text=True)
    ids = [int(line.split()[0]) for line in listed.stdout.splitlines()]
    assert len(ids) == 2
    removed = subprocess.run(cli + ["remove", url, str(ids[0])], cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert removed.returncode == 0, removed.stderr
    with keys.using(new), pytest.raises(WrongPassphrase):
        open_store(url)
    last = subprocess.run(cli + ["remove", url, str(ids[1])], cwd=ROOT, env={**env, "MAILBACKUP_PASSPHRASE": "a third one"},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert last.returncode == 2 and "last" in last.stderr
    assert objects() == before


def test_public_key_mode_appends_without_the_identity_and_restores_with_it(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pyrage = pytest.importorskip("pyrage")
    identity = pyrage.x25519.Identity.generate()
    (tmp_path / "id.txt").write_text(str(identity) + "\n")
    source, target = dovecot.add_user(), dovecot.add_user()
    seed_tricky(dovecot, source)
    url = str(tmp_path / "a.sqlite")
    # The backup machine: the public key, and its own append passphrase; no identity anywhere.
    writer = source_for(tmp_path, "append only", recipients=(str(identity.to_public()),))
    backup_encrypted(source, url, writer)
    dovecot.append(source, "INBOX", b"Subject: later\r\n\r\nsecond run\r\n")
    assert backup_encrypted(source, url, keys.KeySource(passphrase=writer.passphrase)).new == 1  # type: ignore[attr-defined]
    with keys.using(writer):
        store = open_store(url, mode="write")
        entry = next(store.catalog.entries())
        with pytest.raises(ArchiveKeyError):
            store.get(entry.location)  # the backup machine cannot read what it wrote
        store.close()
    with keys.using(writer), pytest.raises(ArchiveKeyError):
        open_store(url)
    reader = keys.KeySource(identity_file=str(tmp_path / "id.txt"))
    restore_with(reader, url, target)
    assert server_view(dovecot, target) == server_view(dovecot, source)
    with keys.using(reader):
        assert verify(url).ok


def test_one_flipped_bit_in_any_object_fails_verify_with_the_object_named(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(4):
        dovecot.append(account, "INBOX", b"Subject: v%d\r\n\r\n%s\r\n" % (i, b"text " * 50))
    url = str(tmp_path / "a.sqlite")
    source = source_for(tmp_path, encrypt=True)
    backup_encrypted(account, url, source)
    with keys.using(source):
        assert verify(url).ok
    with sqlite3.connect(url) as db:
        rows = db.execute("SELECT rowid, sha256, raw FROM blobs ORDER BY rowid").fetchall()
    for rowid, name, raw in rows:
        for position in (0, 7, len(raw) // 2, len(raw) - 1):  # header, nonce, body, tag
            damaged = bytearray(raw)
            damaged[position] ^= 0x10
            with sqlite3.connect(url) as db:
                db.execute("UPDATE blobs SET raw = ? WHERE rowid = ?", (bytes(damaged), rowid))
            problems: list[object] = []
            with keys.using(source):
                summary = verify(url, report=problems.append)
            assert not summary.ok
            assert any(name in p.detail and p.kind == "corrupt" for p in problems), problems  # type: ignore[attr-defined]
            with sqlite3.connect(url) as db:
                db.execute("UPDATE blobs SET raw = ? WHERE rowid = ?", (raw, rowid))
    # a flipped bit in a catalog's protected field (the MAC name) is found too
    with sqlite3.connect(url) as db:
        name = db.execute("SELECT sha256 FROM messages LIMIT 1").fetchone()[0]
        flipped = ("0" if name[0] != "0" else "1") + name[1:]
        db.execute("UPDATE messages SET sha256 = ? WHERE sha256 = ?", (flipped, name))
    with keys.using(source):
        assert not verify(url).ok
    with keys.using(source):
        store = open_store(url)
        with pytest.raises(ArchiveCorrupt):
            store.codec.decode(rows[0][1], rows[1][2])  # an object under another name does not open
        store.close()


def test_kill_9_during_an_encrypted_backup_then_rerun_keeps_every_message_once(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    total = 1500
    dovecot.seed_maildir(
        account, "INBOX",
        ((b"Subject: %d\r\nMessage-ID: <%d@k>\r\n\r\n%s\r\n" % (i, i, b"x" * 3000), "S", 1.6e9 + i) for i in range(total)),
    )
    url = str(tmp_path / "a.sqlite")
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password, "MAILBACKUP_PASSPHRASE": PASSPHRASE}
    command = [sys.executable, "-m", "mailbackup", "backup", account.url("imap"), url, "--no-tls", "-q",
               "--batch-messages", "20", "--encrypt"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    stored = 0
    while process.poll() is None and stored < 300:
        time.sleep(0.02)
        try:
            with sqlite3.connect(f"file:{url}?mode=ro", uri=True, timeout=1) as db:
                stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        except sqlite3.Error:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < stored < total, "the kill did not land mid-run"
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    with sqlite3.connect(url) as db:
        assert db.execute("SELECT count(*), count(DISTINCT sha256) FROM messages").fetchone() == (total, total)
        assert db.execute("SELECT count(*) FROM blobs").fetchone()[0] == total
    source = source_for(tmp_path)
    with keys.using(source):
        assert verify(url).ok


def test_encrypt_refuses_an_existing_plain_archive_and_a_maildir(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: x\r\n\r\ny\r\n")
    url = str(tmp_path / "a.sqlite")
    run_backup(account, url)
    with pytest.raises(UsageError, match="when an archive is created"):
        backup_encrypted(account, url, source_for(tmp_path, encrypt=True))
    with pytest.raises(UsageError, match="SQL archive"):
        backup_encrypted(account, f"maildir:{tmp_path / 'md'}", source_for(tmp_path, encrypt=True))


def test_encrypted_postgresql_archive_round_trips(dovecot, pg_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    seed_tricky(dovecot, source)
    keysource = source_for(tmp_path, encrypt=True)
    backup_encrypted(source, pg_url, keysource)
    plain = {hashlib.sha256(m[0]).hexdigest() for ms in server_view(dovecot, source).values() for m in ms}
    with keys.using(keysource):
        store = open_store(pg_url)
        assert not {e.sha256 for e in store.catalog.entries()} & plain
        store.close()
        assert verify(pg_url).ok
    restore_with(keysource, pg_url, target)
    assert server_view(dovecot, target) == server_view(dovecot, source)


def test_config_file_takes_the_passphrase_and_encrypt_keys(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mailbackup import config
    from mailbackup.accounts import backup_accounts

    dovecot.append(account, "INBOX", b"Subject: configured secret\r\n\r\nbody\r\n")
    (tmp_path / "pw").write_text(account.password + "\n")
    (tmp_path / "pp").write_text(PASSPHRASE + "\n")
    url = tmp_path / "a.sqlite"
    (tmp_path / "config.toml").write_text(
        f'[accounts.me]\nsource = "{account.url("imap")}"\narchive = "{url}"\nno_tls = true\n'
        f'password_file = "{tmp_path / "pw"}"\npassphrase_file = "{tmp_path / "pp"}"\nencrypt = true\n'
    )
    outcome = backup_accounts(list(config.load(tmp_path / "config.toml").values()))["me"]
    assert outcome.ok and outcome.new == 1  # type: ignore[union-attr]
    assert b"configured secret" not in url.read_bytes()
    with keys.using(source_for(tmp_path)):
        assert verify(str(url)).ok


def small_mail(count: int) -> list[tuple[bytes, str, float]]:
    words = ["quarterly", "invoice", "meeting", "deadline", "proposal", "regards", "schedule", "contract"]
    return [
        (b"From: sender%d@example.org\r\nTo: someone@example.net\r\nSubject: %s %d\r\nMessage-ID: <%d@dict>\r\n\r\n%s\r\n"
         % (i % 7, words[i % 8].encode(), i, i, " ".join(words[(i + k) % 8] for k in range(200)).encode()), "S", 1.6e9 + i)
        for i in range(count)
    ]


@pytest.mark.parametrize("protection", [{"encrypt": True}, {"compress": True}])
def test_a_dictionary_is_trained_on_the_first_small_messages_and_restores_exactly(dovecot, tmp_path: Path, protection: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    import zstandard

    source, target = dovecot.add_user(), dovecot.add_user()
    dovecot.seed_maildir(source, "INBOX", small_mail(700))
    url = str(tmp_path / "a.sqlite")
    keysource = source_for(tmp_path, **protection)
    backup_encrypted(source, url, keysource)
    with sqlite3.connect(url) as db:
        dictionaries = db.execute("SELECT id, data FROM zstd_dictionaries").fetchall()
        blobs = [row[0] for row in db.execute("SELECT raw FROM blobs")]
    assert len(dictionaries) == 1
    if protection.get("encrypt"):
        assert b"quarterly" not in dictionaries[0][1]  # sealed: it is made of the messages' words
    else:
        used = [zstandard.get_frame_parameters(b).dict_id for b in blobs]
        assert used.count(dictionaries[0][0]) >= 200 and used.count(0) >= 100  # before it was trained
    restore_with(keysource, url, target)
    assert server_view(dovecot, target) == server_view(dovecot, source)
    with keys.using(keysource):
        assert verify(url).ok


def test_key_caches_belong_to_their_ring_not_to_the_process(tmp_path: Path) -> None:
    """A passphrase is asked once per ring (nested `using` of one source shares it), and nothing
    outlives the ring: a caller that never calls `using` caches nothing between two unlocks."""
    import threading

    asked: list[str] = []

    def prompt() -> str:
        asked.append(threading.current_thread().name)
        return PASSPHRASE

    source = keys.KeySource(passphrase=keys.Login(password_env="MAILBACKUP_TEST_UNSET"), prompt=prompt,
                            protection=keys.Protection(encrypt=True))
    url = str(tmp_path / "a.sqlite")
    with keys.using(source):
        open_store(url, mode="write").close()
        with keys.using(keys.current()):  # as accounts.py does for an account without keys of its own
            open_store(url).close()
        assert len(asked) == 1
    with keys.using(source):
        open_store(url).close()
    assert len(asked) == 2  # a new `using`, a new ring: the first one forgot its passphrase
    ring = keys.KeyRing(source)
    opened: list[object] = []
    threads = [threading.Thread(target=lambda: opened.append(open_store(url, key_ring=ring))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()  # type: ignore[attr-defined]
    assert len(opened) == 4 and len(asked) == 3  # four threads, one prompt
    ring.forget()
    with pytest.raises(ArchiveKeyError):
        open_store(url)  # no ring in force and no passphrase anywhere: nothing was cached for the process
