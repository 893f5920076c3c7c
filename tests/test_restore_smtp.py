"""Resend an archive over SMTP to a real aiosmtpd server (STARTTLS or implicit TLS, AUTH)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailbackup.restore import RestoreOptions, restore
from tests.archive_view import archived
from tests.servers.dovecot import free_port
from tests.test_backup_imap import archive_url, run_backup

ROOT = Path(__file__).parent.parent
USER, PASSWORD = "sender@example.org", "smtp-secret"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    at: float


@dataclass
class Handler:
    """Accepts everything, except: scripted replies for the next DATA commands, and
    a 550 for any message whose bytes contain b'REJECT-ME'."""

    script: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        with self.lock:
            self.attempts += 1
            if self.script:
                return self.script.pop(0)
            if b"REJECT-ME" in envelope.original_content:
                return "550 5.7.1 message refused"
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, time.monotonic()))
        return "250 2.0.0 queued"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    handler: Handler
    port: int
    ca_file: str
    implicit: bool

    def url(self) -> str:
        return f"{'smtps' if self.implicit else 'smtp'}://{USER}@127.0.0.1:{self.port}"


def start(dovecot, implicit: bool) -> Iterator[SmtpServer]:  # type: ignore[no-untyped-def]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(dovecot.cert_path), str(dovecot.cert_path.with_name("key.pem")))
    handler = Handler()
    port = free_port()
    # aiosmtpd counts only STARTTLS as TLS for auth_require_tls: on implicit TLS it
    # would not offer AUTH at all.
    kwargs = (
        {"ssl_context": context, "auth_require_tls": False}
        if implicit
        else {"tls_context": context, "require_starttls": True}
    )
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, authenticator=authenticator, auth_required=True, **kwargs
    )
    controller.start()
    try:
        yield SmtpServer(handler, port, str(dovecot.cert_path), implicit)
    finally:
        controller.stop()


@pytest.fixture
def smtp(dovecot) -> Iterator[SmtpServer]:  # type: ignore[no-untyped-def]
    yield from start(dovecot, implicit=False)


@pytest.fixture
def smtps(dovecot) -> Iterator[SmtpServer]:  # type: ignore[no-untyped-def]
    yield from start(dovecot, implicit=True)


def make_archive(dovecot, account, tmp_path: Path, raws: list[bytes]) -> str:  # type: ignore[no-untyped-def]
    for raw in raws:
        dovecot.append(account, "INBOX", raw, ("\\Seen",))
    url = archive_url("sqlite", tmp_path)
    run_backup(account, url)
    return url


def resend(server: SmtpServer, url: str, **options) -> object:  # type: ignore[no-untyped-def]
    options.setdefault("recipients", ("rcpt@example.net",))
    return restore(url, server.url(), password=PASSWORD, options=RestoreOptions(ca_file=server.ca_file, **options))


RAWS = [
    b"From: a@example.org\r\nSubject: one\r\nMessage-ID: <1@x>\r\n\r\nfirst\r\n.\r\n..dots\r\n",
    "From: b@example.org\r\nSubject: Grüße\r\n\r\n8-bit body: naïve café\r\n".encode(),
    b"From: c@example.org\r\nSubject: three\r\n\r\nthird\r\n",
]


def test_resend_delivers_the_archived_bytes_over_starttls(dovecot, account, smtp: SmtpServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(dovecot, account, tmp_path, RAWS)
    summary = resend(smtp, url, recipients=("x@example.net", "y@example.net"), sender="bounce@example.org")
    assert summary.ok and summary.sent == 3
    want = sorted(m.raw for m in archived(url)["INBOX"])
    assert sorted(r.content for r in smtp.handler.received) == want
    assert {(r.mail_from, tuple(r.rcpt_tos)) for r in smtp.handler.received} == {("bounce@example.org", ("x@example.net", "y@example.net"))}
    again = resend(smtp, url, recipients=("x@example.net", "y@example.net"), sender="bounce@example.org")
    assert (again.sent, again.as_dict()["done_before"]) == (0, 3)
    assert len(smtp.handler.received) == 3


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtps_with_resent_headers_keeps_the_message_below_them(dovecot, account, smtps: SmtpServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(dovecot, account, tmp_path, RAWS[:1])
    assert resend(smtps, url, resent=True).ok
    [got] = smtps.handler.received
    assert got.mail_from == USER  # the login, as no --from was given
    head, _, rest = got.content.partition(b"From: a@example.org")
    assert rest and got.content.endswith(RAWS[0])
    assert b"Resent-From: <sender@example.org>\r\n" in head and b"Resent-To: <rcpt@example.net>\r\n" in head
    assert b"Resent-Date: " in head and b"Resent-Message-ID: <" in head


def test_rate_is_honoured(dovecot, account, smtp: SmtpServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(dovecot, account, tmp_path, [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(4)])
    assert resend(smtp, url, rate_per_minute=150).ok  # one every 0.4 s
    times = [r.at for r in smtp.handler.received]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.38, gaps


def test_451_once_then_accepted_arrives_once(dovecot, account, smtp: SmtpServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(dovecot, account, tmp_path, RAWS[:1])
    smtp.handler.script.append("451 4.3.0 try again later")
    summary = resend(smtp, url, backoff=0.05)
    assert summary.ok and summary.sent == 1
    assert smtp.handler.attempts == 2
    assert [r.content for r in smtp.handler.received] == [RAWS[0]]


def test_550_is_listed_and_the_exit_code_is_1(dovecot, account, smtp: SmtpServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = make_archive(dovecot, account, tmp_path, [RAWS[0], b"Subject: REJECT-ME\r\n\r\nx\r\n", RAWS[2]])
    env = {**os.environ, "MAILBACKUP_PASSWORD": PASSWORD}
    command = [sys.executable, "-m", "mailbackup", "restore", url, smtp.url(), "--ca-file", smtp.ca_file, "--to", "r@example.net"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "550 5.7.1 message refused" in done.stderr
    assert len(smtp.handler.received) == 2
    # The failure is journalled: a rerun sends nothing new and still reports it.
    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert len(smtp.handler.received) == 2
    assert again.returncode == 1 and "550" in again.stderr


@pytest.mark.parametrize("address", ["a@example.net\r\nRCPT TO:<evil@x>", "a@example.net\n", "a\0@x"])
def test_addresses_with_cr_lf_or_nul_are_refused(tmp_path: Path, address: str) -> None:
    from click.testing import CliRunner

    from mailbackup.cli import main

    for option in ("--to", "--from"):
        args = ["restore", str(tmp_path / "none.sqlite"), "smtp://u@127.0.0.1:1", "--to", "ok@example.net", option, address]
        done = CliRunner().invoke(main, args, env={"MAILBACKUP_PASSWORD": "x"})
        assert done.exit_code == 2
        assert "CR, LF or NUL" in done.output


def test_smtp_without_starttls_sends_no_credentials(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import TLSError

    url = make_archive(dovecot, account, tmp_path, RAWS[:1])
    handler = Handler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with pytest.raises(TLSError):
            restore(url, f"smtp://{USER}@127.0.0.1:{port}", password=PASSWORD, options=RestoreOptions(recipients=("r@x.net",)))
    finally:
        controller.stop()
    assert handler.received == []
