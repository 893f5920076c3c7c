"""OAuth2 (XOAUTH2, OAUTHBEARER) logins against Dovecot's oauth2 passdb and a local introspection endpoint."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from click.testing import CliRunner
from servers.dovecot import Dovecot

from mailbackup.cli import main

TOKENS: dict[str, str] = {}


class Introspection(BaseHTTPRequestHandler):
    """RFC 7662-style token introspection: POST token=..., answer active + username."""

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        token = parse_qs(body).get("token", [""])[0]
        user = TOKENS.get(token)
        reply = json.dumps({"active": True, "username": user} if user else {"active": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def dovecot_oauth() -> Iterator[Dovecot]:
    http = ThreadingHTTPServer(("127.0.0.1", 0), Introspection)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    directory = tempfile.mkdtemp(prefix="mboa", dir="/tmp")
    server = Dovecot().start(directory, oauth2_url=f"http://127.0.0.1:{http.server_address[1]}/introspect")
    try:
        yield server
    finally:
        server.stop()
        http.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": ""}, catch_exceptions=False)


@pytest.mark.parametrize(("scheme", "mechanism"), [("imap", "xoauth2"), ("imap", "oauthbearer"), ("pop3", "xoauth2"), ("pop3", "oauthbearer")])
def test_oauth2_login_backs_up(dovecot_oauth: Dovecot, tmp_path: Path, scheme: str, mechanism: str) -> None:
    account = dovecot_oauth.add_user()
    dovecot_oauth.append(account, "INBOX", b"Subject: oauth\r\n\r\nbody\r\n")
    token = f"tok-{account.user}-{mechanism}"
    TOKENS[token] = account.user
    result = invoke(
        "backup", account.url(scheme), str(tmp_path / "a.db"), "--no-tls", "--json",
        "--oauth2-token-command", f"echo {token}", "--oauth2-mechanism", mechanism,
    )
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert json.loads(result.stdout)["new"] == 1  # type: ignore[attr-defined]


def test_rejected_token_exits_3_without_echoing_it(dovecot_oauth: Dovecot, tmp_path: Path) -> None:
    account = dovecot_oauth.add_user()
    result = invoke("backup", account.url("imap"), str(tmp_path / "a.db"), "--no-tls", "-vv", "--oauth2-token-command", "echo not-a-valid-token-xyz")
    assert result.exit_code == 3  # type: ignore[attr-defined]
    assert "not-a-valid-token-xyz" not in result.output  # type: ignore[attr-defined]


def archive_of(server: Dovecot, tmp_path: Path, raws: list[bytes]) -> str:
    from mailbackup import BackupOptions, backup

    account = server.add_user()
    for raw in raws:
        server.append(account, "INBOX", raw)
    archive = str(tmp_path / "a.db")
    backup(account.url("imap"), archive, password=account.password, options=BackupOptions(no_tls=True))
    return archive


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_restore_logs_in_to_an_imap_target_with_oauth2(dovecot_oauth: Dovecot, tmp_path: Path, mechanism: str) -> None:
    raws = [b"Subject: back %d\r\n\r\nbody\r\n" % i for i in range(3)]
    archive = archive_of(dovecot_oauth, tmp_path, raws)
    target = dovecot_oauth.add_user()
    token = f"tok-{target.user}-restore"
    TOKENS[token] = target.user
    result = invoke("restore", archive, target.url("imap"), "--no-tls", "--json",
                    "--oauth2-token-command", f"echo {token}", "--oauth2-mechanism", mechanism)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert sorted(m.raw for m in dovecot_oauth.fetch(target, "INBOX")) == sorted(raws)


class OAuthSmtp:
    """An SMTP server that accepts XOAUTH2 and OAUTHBEARER for one user and token."""

    user, token = "sender@example.org", "smtp-token-123"

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        self.received.append(envelope.original_content)
        return "250 2.0.0 queued"

    async def auth_XOAUTH2(self, server, args):  # type: ignore[no-untyped-def]  # noqa: N802
        from aiosmtpd.smtp import AuthResult

        sent = base64.b64decode(args[1]).decode() if len(args) > 1 else ""
        return AuthResult(success=sent == f"user={self.user}\x01auth=Bearer {self.token}\x01\x01", handled=False)

    async def auth_OAUTHBEARER(self, server, args):  # type: ignore[no-untyped-def]  # noqa: N802
        from aiosmtpd.smtp import AuthResult

        sent = base64.b64decode(args[1]).decode() if len(args) > 1 else ""
        ok = sent.startswith(f"n,a={self.user},") and f"\x01auth=Bearer {self.token}\x01\x01" in sent
        return AuthResult(success=ok, handled=False)


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_smtp_resend_logs_in_with_oauth2(dovecot_oauth: Dovecot, tmp_path: Path, mechanism: str) -> None:
    from aiosmtpd.controller import Controller
    from servers.dovecot import free_port

    raws = [b"Subject: resend\r\n\r\nbody\r\n"]
    archive = archive_of(dovecot_oauth, tmp_path, raws)
    handler = OAuthSmtp()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, auth_required=True, auth_require_tls=False)
    controller.start()
    try:
        url = f"smtp://{OAuthSmtp.user}@127.0.0.1:{port}"
        bad = invoke("restore", archive, url, "--no-tls", "--to", "me@example.org",
                     "--oauth2-token-command", "echo wrong-token", "--oauth2-mechanism", mechanism)
        assert bad.exit_code == 3 and handler.received == []  # type: ignore[attr-defined]
        good = invoke("restore", archive, url, "--no-tls", "--to", "me@example.org",
                      "--oauth2-token-command", f"echo {OAuthSmtp.token}", "--oauth2-mechanism", mechanism)
        assert good.exit_code == 0, good.output  # type: ignore[attr-defined]
    finally:
        controller.stop()
    assert handler.received == raws


def test_verify_against_logs_in_with_oauth2(dovecot_oauth: Dovecot, tmp_path: Path) -> None:
    account = dovecot_oauth.add_user()
    dovecot_oauth.append(account, "INBOX", b"Subject: oauth\r\n\r\nbody\r\n")
    token = f"tok-{account.user}-verify"
    TOKENS[token] = account.user
    archive = str(tmp_path / "a.db")
    login = ("--no-tls", "--oauth2-token-command", f"echo {token}")
    assert invoke("backup", account.url("imap"), archive, *login).exit_code == 0  # type: ignore[attr-defined]
    result = invoke("verify", archive, "--against", account.url("imap"), *login)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert "1 compared with the server" in result.stdout  # type: ignore[attr-defined]
