"""OAuth2 (XOAUTH2, OAUTHBEARER) logins against Dovecot's oauth2 passdb and a local introspection endpoint."""

from __future__ import annotations

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

from mailbackup.cli import main
from servers.dovecot import Dovecot

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
