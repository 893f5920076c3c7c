"""Restore over IMAP against real Dovecot: exact copies, folder mapping, journal, crashes, cut links."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailbackup.errors import ConnectionLost
from mailbackup.journal import IN_FLIGHT, Journal, default_state_path, state_engine
from mailbackup.model import Folder, Message
from mailbackup.restore import RestoreOptions, restore
from mailbackup.stores import open_store
from mailbackup.targets import message_id
from mailbackup.targets.imap import Layout, acceptable_flags, internal_date, map_folder, parse_appenduid
from tests.test_backup_imap import STORES, archive_url, run_backup, seed_tricky, server_view

ROOT = Path(__file__).parent.parent


def restore_to(account, archive: str, **options) -> object:  # type: ignore[no-untyped-def]
    return restore(archive, account.url("imap"), password=account.password, options=RestoreOptions(no_tls=True, **options))


def bodies(dovecot, account) -> dict[str, list[bytes]]:  # type: ignore[no-untyped-def]
    return {folder: sorted(m.raw for m in dovecot.fetch(account, folder)) for folder in dovecot.folders(account)}


def seeded_archive(dovecot, account, tmp_path: Path, kind: str = "sqlite") -> tuple[str, int]:  # type: ignore[no-untyped-def]
    count = seed_tricky(dovecot, account)
    dovecot.append(account, "Sent", b"Subject: sent\r\nMessage-ID: <s@x>\r\n\r\nbody\r\n", ("\\Seen", "$Label1"))
    url = archive_url(kind, tmp_path)
    assert run_backup(account, url).new == count + 1
    return url, count + 1


# pure functions


def test_folder_names_follow_the_target_layout() -> None:
    slash = Layout(delimiter="/", special=(("\\Sent", "Gesendet"),))
    dot = Layout(delimiter=".", prefix="INBOX.")
    assert map_folder(["Archive", "2024"], None, dot) == "INBOX.Archive.2024"
    assert map_folder(["INBOX"], None, dot) == "INBOX"
    assert map_folder(["INBOX", "Work"], None, dot) == "INBOX.Work"
    assert map_folder(["v1.2"], None, dot) == "INBOX.v1_2"
    assert map_folder(["Sent"], "\\Sent", slash) == "Gesendet"
    assert map_folder(["Sent"], "\\Sent", slash, automap=False) == "Sent"
    assert map_folder(["Sent"], "\\Sent", slash, into="Old/2020") == "Old/2020/Sent"
    assert map_folder(["INBOX"], None, dot, into="Old") == "INBOX.Old.INBOX"


def test_internal_date_keeps_the_offset() -> None:
    when = datetime(2022, 7, 1, 23, 59, 58, tzinfo=timezone(timedelta(hours=-3, minutes=-30)))
    assert internal_date(when) == b'"01-Jul-2022 23:59:58 -0330"'
    assert internal_date(datetime(2020, 2, 3, 4, 5, 6)) == b'"03-Feb-2020 04:05:06 +0000"'


def test_appenduid_and_message_id_parsing() -> None:
    assert parse_appenduid(b"[APPENDUID 17 4:6,9] Append completed.") == (17, [4, 5, 6, 9])
    assert parse_appenduid(b"Append completed.") == (None, [])
    assert message_id(b"Subject: x\r\nMessage-ID:\r\n <a@b>\r\n\r\nMessage-ID: <body@x>\r\n") == "<a@b>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n") is None


def test_keywords_only_where_the_mailbox_takes_them() -> None:
    flags = ("\\Seen", "$Label1", "bad word", "\\Recent")
    assert acceptable_flags(flags, frozenset({"\\Seen", "\\*"})) == ("\\Seen", "$Label1")
    assert acceptable_flags(flags, frozenset({"\\Seen"})) == ("\\Seen",)


# against Dovecot


@pytest.mark.parametrize("kind", STORES)
def test_every_store_restores_exactly(dovecot, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path, kind)
    summary = restore_to(target, url)
    assert summary.ok and summary.sent == count
    want, got = server_view(dovecot, source), server_view(dovecot, target)
    assert sorted(got) == sorted(want)
    for folder, messages in want.items():
        # SHA-256 of BODY[], flags minus \Recent, INTERNALDATE with its offset, in order
        assert [(hashlib.sha256(m[0]).hexdigest(), m[1], m[2]) for m in got[folder]] == [
            (hashlib.sha256(m[0]).hexdigest(), m[1], m[2]) for m in messages
        ], folder
    with dovecot.client(target) as imap:
        attributes = {name: flags for flags, _, name in imap.list_folders()}
    assert b"\\Sent" in attributes["Sent"]


def test_rerun_appends_nothing_and_mail_already_there_is_counted(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    assert restore_to(target, url).sent == count
    again = restore_to(target, url)
    assert (again.sent, again.as_dict()["done_before"]) == (0, count)
    # Into the account it came from: every message is found (by Message-ID + size, or by hash).
    home = restore_to(source, url)
    assert (home.sent, home.as_dict()["found"]) == (0, count)
    assert sum(len(v) for v in bodies(dovecot, source).values()) == count


def test_identical_messages_in_one_folder_are_all_restored(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    for _ in range(3):
        dovecot.append(source, "INBOX", b"Subject: same\r\nMessage-ID: <same@x>\r\n\r\nbody\r\n")
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    dovecot.append(target, "INBOX", b"Subject: same\r\nMessage-ID: <same@x>\r\n\r\nbody\r\n")
    summary = restore_to(target, url)
    assert (summary.sent, summary.as_dict()["found"]) == (2, 1)
    assert len(dovecot.fetch(target, "INBOX")) == 3


def test_special_use_folders_map_by_role(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = dovecot.add_user()
    dovecot.append(source, "INBOX", b"Subject: in\r\n\r\nbody\r\n")
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    # An archive from a server whose \Sent folder is called "Gesendet".
    store = open_store(url, mode="write")
    folder = store.catalog.ensure_folder(Folder("Gesendet", "/", frozenset({"\\Sent"})), "Gesendet")
    message = Message(raw=b"Subject: sent\r\n\r\nbody\r\n", flags=("\\Seen",), internal_date=datetime(2021, 1, 2, tzinfo=timezone.utc))
    store.catalog.add(folder.id, 1, list(zip([message], store.put(folder, [message]))))
    store.close()
    mapped, literal, under = dovecot.add_user(), dovecot.add_user(), dovecot.add_user()
    dovecot.append(mapped, "Sent", b"Subject: old\r\n\r\nbody\r\n")  # Dovecot gives "Sent" the \Sent role
    assert restore_to(mapped, url).ok
    assert [m.raw for m in dovecot.fetch(mapped, "Sent")][-1] == message.raw
    assert "Gesendet" not in dovecot.folders(mapped)
    dovecot.append(literal, "Sent", b"Subject: old\r\n\r\nbody\r\n")
    restore_to(literal, url, automap=False)
    assert [m.raw for m in dovecot.fetch(literal, "Gesendet")] == [message.raw]
    restore_to(under, url, into="Restored/2024")
    assert sorted(dovecot.folders(under)) == ["INBOX", "Restored/2024/Gesendet", "Restored/2024/INBOX"]
    assert dovecot.fetch(under, "INBOX") == []


def test_globs_and_dates_select_messages(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    for year in (2019, 2020, 2021):
        for folder in ("INBOX", "Archive/Old", "Spam"):
            dovecot.append(source, folder, f"Subject: {folder} {year}\r\n\r\nx\r\n".encode(), (), datetime(year, 6, 1, tzinfo=timezone.utc))
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    summary = restore_to(target, url, include=("INBOX", "Archive/*"), exclude=("Spam",), since=date(2020, 1, 1), before=date(2021, 1, 1))
    assert summary.sent == 2
    assert bodies(dovecot, target) == {"INBOX": [b"Subject: INBOX 2020\r\n\r\nx\r\n"], "Archive/Old": [b"Subject: Archive/Old 2020\r\n\r\nx\r\n"]}


def test_dry_run_prints_the_plan_and_leaves_target_untouched(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    url, count = seeded_archive(dovecot, source, tmp_path)
    before = bodies(dovecot, target)
    env = {**os.environ, "MAILBACKUP_PASSWORD": target.password}
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "restore", url, target.url("imap"), "--no-tls", "--dry-run"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Entwürfe/Ökonomie -> Entwürfe/Ökonomie: 34 messages" in done.stdout
    assert f"total: {count} messages" in done.stdout
    assert bodies(dovecot, target) == before == {"INBOX": []}
    store = open_store(url, mode="read")
    assert not Journal(store.catalog.engine, "x", "y", create=False).exists
    store.close()


def test_kill_9_mid_restore_then_rerun_leaves_no_duplicate(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    total = 1500
    dovecot.seed_maildir(
        source, "INBOX",
        ((b"Subject: %d\r\nMessage-ID: <%d@k>\r\n\r\n%s\r\n" % (i, i, b"x" * 3000), "S", 1.6e9 + i) for i in range(total)),
    )
    url = archive_url("maildir", tmp_path)
    run_backup(source, url)
    env = {**os.environ, "MAILBACKUP_PASSWORD": target.password}
    command = [sys.executable, "-m", "mailbackup", "restore", url, target.url("imap"), "--no-tls", "-q", "--batch-messages", "5"]
    with dovecot.client(target) as watch:
        for goal in (100, 600):  # kill once the target holds this many, twice
            process = subprocess.Popen(command, env=env, cwd=ROOT)
            while process.poll() is None and watch.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] < goal:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait()
    partial = len(dovecot.fetch(target, "INBOX"))
    assert 0 < partial < total, "the kill did not land mid-run"
    finished = subprocess.run(command + ["--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    served = [m.raw for m in dovecot.fetch(target, "INBOX")]
    assert len(served) == len(set(served)) == total
    assert result["sent"] + result["recovered"] + result["found"] + result["done_before"] == total


class UploadCutter:
    """Loopback proxy to a real server. Once the client has sent `after` bytes it either
    closes both sides at once ("cut": mid-APPEND), or keeps forwarding the client's bytes
    but swallows the server's replies for a moment, then closes ("mute": the APPEND
    arrives, its tagged OK never does). Only the first connection is disturbed."""

    def __init__(self, port: int, after: int, mode: str) -> None:
        self.port, self.after, self.mode = port, after, mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.local_port = self.listener.getsockname()[1]
        self.connections = 0
        self.muted = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            disturb = self.connections == 0
            self.connections += 1
            threading.Thread(target=self.upload, args=(client, server, disturb), daemon=True).start()
            threading.Thread(target=self.download, args=(server, client, disturb), daemon=True).start()

    def upload(self, client: socket.socket, server: socket.socket, disturb: bool) -> None:
        sent = 0
        muted_here = False
        try:
            while data := client.recv(65536):
                if disturb and not muted_here and sent + len(data) >= self.after:
                    if self.mode == "cut":
                        server.sendall(data[: self.after - sent])
                        break
                    muted_here = True
                    self.muted.set()
                    # Let the server finish what it receives, then drop the line.
                    threading.Timer(1.0, self.close, args=(client, server)).start()
                server.sendall(data)
                sent += len(data)
        except OSError:
            pass
        if not muted_here:
            self.close(client, server)

    def download(self, server: socket.socket, client: socket.socket, disturb: bool) -> None:
        try:
            while data := server.recv(65536):
                if not (disturb and self.muted.is_set()):
                    client.sendall(data)
        except OSError:
            pass

    @staticmethod
    def close(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def url(self, account) -> str:  # type: ignore[no-untyped-def]
        return f"imap://{account.user}@127.0.0.1:{self.local_port}"


@pytest.mark.parametrize("mode", ["cut", "mute"])
def test_dropped_connection_mid_append_then_rerun_completes_without_duplicates(dovecot, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    source, target = dovecot.add_user(), dovecot.add_user()
    total = 200
    dovecot.seed_maildir(
        source, "INBOX",
        ((b"Subject: %d\r\nMessage-ID: <%d@cut>\r\n\r\n%s\r\n" % (i, i, b"y" * 5000), "", 1.6e9 + i) for i in range(total)),
    )
    # Messages without a Message-ID are matched by hash on resume.
    dovecot.seed_maildir(source, "Notes", ((b"Subject: note %d\r\n\r\n%s\r\n" % (i, b"z" * 5000), "S", 1.6e9) for i in range(60)))
    url = archive_url("sqlite", tmp_path)
    run_backup(source, url)
    proxy = UploadCutter(dovecot.imap_port, after=400_000, mode=mode)
    options = RestoreOptions(no_tls=True, batch_messages=20, reconnects=0)
    with pytest.raises(ConnectionLost):
        restore(url, proxy.url(target), password=target.password, options=options)
    engine = state_engine(default_state_path("restore"), dry_run=True)
    journal = Journal(engine, open_store(url, mode="read").url, f"imap://{target.user}@127.0.0.1:{proxy.local_port}", create=False)
    in_flight = sum(r.state == IN_FLIGHT for folder in ("INBOX", "Notes") for r in journal.records(folder, folder).values())
    engine.dispose()
    assert in_flight > 0
    landed = sum(len(v) for v in bodies(dovecot, target).values())
    summary = restore(url, proxy.url(target), password=target.password, options=options)
    assert summary.ok
    got = bodies(dovecot, target)
    assert len(got["INBOX"]) == len(set(got["INBOX"])) == total
    assert len(got["Notes"]) == len(set(got["Notes"])) == 60
    if mode == "mute":  # the APPEND landed but its OK was lost: found on resume, not sent again
        assert summary.as_dict()["recovered"] > 0
        assert landed > 0


def test_a_big_message_already_on_the_target_is_found_by_hash(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mailbackup import BackupOptions, backup

    source = dovecot.add_user()
    big = b"Subject: no message-id, bigger than a header\r\n\r\n" + b"z" * (3 << 20) + b"\r\n"
    dovecot.append(source, "INBOX", big)
    url = str(tmp_path / "a.sqlite")
    backup(source.url("imap"), url, password=source.password, options=BackupOptions(no_tls=True, index=False))
    home = restore_to(source, url)  # hashing the target's copy reads a 3 MB literal
    assert home.ok and (home.sent, home.as_dict()["found"]) == (0, 1)
