"""Built-in OAuth2 sign-in: `mailbackup login`, rotating refresh tokens, and real IMAP logins with them.

The provider is tests/oauth_provider.py, a stand-in built to the specs and the providers'
documentation (Google and Microsoft cannot be reached from here); Dovecot's oauth2 passdb
checks every access token against it, so each IMAP login below is real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from oauth_provider import Provider
from servers.dovecot import Account, Dovecot

from mailbackup import config, oauth
from mailbackup.errors import ConfigError

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    server = Provider().start()
    try:
        yield server
    finally:
        server.release()
        server.stop()


@pytest.fixture(scope="module")
def dovecot_idp(provider: Provider) -> Iterator[Dovecot]:
    directory = tempfile.mkdtemp(prefix="mbli", dir="/tmp")
    server = Dovecot().start(directory, oauth2_url=f"{provider.base_url}/introspect")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Setup:
    """One mailbox, one config file naming it with `oauth2 = {...}`, one private state directory."""

    account: Account
    config: Path
    state: Path
    archive: Path
    name: str = "work"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "XDG_STATE_HOME": str(self.state), "BROWSER": "true", "PYTHONPATH": str(ROOT)}

    def settings(self) -> oauth.OAuth2Settings:
        settings = config.load(self.config)[self.name].oauth2
        assert settings is not None
        return settings

    @property
    def token_file(self) -> Path:
        return self.state / "mailbackup" / f"oauth2-{self.settings().store_key}.json"

    def refresh_token(self) -> str:
        return str(json.loads(self.token_file.read_text())["refresh_token"])

    def mailbackup(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "mailbackup", *args], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def backup(self) -> subprocess.CompletedProcess[str]:
        proc = self.mailbackup("backup", "--config", str(self.config), "--account", self.name, "--json")
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def setup(dovecot_idp: Dovecot, provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    account = dovecot_idp.add_user()
    dovecot_idp.append(account, "INBOX", b"Subject: signed in\r\n\r\nbody\r\n")
    provider.user = account.user
    provider.release()
    path = tmp_path / "config.toml"
    path.write_text(
        f'[accounts.work]\nsource = "{account.url("imap")}"\narchive = "{tmp_path / "a.db"}"\nno_tls = true\n'
        f"{provider.config_table()}\n"
    )
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return Setup(account, path, tmp_path / "state", tmp_path / "a.db")


def play_browser(url: str) -> requests.Response:
    """What the user's browser does: the provider approves at once and redirects to the loopback listener."""
    answer = requests.get(url, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return requests.get(answer.headers["Location"], timeout=10)


def sign_in(setup: Setup) -> str:
    """PKCE login in-process (the browser in a thread); returns the first refresh token."""
    opened: list[str] = []

    def open_browser(url: str) -> None:
        opened.append(url)
        threading.Thread(target=play_browser, args=(url,), daemon=True).start()

    oauth.login(setup.settings(), device=False, say=lambda line: None, open_browser=open_browser, timeout=30)
    assert opened
    return setup.refresh_token()


def read_until(stream: object, needle: str, timeout: float = 20) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never came; got {lines}")


def test_device_login_then_backup_logs_in_with_the_issued_token(setup: Setup, provider: Provider) -> None:
    proc = setup.mailbackup("login", setup.name, "--config", str(setup.config), "--device")
    lines = read_until(proc.stderr, "enter the code")
    user_code = lines[-1].split()[-1]
    assert f"{provider.base_url}/activate" in lines[-1]
    assert proc.poll() is None  # polling: authorization_pending until the user approves
    requests.get(f"{provider.base_url}/activate", params={"user_code": user_code}, timeout=10)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert str(setup.token_file) in err
    seen = len(provider.state.introspected)
    result = setup.backup()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accounts"]["work"]["new"] == 1
    used = provider.state.introspected[seen:]
    assert used and provider.state.access[used[-1]][0] == setup.account.user


def test_device_polling_slows_down_when_told() -> None:
    """RFC 8628 §3.5: slow_down adds 5 seconds to the interval, for that poll and all later ones."""
    from unittest import mock

    from authlib.integrations.base_client import OAuthError

    settings = oauth.parse(
        {"provider": "custom", "client_id": "c", "token_url": "http://127.0.0.1:9/t",
         "device_authorization_url": "http://127.0.0.1:9/d", "scopes": ["s"]},
        account="a", source="imap://u@h", config_file=None, where="test",
    )
    waits: list[float] = []
    answers = iter([OAuthError("authorization_pending"), OAuthError("slow_down"), OAuthError("authorization_pending"),
                    {"access_token": "at", "refresh_token": "rt"}])

    def fetch_token(*args: object, **kwargs: object) -> object:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    grant = {"device_code": "d", "user_code": "U", "verification_uri": "https://x/activate", "interval": 2, "expires_in": 600}
    with mock.patch("mailbackup.oauth.flows._session") as session, mock.patch("time.sleep", waits.append):
        session.return_value.client_secret = None
        session.return_value.post.return_value.json.return_value = grant
        session.return_value.fetch_token.side_effect = fetch_token
        token = oauth.flows._device_login(settings, lambda line: None, timeout=600)
    assert token["refresh_token"] == "rt"
    assert waits == [2, 2, 7, 7]


def test_three_runs_each_rotate_the_refresh_token_and_keep_working(setup: Setup, provider: Provider) -> None:
    tokens = [sign_in(setup)]
    for _ in range(3):
        result = setup.backup()
        assert result.returncode == 0, result.stderr
        tokens.append(setup.refresh_token())
    assert len(set(tokens)) == 4, "each run saves the rotated refresh token"
    assert not provider.refresh_token_works(tokens[0]) and not provider.refresh_token_works(tokens[1])
    assert provider.refresh_token_works(tokens[-1])


def test_kill_9_during_a_refresh_leaves_a_usable_token(setup: Setup, provider: Provider) -> None:
    before = sign_in(setup)
    provider.stall_refreshes(60)
    proc = setup.mailbackup("backup", "--config", str(setup.config), "--account", setup.name)
    try:
        assert provider.stalled.wait(30), "the refresh never reached the provider"
        proc.send_signal(signal.SIGKILL)  # the provider has rotated; its answer never arrives
        proc.wait(timeout=10)
    finally:
        provider.release()
    assert setup.refresh_token() == before
    assert list(setup.token_file.parent.glob(".*.tmp")) == []
    result = setup.backup()
    assert result.returncode == 0, result.stderr
    assert setup.refresh_token() != before


def test_the_rotated_token_is_saved_before_the_access_token_is_used(setup: Setup, provider: Provider) -> None:
    before = sign_in(setup)
    provider.stall_logins()
    proc = setup.mailbackup("backup", "--config", str(setup.config), "--account", setup.name)
    try:
        assert provider.stalled.wait(30), "the IMAP login never reached the provider"
        saved = setup.refresh_token()  # the client is mid-login with the new access token
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        provider.release()
    assert saved != before and provider.refresh_token_works(saved)
    assert setup.backup().returncode == 0


@pytest.mark.parametrize("ending", ["revoke", "expire"])
def test_a_revoked_or_expired_grant_exits_3_with_the_login_command(setup: Setup, provider: Provider, ending: str) -> None:
    sign_in(setup)
    getattr(provider, ending)()
    result = setup.backup()
    assert result.returncode == 3, result.stderr
    assert f"mailbackup login work --config {setup.config}" in result.stderr
    assert "expired or was revoked" in result.stderr


def test_pkce_loopback_login_checks_state_and_signs_in(setup: Setup, provider: Provider) -> None:
    proc = setup.mailbackup("login", setup.name, "--config", str(setup.config))
    lines = read_until(proc.stderr, f"{provider.base_url}/authorize")
    url = lines[-1].strip()
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    redirect = urlsplit(query["redirect_uri"][0])
    assert redirect.hostname == "127.0.0.1" and redirect.port
    forged = requests.get(f"{query['redirect_uri'][0]}?code=stolen&state=wrong", timeout=10)
    assert forged.status_code == 400  # a foreign answer is refused, and the real one still awaited
    assert proc.poll() is None
    done = play_browser(url)
    assert done.status_code == 200 and "signed in" in done.text
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = setup.backup()
    assert result.returncode == 0, result.stderr


def test_concurrent_refreshes_keep_a_valid_token(setup: Setup, provider: Provider) -> None:
    sign_in(setup)
    # The first refresh's answer comes late. A second run reading the token meanwhile would spend
    # the same one, and the late answer's token, saved last, would be dead. The lock prevents that.
    # The second run is `mailbackup token` (a restore's --oauth2-token-command): the same archive
    # cannot take two backups at once.
    provider.stall_refreshes(3, count=1)
    backup = setup.mailbackup("backup", "--config", str(setup.config), "--account", setup.name)
    assert provider.stalled.wait(30)
    token = setup.mailbackup("token", setup.name, "--config", str(setup.config))
    printed, err = token.communicate(timeout=60)
    assert token.returncode == 0, err
    assert provider._introspect(printed.strip())[1] == json.dumps({"active": True, "username": setup.account.user}).encode()
    _, err = backup.communicate(timeout=60)
    assert backup.returncode == 0, err
    assert provider.refresh_token_works(setup.refresh_token())
    result = setup.backup()
    assert result.returncode == 0, result.stderr


def test_token_file_is_private(setup: Setup) -> None:
    sign_in(setup)
    assert stat.S_IMODE(setup.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(setup.token_file.parent.stat().st_mode) == 0o700


def test_not_signed_in_names_the_login_command(setup: Setup) -> None:
    result = setup.backup()
    assert result.returncode == 3
    assert f"run: mailbackup login work --config {setup.config}" in result.stderr


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('oauth2 = { provider = "google" }', "needs client_id"),
        ('oauth2 = { provider = "yahoo", client_id = "x" }', "provider must be one of"),
        ('oauth2 = { provider = "custom", client_id = "x", scopes = ["s"] }', "needs token_url"),
        (
            (
                'oauth2 = { provider = "custom", client_id = "x", token_url = "http://idp.example/t", '
                'device_authorization_url = "https://idp.example/d", scopes = ["s"] }'
            ),
            "must be an https:// URL",
        ),
        ('oauth2 = { provider = "google", client_id = "x", tenant = "t" }', "tenant is for"),
        ('oauth2 = { provider = "google", client_id = "x", color = "red" }', "unknown keys color"),
        ('oauth2 = { provider = "google", client_id = "x" }\noauth2_token_command = "oama"', "give one of"),
    ],
)
def test_bad_oauth2_tables_say_what_is_wrong(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[accounts.a]\nsource = "imaps://me@h"\narchive = "x.db"\n{table}\n')
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_providers_come_with_endpoints_and_scopes(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[accounts.g]\nsource = "imaps://me@gmail.com@imap.gmail.com"\narchive = "g.db"\n'
        'oauth2 = { provider = "google", client_id = "g", client_secret_command = "echo s" }\n'
        '[accounts.m]\nsource = "imaps://me@contoso.com@outlook.office365.com"\narchive = "m.db"\n'
        'oauth2 = { provider = "microsoft", client_id = "m", tenant = "contoso.onmicrosoft.com" }\n'
    )
    accounts = config.load(path)
    google, microsoft = accounts["g"].oauth2, accounts["m"].oauth2
    assert google is not None and microsoft is not None
    assert google.scopes == ("https://mail.google.com/",) and google.client_secret() == "s"
    assert google.token_url == "https://oauth2.googleapis.com/token"
    assert microsoft.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in microsoft.scopes and "offline_access" in microsoft.scopes
    assert accounts["g"].auth == "xoauth2"
    assert microsoft.login_command == f"mailbackup login m --config {path}"
    with pytest.raises(ConfigError, match="does not allow the Gmail scope"):
        oauth.login(google, device=True, say=lambda line: None)


def test_a_usable_keyring_holds_the_token_instead_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailbackup.oauth import store as token_store

    class Keyring:
        def __init__(self) -> None:
            self.secrets: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, user: str) -> str | None:
            return self.secrets.get((service, user))

        def set_password(self, service: str, user: str, secret: str) -> None:
            self.secrets[(service, user)] = secret

    keyring = Keyring()
    file_only = token_store.TokenStore("k", "file", tmp_path)
    file_only.save("in-a-file")
    monkeypatch.setattr(token_store, "usable_keyring", lambda: keyring)
    auto = token_store.TokenStore("k", "auto", tmp_path)
    assert auto.load() == ("in-a-file", "file")  # signed in before a keyring was there
    assert auto.save("rotated", "file") == str(auto.path) and auto.load() == ("rotated", "file")
    assert auto.save("fresh login") == "the system keyring"
    assert auto.load() == ("fresh login", "keyring") and not auto.path.exists()  # one copy only
    monkeypatch.setattr(token_store, "usable_keyring", lambda: None)
    with pytest.raises(ConfigError, match="no usable system keyring"):
        token_store.TokenStore("k", "keyring", tmp_path).load()


