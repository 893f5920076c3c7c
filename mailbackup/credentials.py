"""Where a secret comes from: a file, a command, the environment or a prompt; never argv."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Login:
    """Where one server's secret comes from; never the secret itself.

    The command line and the config file both build one; `resolve_secret` is the
    one place that turns it into a password or an OAuth2 access token.
    """

    password_file: str | None = None
    password_command: str | None = None
    password_env: str = "MAILBACKUP_PASSWORD"
    keyring: tuple[str, str] | None = None  # (service, username)
    oauth2_token_command: str | None = None
    oauth2_mechanism: str = "xoauth2"
    # The built-in sign-in (mailbackup login): returns a fresh access token.
    oauth2_provider: Callable[[], str] | None = None
    # An administrator (Dovecot master user, Cyrus admin) whose password logs in as the URL's user.
    admin_user: str | None = None

    @property
    def auth(self) -> str:
        """'password', or the SASL mechanism when the secret is an OAuth2 access token."""
        return self.oauth2_mechanism if self.oauth2_token_command or self.oauth2_provider else "password"


def resolve_secret(login: Login, *, what: str = "the source", prompt: Callable[[], str] | None = None) -> str:
    """The password or access token for `what`, fetched now."""
    given = [name for name, value in (
        ("a password file", login.password_file),
        ("a password command", login.password_command),
        ("a keyring entry", login.keyring),
        ("an OAuth2 token command", login.oauth2_token_command),
        ("a built-in OAuth2 sign-in", login.oauth2_provider),
    ) if value]
    if len(given) > 1:
        raise ConfigError(f"{what}: give one of {', '.join(given)}, not several")
    if login.oauth2_provider is not None:
        return login.oauth2_provider()
    if login.oauth2_token_command:
        return run_command(login.oauth2_token_command, f"OAuth2 token command for {what}")
    if login.keyring:
        return keyring_secret(*login.keyring, what=what)
    if login.password_file:
        try:
            text = Path(login.password_file).expanduser().read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {login.password_file}: {exc.strerror}") from exc
        return _one_line(text, f"password file {login.password_file}")
    if login.password_command:
        return run_command(login.password_command, f"password command for {what}")
    if os.environ.get(login.password_env):
        return os.environ[login.password_env]
    if prompt is not None:
        return prompt()
    raise ConfigError(
        f"no password for {what}: give a password file or command, or set {login.password_env} "
        "(no prompt without a terminal)"
    )


def keyring_secret(service: str, username: str, *, what: str) -> str:
    try:
        import keyring  # optional: pip install keyring
    except ImportError:
        raise ConfigError(f"{what}: keyring is set but the 'keyring' package is not installed") from None
    secret = keyring.get_password(service, username)
    if not secret:
        raise ConfigError(f"{what}: the system keyring has no secret for {service}/{username}")
    return str(secret)


def run_command(command: str, what: str) -> str:
    """Run a secret helper (pass, gpg, an OAuth2 token tool) and take its first line."""
    import subprocess  # here: most runs take the secret from elsewhere, and a rerun starts faster without it

    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{what} timed out") from None
    if done.returncode != 0:
        raise ConfigError(f"{what} exited with {done.returncode}")
    return _one_line(done.stdout, what)


def _one_line(text: str, what: str) -> str:
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise ConfigError(f"{what} gave an empty password")
    return password


def xoauth2(user: str, token: str) -> bytes:
    """The XOAUTH2 initial response (Google, Microsoft)."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str, host: str, port: int) -> bytes:
    """The OAUTHBEARER initial response (RFC 7628)."""
    return f"n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def sasl_b64(response: bytes) -> str:
    return base64.b64encode(response).decode("ascii")
