"""The config file: several accounts, each a source, an archive and where its secret comes from.

A plain password in the file is refused: configs get copied, synced and pasted.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import oauth
from .credentials import resolve_password, run_command
from .errors import ConfigError

SECRET_KEYS = ("password_command", "password_file", "password_env", "keyring", "oauth2_token_command", "oauth2")
KNOWN_KEYS = {
    "source",
    "archive",
    "folders",
    "exclude",
    "ca_file",
    "no_tls",
    "timeout",
    "into",
    "delete",
    "delete_older_than",
    "oauth2_mechanism",
    "index",
    *SECRET_KEYS,
}


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mailbackup" / "config.toml"


@dataclass(frozen=True)
class Account:
    name: str
    source: str
    archive: str
    folders: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ca_file: str | None = None
    no_tls: bool = False
    timeout: float = 120.0
    into: str | None = None
    delete: bool = False
    delete_older_than: float | None = None
    secret: dict[str, Any] = field(default_factory=dict, compare=False)
    oauth2_mechanism: str = "xoauth2"
    index: bool = True
    oauth2: oauth.OAuth2Settings | None = None

    @property
    def auth(self) -> str:
        uses_oauth2 = "oauth2_token_command" in self.secret or self.oauth2 is not None
        return self.oauth2_mechanism if uses_oauth2 else "password"

    def credential(self) -> str:
        """The password or OAuth2 access token, fetched now (never stored in the config)."""
        where = f"account {self.name}"
        if self.oauth2 is not None:
            return oauth.access_token(self.oauth2)
        if "oauth2_token_command" in self.secret:
            return run_command(self.secret["oauth2_token_command"], f"oauth2_token_command of {where}")
        if "keyring" in self.secret:
            return keyring_secret(self.secret["keyring"], where)
        return resolve_password(
            file=self.secret.get("password_file"),
            command=self.secret.get("password_command"),
            env=self.secret.get("password_env", "MAILBACKUP_PASSWORD"),
            what=where,
        )


def keyring_secret(spec: Any, where: str) -> str:
    if not isinstance(spec, dict) or not {"service", "username"} <= spec.keys():
        raise ConfigError(f"{where}: keyring needs a table {{ service = ..., username = ... }}")
    try:
        import keyring  # optional: pip install keyring
    except ImportError:
        raise ConfigError(f"{where}: keyring is set but the 'keyring' package is not installed") from None
    secret = keyring.get_password(spec["service"], spec["username"])
    if not secret:
        raise ConfigError(f"{where}: the system keyring has no secret for {spec['service']}/{spec['username']}")
    return str(secret)


def expand_archive(archive: str) -> str:
    """~ works in archive paths, after a maildir:/mbox: prefix too."""
    for prefix in ("maildir:", "mbox:"):
        if archive.startswith(prefix):
            return prefix + os.path.expanduser(archive[len(prefix) :])
    return archive if "://" in archive else os.path.expanduser(archive)


def load(path: Path | None = None) -> dict[str, Account]:
    explicit = path is not None  # then `mailbackup login` hints name it with --config
    path = path or default_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    accounts = data.get("accounts")
    if not isinstance(accounts, dict) or not accounts:
        raise ConfigError(f"{path} has no [accounts.NAME] tables")
    defaults = data.get("defaults", {})
    return {
        name: account(name, {**defaults, **table}, path, explicit=explicit) for name, table in accounts.items()
    }


def oauth2_settings(path: Path | None, name: str) -> oauth.OAuth2Settings:
    """The sign-in settings of one configured account, for `mailbackup login` and `token`."""
    accounts = load(path)
    if name not in accounts:
        raise ConfigError(f"no account {name} in the config (have: {', '.join(accounts)})")
    settings = accounts[name].oauth2
    if settings is None:
        raise ConfigError(f"account {name} has no oauth2 = {{ provider = ..., client_id = ... }} table")
    return settings


def account(name: str, table: Any, path: Path, explicit: bool = True) -> Account:
    where = f"{path}: accounts.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    if "password" in table:
        raise ConfigError(
            f"{where} holds a plain password, which is refused: use password_command, "
            "password_file, password_env, keyring, oauth2_token_command or oauth2"
        )
    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    for key in ("source", "archive"):
        if not isinstance(table.get(key), str):
            raise ConfigError(f"{where} needs {key} = \"...\"")
    secrets = {k: table[k] for k in SECRET_KEYS if k in table}
    if len(secrets) > 1:
        raise ConfigError(f"{where}: give one of {', '.join(SECRET_KEYS)}, not {', '.join(secrets)}")
    settings = None
    if "oauth2" in table:
        settings = oauth.parse(
            table["oauth2"], account=name, source=table["source"], config_file=path if explicit else None, where=where
        )
    try:
        return Account(
            name=name,
            source=table["source"],
            archive=expand_archive(table["archive"]),
            folders=tuple(table.get("folders", ())),
            exclude=tuple(table.get("exclude", ())),
            ca_file=os.path.expanduser(table["ca_file"]) if table.get("ca_file") else None,
            no_tls=bool(table.get("no_tls", False)),
            timeout=float(table.get("timeout", 120.0)),
            into=table.get("into"),
            delete=bool(table.get("delete", False)),
            delete_older_than=float(table["delete_older_than"]) if "delete_older_than" in table else None,
            secret=secrets,
            oauth2_mechanism=str(table.get("oauth2_mechanism", "xoauth2")).lower(),
            index=bool(table.get("index", True)),
            oauth2=settings,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