def device_sign_in(setup: Setup, provider: Provider) -> None:
    """`mailbackup login --device`, with the test approving the code as the user would."""
    proc = setup.mailbackup("login", setup.name, "--config", str(setup.config), "--device")
    user_code = read_until(proc.stderr, "enter the code")[-1].split()[-1]
    requests.get(f"{provider.base_url}/activate", params={"user_code": user_code}, timeout=10)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_restore_logs_in_with_mailbackup_token_as_its_token_command(setup: Setup, dovecot_idp: Dovecot, provider: Provider) -> None:
    # The device grant: this test is about the token command, not the sign-in. (Its loopback sign-in once met
    # a Dovecot on a port picked for it by number; servers.dovecot.free_port now picks below the ephemeral range.)
    device_sign_in(setup, provider)
    assert setup.backup().returncode == 0
    command = f"{sys.executable} -m mailbackup token work --config {setup.config}"
    proc = setup.mailbackup(
        "restore", str(setup.archive), setup.account.url("imap"), "--no-tls", "--into", "Restored",
        "--oauth2-token-command", command, "--json",
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    restored = [m.raw for m in dovecot_idp.fetch(setup.account, "Restored/INBOX")]
    assert restored == [m.raw for m in dovecot_idp.fetch(setup.account, "INBOX")] and len(restored) == 1


@pytest.mark.parametrize(("name", "message"), [("plain", "has no oauth2"), ("other", "no account other")])
def test_login_refuses_an_account_it_cannot_sign_in(tmp_path: Path, name: str, message: str) -> None:
    from click.testing import CliRunner

    from mailbackup.cli import main

    path = tmp_path / "config.toml"
    path.write_text('[accounts.plain]\nsource = "imaps://me@h"\narchive = "x.db"\npassword_command = "echo pw"\n')
    result = CliRunner().invoke(main, ["login", name, "--config", str(path)])
    assert result.exit_code == 2 and message in result.output


def test_an_idle_connection_does_not_block_the_loopback_listener() -> None:
    import socket

    from mailbackup.oauth.flows import LoopbackListener

    listener = LoopbackListener()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(listener.wait("s", timeout=30)), daemon=True)
    idle = socket.create_connection(("127.0.0.1", listener.port))  # a browser's speculative preconnect
    try:
        waiter.start()
        time.sleep(0.5)
        threading.Thread(
            target=requests.get, args=(f"http://127.0.0.1:{listener.port}/?code=c&state=s",), kwargs={"timeout": 30},
            daemon=True,
        ).start()
        waiter.join(timeout=20)
        assert got == ["code=c&state=s"]
    finally:
        idle.close()
        waiter.join(timeout=30)
        listener.close()
