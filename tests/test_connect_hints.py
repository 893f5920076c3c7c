"""Connecting: --timeout covers connect, TLS and greeting; a TLS/plain port mix-up gets a hint;
a folder pattern that matches nothing is a usage error that lists the server's folders."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup.cli import main


def invoke(*args: str, password: str = "x"):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": password}, catch_exceptions=False)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listener that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("scheme", ["imap", "imaps", "pop3", "pop3s"])
def test_a_server_that_never_greets_hits_the_timeout(silent_port: int, tmp_path: Path, scheme: str) -> None:
    started = time.monotonic()
    args = ["backup", f"{scheme}://a@127.0.0.1:{silent_port}", str(tmp_path / "a.db"), "--timeout", "2"]
    result = invoke(*args, *(["--no-tls"] if not scheme.endswith("s") else []))
    elapsed = time.monotonic() - started
    assert result.exit_code == 3, result.output
    assert "timed out" in result.output and "Traceback" not in result.output
    assert elapsed < 4


def test_imaps_to_a_plain_port_says_so(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", f"imaps://{account.user}@127.0.0.1:{dovecot.imap_port}", str(tmp_path / "a.db"), "--timeout", "5")
    assert result.exit_code == 3
    assert "plain-text port: use imap://" in result.output and result.output.count("\n") == 1


def test_imap_to_an_implicit_tls_port_says_so(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    url = f"imap://{account.user}@127.0.0.1:{dovecot.imaps_port}"
    result = invoke("backup", url, str(tmp_path / "a.db"), "--timeout", "2", password=account.password)
    assert result.exit_code == 3
    assert f"if {dovecot.imaps_port} is an implicit-TLS port, use imaps://" in result.output
    assert time.monotonic() - started < 10


def test_pop3s_to_a_plain_port_says_so(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", f"pop3s://{account.user}@127.0.0.1:{dovecot.pop3_port}", str(tmp_path / "a.db"), "--timeout", "5")
    assert result.exit_code == 3
    assert "plain-text port: use pop3://" in result.output


def test_a_folder_glob_that_matches_nothing_exits_2_listing_the_folders(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "Projects", b"Subject: p\r\n\r\nbody\r\n")
    archive = tmp_path / "a.db"
    result = invoke("backup", account.url("imap"), str(archive), "--no-tls", "--folder", "Projcts*", password=account.password)
    assert result.exit_code == 2
    assert "--folder 'Projcts*' matches no folder" in result.output and "INBOX, Projects" in result.output
    excluded = invoke("backup", account.url("imap"), str(archive), "--no-tls", "--exclude", "Spam", password=account.password)
    assert excluded.exit_code == 2 and "--exclude 'Spam'" in excluded.output
