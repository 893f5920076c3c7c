"""The command line: TLS and credentials, exit codes, summaries, and hostile servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup.cli import main
from mailbackup.sources import Fetched
from mailbackup.sources import imap as imap_source
from tests.archive_view import archived
from tests.fakes import FakeImap
from tests.servers.dovecot import free_port


def invoke(*args: str, password: str | None = None, **env: str):  # type: ignore[no-untyped-def]
    environment = {"MAILBACKUP_PASSWORD": password} if password else {"MAILBACKUP_PASSWORD": ""}
    environment.update(env)
    return CliRunner().invoke(main, list(args), env=environment, catch_exceptions=False)


@pytest.fixture
def mailbox_with_mail(dovecot, account):  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: one\r\n\r\nbody\r\n", ("\\Seen",))
    dovecot.append(account, "Sent", b"Subject: two\r\n\r\nbody\r\n")
    return account


def test_implicit_tls_with_private_ca(dovecot, mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", mailbox_with_mail.url("imaps"), str(tmp_path / "a.db"), "--ca-file", str(dovecot.cert_path), "--json", password=mailbox_with_mail.password)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 2


def test_starttls_with_private_ca(dovecot, mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--ca-file", str(dovecot.cert_path), password=mailbox_with_mail.password)
    assert result.exit_code == 0, result.output
    assert "2 new messages" in result.stdout


def test_unverified_certificate_is_refused(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for scheme in ("imaps", "imap"):
        result = invoke("backup", mailbox_with_mail.url(scheme), str(tmp_path / "a.db"), password=mailbox_with_mail.password)
        assert result.exit_code == 3
        assert "certificate" in result.stderr and "--ca-file" in result.stderr


def test_missing_starttls_stops_before_credentials(tmp_path: Path) -> None:
    with FakeImap({"INBOX": [b"Subject: x\r\n\r\ny\r\n"]}) as fake:
        result = invoke("backup", fake.url(), str(tmp_path / "a.db"), password="secret")
        assert result.exit_code == 3
        assert "STARTTLS" in result.stderr
        assert "LOGIN" not in fake.commands and "AUTHENTICATE" not in fake.commands


def test_no_tls_warns_and_works(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--no-tls", password=mailbox_with_mail.password)
    assert result.exit_code == 0
    assert "cleartext" in result.stderr


def test_wrong_password_exits_3(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--no-tls", password="wrong")
    assert result.exit_code == 3
    assert "login" in result.stderr and "wrong" not in result.stderr


def test_connection_refused_exits_3(tmp_path: Path) -> None:
    result = invoke("backup", f"imaps://a@127.0.0.1:{free_port()}", str(tmp_path / "a.db"), password="x")
    assert result.exit_code == 3
    assert "cannot connect" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("backup", "imap://a@127.0.0.1:1", "notes.txt", "--no-tls"),
        ("backup", "ftp://a@127.0.0.1", "a.db"),
        ("backup", "imap://a:pw@127.0.0.1", "a.db"),
        ("backup", "imap://a@127.0.0.1", "a.db", "--bogus"),
        ("ls", "maildir:/nonexistent/archive"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, password="x")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_no_password_source_without_a_terminal_exits_2(tmp_path: Path) -> None:
    result = invoke("backup", "imap://a@127.0.0.1:1", str(tmp_path / "a.db"), "--no-tls")
    assert result.exit_code == 2
    assert "--password-file" in result.stderr


def test_password_file_and_command(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "pw"
    secret.write_text(mailbox_with_mail.password + "\n")
    url = mailbox_with_mail.url("imap")
    assert invoke("backup", url, str(tmp_path / "a.db"), "--no-tls", "--password-file", str(secret)).exit_code == 0
    assert invoke("backup", url, str(tmp_path / "b.db"), "--no-tls", "--password-command", f"cat {secret}").exit_code == 0
    failing = invoke("backup", url, str(tmp_path / "c.db"), "--no-tls", "--password-command", "exit 4")
    assert failing.exit_code == 2 and "exited with 4" in failing.stderr


def test_partial_failure_exits_1_and_lists_uids(mailbox_with_mail, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    original = imap_source.ImapSource.fetch

    def lose_first(self, batch, resume=None):  # type: ignore[no-untyped-def]
        fetched = list(original(self, batch, resume or {}))
        first = next((f for f in fetched if f.message is not None), None)
        return iter([Fetched(f.id, None, "server sent no body") if f is first else f for f in fetched])

    monkeypatch.setattr(imap_source.ImapSource, "fetch", lose_first)
    result = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--no-tls", "--json", password=mailbox_with_mail.password)
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert summary["failed"] == {"INBOX": ["UID 1: server sent no body"], "Sent": ["UID 1: server sent no body"]}
    monkeypatch.undo()
    # The rerun finishes the job.
    rerun = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--no-tls", "--json", password=mailbox_with_mail.password)
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["new"] == 2


def test_ls_lists_folders_counts_and_bytes(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    archive = f"maildir:{tmp_path / 'md'}"
    invoke("backup", mailbox_with_mail.url("imap"), archive, "--no-tls", password=mailbox_with_mail.password)
    text = invoke("ls", archive).stdout
    assert "INBOX" in text and "Sent" in text and "total" in text
    rows = [json.loads(line) for line in invoke("ls", archive, "--json").stdout.splitlines()]
    assert {r["folder"]: r["messages"] for r in rows}["INBOX"] == 1
    assert sum(r["bytes"] for r in rows) == len(b"Subject: one\r\n\r\nbody\r\n") * 2


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_hostile_folder_names_cannot_escape_the_archive(tmp_path: Path, kind: str) -> None:
    names = ["../../escape", "/etc/cron.d/x", "a/../../b", "..", "nul\x00byte", "INBOX"]
    folders = {name: [f"Subject: {i}\r\n\r\nbody\r\n".encode()] for i, name in enumerate(names)}
    root = tmp_path / "inside"
    root.mkdir()
    before = set(tmp_path.rglob("*"))
    with FakeImap(folders) as fake:
        result = invoke("backup", fake.url(), f"{kind}:{root / 'archive'}", "--no-tls", "--json", password="x")
    assert result.exit_code == 0, result.output
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.resolve().is_relative_to(root / "archive") for p in created)
    view = archived(f"{kind}:{root / 'archive'}")
    assert sorted(view) == sorted(names)
    assert all(len(view[name]) == 1 for name in names)


def test_verbose_output_shows_no_password_or_body(mailbox_with_mail, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = invoke("backup", mailbox_with_mail.url("imap"), str(tmp_path / "a.db"), "--no-tls", "-vv", password=mailbox_with_mail.password)
    assert result.exit_code == 0
    assert mailbox_with_mail.password not in result.output
    assert "body" not in result.output
