"""An account's `oauth2 = { ... }` table: the provider's endpoints, the client and its scopes.

Google and Microsoft come built in (endpoints and scopes from their documentation);
`custom` names its own endpoints. Nothing here talks to the network.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..credentials import run_command
from ..errors import ConfigError

GOOGLE = {
    "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
    "token_url": "https://oauth2.googleapis.com/token",
    "device_authorization_url": "https://oauth2.googleapis.com/device/code",
    "scopes": ("https://mail.google.com/",),
}
# Entra ID v2.0 endpoints; {tenant} is common, organizations, consumers or a tenant id/domain.
MICROSOFT_BASE = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
MICROSOFT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/POP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
)
PROVIDERS = ("google", "microsoft", "custom")
STORES = ("auto", "keyring", "file")
KEYS = {
    "provider",
    "client_id",
    "client_secret_command",
    "client_secret_file",
    "tenant",
    "authorization_url",
    "token_url",
    "device_authorization_url",
    "scopes",
    "token_store",
}


@dataclass(frozen=True)
class OAuth2Settings:
    """Everything `login` and a refresh need for one account; the secret itself is read late."""

    account: str
    provider: str
    client_id: str
    token_url: str
    authorization_url: str | None
    device_authorization_url: str | None
    scopes: tuple[str, ...]
    source: str
    config_file: str | None = None
    client_secret_command: str | None = None
    client_secret_file: str | None = None
    token_store: str = "auto"

    @property
    def login_command(self) -> str:
        """The exact command that signs this account in again."""
        command = f"mailbackup login {_shell_word(self.account)}"
        return command + (f" --config {_shell_word(self.config_file)}" if self.config_file else "")

    @property
    def store_key(self) -> str:
        """Names the stored grant: a refresh token belongs to one client at one provider, for one login."""
        user = self.source.split("://", 1)[-1].rpartition("@")[0]
        digest = hashlib.sha256("\0".join((self.token_url, self.client_id, user)).encode()).hexdigest()[:12]
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.account)}-{digest}"

    @property
    def redirect_host(self) -> str:
        # Entra ID matches the registered http://localhost on any port; Google and RFC 8252 §7.3 prefer the IP literal.
        return "localhost" if self.provider == "microsoft" else "127.0.0.1"

    def client_secret(self) -> str | None:
        """Read late, like a password; a public client (no secret) gets None."""
        what = f"the OAuth2 client secret of account {self.account}"
        if self.client_secret_command:
            return run_command(self.client_secret_command, f"client_secret_command for {what}")
        if self.client_secret_file:
            try:
                text = Path(self.client_secret_file).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read client_secret_file {self.client_secret_file}: {exc.strerror}") from exc
            secret = text.split("\n", 1)[0].strip()
            if not secret:
                raise ConfigError(f"client_secret_file {self.client_secret_file} is empty")
            return secret
        return None


def _shell_word(text: str) -> str:
    return shlex.quote(text)


def _check_url(url: Any, key: str, where: str) -> str:
    """https, or plain http to this machine only (a loopback test server): tokens never cross a network in clear."""
    parts = urlsplit(url) if isinstance(url, str) else None
    local = parts is not None and parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts is None or not parts.hostname or not (parts.scheme == "https" or local):
        raise ConfigError(f"{where}: {key} must be an https:// URL")
    return str(url)


def parse(table: Any, *, account: str, source: str, config_file: Path | None, where: str) -> OAuth2Settings:
    """Check an `oauth2` table and fill in the provider's endpoints; ConfigError names what is wrong."""
    where = f"{where}: oauth2"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table: oauth2 = {{ provider = \"google\", client_id = \"...\" }}")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    provider = table.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}: provider must be one of {', '.join(PROVIDERS)}")
    client_id = table.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise ConfigError(f"{where} needs client_id = \"...\" (from the app registration)")
    if "client_secret_command" in table and "client_secret_file" in table:
        raise ConfigError(f"{where}: give client_secret_command or client_secret_file, not both")
    store = table.get("token_store", "auto")
    if store not in STORES:
        raise ConfigError(f"{where}: token_store must be one of {', '.join(STORES)}")
    if "tenant" in table and provider != "microsoft":
        raise ConfigError(f"{where}: tenant is for provider = \"microsoft\"")
    endpoints = _endpoints(provider, table, where)
    scopes = table.get("scopes", endpoints["scopes"])
    if isinstance(scopes, str):
        scopes = scopes.split()
    if not isinstance(scopes, (list, tuple)) or not scopes or not all(isinstance(s, str) and s for s in scopes):
        raise ConfigError(f"{where}: scopes must be a list of strings")
    secret_file = table.get("client_secret_file")
    return OAuth2Settings(
        account=account,
        provider=provider,
        client_id=client_id,
        token_url=endpoints["token_url"],
        authorization_url=endpoints["authorization_url"],
        device_authorization_url=endpoints["device_authorization_url"],
        scopes=tuple(scopes),
        source=source,
        config_file=str(config_file.absolute()) if config_file else None,
        client_secret_command=table.get("client_secret_command"),
        client_secret_file=str(Path(secret_file).expanduser()) if secret_file else None,
        token_store=store,
    )


def _endpoints(provider: str, table: dict[str, Any], where: str) -> dict[str, Any]:
    if provider == "google":
        given = {"authorization_url", "token_url", "device_authorization_url"} & table.keys()
        if given:
            raise ConfigError(f"{where}: {', '.join(sorted(given))} is built in for google; use provider = \"custom\"")
        return GOOGLE
    if provider == "microsoft":
        tenant = table.get("tenant", "common")
        if not isinstance(tenant, str) or not re.fullmatch(r"[A-Za-z0-9.-]+", tenant):
            raise ConfigError(f"{where}: tenant must be common, organizations, consumers, a tenant id or a domain")
        base = MICROSOFT_BASE.format(tenant=tenant)
        return {
            "authorization_url": f"{base}/authorize",
            "token_url": f"{base}/token",
            "device_authorization_url": f"{base}/devicecode",
            "scopes": MICROSOFT_SCOPES,
        }
    for key in ("token_url", "scopes"):
        if key not in table:
            raise ConfigError(f"{where}: provider = \"custom\" needs {key}")
    if "authorization_url" not in table and "device_authorization_url" not in table:
        raise ConfigError(f"{where}: provider = \"custom\" needs authorization_url or device_authorization_url")
    for key in ("authorization_url", "token_url", "device_authorization_url"):
        if key in table:
            _check_url(table[key], key, where)
    return {
        "authorization_url": table.get("authorization_url"),
        "token_url": table["token_url"],
        "device_authorization_url": table.get("device_authorization_url"),
        "scopes": table["scopes"],
    }
