"""Where a refresh token lives between runs: the system keyring when one is usable, else a 0600 file.

The file sits under $XDG_STATE_HOME/mailbackup/ (default ~/.local/state/mailbackup/) and is
replaced atomically: a kill at any moment leaves the old token or the new one, never half of one.
A file lock beside it serialises refresh-and-save, so two runs never both spend the same token.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConnectError, StoreError

KEYRING_SERVICE = "mailbackup-oauth2"
KEYRING, FILE = "keyring", "file"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mailbackup"


def usable_keyring() -> Any | None:
    """The keyring module when a real backend is behind it (not the fail or null one), else None."""
    try:
        import keyring  # optional: pip install keyring
    except ImportError:
        return None
    try:
        priority = float(keyring.get_keyring().priority)
    except Exception:  # noqa: BLE001 - a broken keyring setup means "no keyring", not a crash
        return None
    return keyring if priority > 0 else None


@dataclass(frozen=True)
class TokenStore:
    key: str
    mode: str = "auto"  # auto, keyring or file
    directory: Path | None = None

    @property
    def root(self) -> Path:
        return self.directory or state_dir()

    @property
    def path(self) -> Path:
        return self.root / f"oauth2-{self.key}.json"

    def load(self) -> tuple[str, str] | None:
        """(refresh token, where it was found), or None before the first login."""
        keyring = self._keyring()
        if keyring is not None:
            try:
                token = keyring.get_password(KEYRING_SERVICE, self.key)
            except Exception as exc:  # noqa: BLE001 - keyring backends raise their own types
                if self.mode == KEYRING:
                    raise StoreError(f"cannot read the system keyring: {exc}") from exc
                token = None
            if token:
                return str(token), KEYRING
        if self.mode == KEYRING:
            return None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read the OAuth2 token file {self.path}: {exc}") from exc
        token = data.get("refresh_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise StoreError(f"the OAuth2 token file {self.path} holds no refresh token")
        return token, FILE

    def save(self, refresh_token: str, where: str | None = None) -> str:
        """Store durably (keyring, or write temp + fsync + rename + fsync dir); returns where it went."""
        keyring = self._keyring() if where in (None, KEYRING) else None
        if keyring is not None:
            try:
                keyring.set_password(KEYRING_SERVICE, self.key, refresh_token)
            except Exception as exc:  # noqa: BLE001
                if self.mode == KEYRING:
                    raise StoreError(f"cannot write to the system keyring: {exc}") from exc
            else:
                self.path.unlink(missing_ok=True)  # one copy only, the one in the keyring
                return "the system keyring"
        saved_at = datetime.now(UTC).isoformat(timespec="seconds")
        write_atomically(self.path, json.dumps({"refresh_token": refresh_token, "saved_at": saved_at}).encode())
        return str(self.path)

    def _keyring(self) -> Any | None:
        if self.mode == FILE:
            return None
        keyring = usable_keyring()
        if keyring is None and self.mode == KEYRING:
            raise ConfigError("token_store = \"keyring\" but no usable system keyring (pip install keyring, and a backend)")
        return keyring

    @contextmanager
    def locked(self, timeout: float = 300.0) -> Iterator[None]:
        """Hold this grant's lock: read, refresh and save happen as one step across processes."""
        make_private_dir(self.root)
        fd = os.open(self.root / f"oauth2-{self.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConnectError(
                            f"another mailbackup run has been refreshing the OAuth2 token for {timeout:.0f} s; try again"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing drops the lock; so does the kernel if this process is killed


def make_private_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        path.chmod(0o700)


def write_atomically(path: Path, data: bytes) -> None:
    """Write temp (0600), fsync, rename over `path`, fsync the directory."""
    make_private_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a kill; they hold a secret
        stale.unlink(missing_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise StoreError(f"cannot write the OAuth2 token file {path}: {exc.strerror}") from exc
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
