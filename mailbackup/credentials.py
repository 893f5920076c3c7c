"""Where a secret comes from: a file, a command, the environment or a prompt; never argv."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError


def resolve_password(
    *,
    file: str | None = None,
    command: str | None = None,
    env: str = "MAILBACKUP_PASSWORD",
    prompt: Callable[[], str] | None = None,
    what: str = "the source",
) -> str:
    if file and command:
        raise ConfigError("give either a password file or a password command, not both")
    if file:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {file}: {exc.strerror}") from exc
        return _one_line(text, f"password file {file}")
    if command:
        return run_command(command, f"password command for {what}")
    if os.environ.get(env):
        return os.environ[env]
    if prompt is not None:
        return prompt()
    raise ConfigError(
        f"no password for {what}: use --password-file, --password-command or {env} "
        "(no prompt without a terminal)"
    )


def run_command(command: str, what: str) -> str:
    """Run a secret helper (pass, gpg, an OAuth2 token tool) and take its first line."""
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
