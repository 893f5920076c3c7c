"""The config file: several accounts, each a source, an archive and where its secret comes from.

A plain password in the file is refused: configs get copied, synced and pasted.
"""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import keys, oauth
from .credentials import Login, resolve_secret
from .errors import ConfigError

SECRET_KEYS = ("password_command", "password_file", "password_env", "keyring", "oauth2_token_command", "oauth2")
# An encrypted archive's passphrase comes the same ways as a password, never in the file itself.
KEY_KEYS = ("passphrase_file", "passphrase_command", "passphrase_env", "identity_file", "encrypt", "compress", "recipient")
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
    "admin_user",
    "blobs",
    "s3_endpoint",
    "max_rate",
    "max_bytes_per_day",
    "max_connections",
    "gmail_include_trash_spam",
    *SECRET_KEYS,
    *KEY_KEYS,
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
    login: Login = field(default_factory=Login, compare=False)
    index: bool = True
    oauth2: oauth.OAuth2Settings | None = None
    keys: keys.KeySource | None = field(default=None, compare=False)  # None: as the command line says
    blobs: str | None = None  # s3://BUCKET/PREFIX for a SQL archive's message bytes
    s3_endpoint: str | None = None
    max_rate: float | None = None  # bytes/s
    max_bytes_per_day: int | None = None
    max_connections: int | None = None
    gmail_include_trash_spam: bool = False

    @property
    def auth(self) -> str:
        return self.login.auth

    def credential(self) -> str:
        """The password or OAuth2 access token, fetched now (never stored in the config)."""
        return resolve_secret(self.login, what=f"account {self.name}")


def login_from(table: dict[str, Any], where: str, oauth2: oauth.OAuth2Settings | None = None) -> Login:
    """The one secret key an account table gives, as a Login."""
    spec = table.get("keyring")
    keyring = None
    if spec is not None:
        if not isinstance(spec, dict) or not {"service", "username"} <= spec.keys():
            raise ConfigError(f"{where}: keyring needs a table {{ service = ..., username = ... }}")
        keyring = (str(spec["service"]), str(spec["username"]))
    return Login(
        password_file=table.get("password_file"),
        password_command=table.get("password_command"),
        password_env=table.get("password_env", "MAILBACKUP_PASSWORD"),
        keyring=keyring,
        oauth2_token_command=table.get("oauth2_token_command"),
        oauth2_mechanism=str(table.get("oauth2_mechanism", "xoauth2")).lower(),
        # a picklable callable, so accounts still cross to worker processes
        oauth2_provider=functools.partial(oauth.access_token, oauth2) if oauth2 is not None else None,
        admin_user=table.get("admin_user"),
    )


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
            login=login_from(
                secrets | {k: table[k] for k in ("oauth2_mechanism", "admin_user") if k in table}, where, settings
            ),
            index=bool(table.get("index", True)),
            oauth2=settings,
            keys=key_source(table, where),
            blobs=table.get("blobs"),
            s3_endpoint=table.get("s3_endpoint"),
            max_rate=float(table["max_rate"]) if "max_rate" in table else None,
            max_bytes_per_day=int(table["max_bytes_per_day"]) if "max_bytes_per_day" in table else None,
            max_connections=int(table["max_connections"]) if "max_connections" in table else None,
            gmail_include_trash_spam=bool(table.get("gmail_include_trash_spam", False)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def key_source(table: dict[str, Any], where: str) -> keys.KeySource | None:
    """The archive's key source from passphrase_file/_command/_env, identity_file, encrypt, compress, recipient."""
    if not any(k in table for k in KEY_KEYS):
        return None
    if "passphrase_file" in table and "passphrase_command" in table:
        raise ConfigError(f"{where}: give passphrase_file or passphrase_command, not both")
    recipient = table.get("recipient", ())
    recipients = keys.recipients_from((recipient,) if isinstance(recipient, str) else tuple(recipient))
    return keys.KeySource(
        passphrase=Login(
            password_file=os.path.expanduser(table["passphrase_file"]) if table.get("passphrase_file") else None,
            password_command=table.get("passphrase_command"),
            password_env=table.get("passphrase_env", "MAILBACKUP_PASSPHRASE"),
        ),
        identity_file=os.path.expanduser(table["identity_file"]) if table.get("identity_file") else None,
        protection=keys.Protection(
            encrypt=bool(table.get("encrypt", False)) or bool(recipients),
            compress=bool(table.get("compress", False)),
            recipients=recipients,
        ),
    )
