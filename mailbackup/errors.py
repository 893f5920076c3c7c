"""One exception root; each subclass is a failure the user can act on.

The class carries its exit code, so the CLI maps errors without a table.
A message names a setting as {name} (the library's field name, see `setting`):
str() shows it as words, and the CLI shows the command-line option instead,
so the library never spells a flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_SETTING = re.compile(r"\{([a-z][a-z_]*)\}")


def setting(name: str) -> str:
    """A placeholder for a setting in an error message, e.g. setting("ca_file")."""
    return "{" + name + "}"


class MailbackupError(Exception):
    """mailbackup failed."""

    exit_code = 1

    def __init__(self, message: str | None = None, *, role: str = "source") -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.role = role  # whose setting it is: "source" or "target" (migrate has both)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each {setting} spelled by `name`."""
        return _SETTING.sub(lambda match: name(match.group(1)), str(self.args[0]))

    def __str__(self) -> str:
        return self.render(lambda key: key.replace("_", " "))


class UsageError(MailbackupError):
    """A command-line argument or option is wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration or credentials setup is wrong."""


class ConnectError(MailbackupError):
    """Could not connect to the server."""

    exit_code = 3


class TLSError(ConnectError):
    """TLS could not be established or the certificate did not verify."""


class AuthError(ConnectError):
    """The server rejected the login."""


class ConnectionLost(MailbackupError):
    """The connection dropped mid-run; rerun to finish, nothing stored is lost."""


class ServerError(MailbackupError):
    """The server sent a reply mailbackup cannot use."""


class ProviderLimit(MailbackupError):
    """The provider's limit was reached; what was stored is kept, rerun later to go on."""


class HostileServer(MailbackupError):
    """The server broke the protocol in a way that is not safe to read on; the run stops."""


class StoreError(MailbackupError):
    """The archive could not be written or read."""


class DiskFullError(StoreError):
    """The archive's disk is full (ENOSPC); free space and rerun."""


class ArchiveLocked(MailbackupError):
    """Another mailbackup run is writing this archive."""

    exit_code = 4


class ArchiveCorrupt(StoreError):
    """A stored message does not match its recorded SHA-256."""


class PartialFailure(MailbackupError):
    """some messages failed (listed above); a rerun retries them"""


class VerifyFailed(MailbackupError):
    """The archive does not match its catalog or the server; see the list above."""


class SignInRequired(AuthError):
    """The OAuth2 sign-in is missing, expired or revoked; run mailbackup login."""


class QueueError(MailbackupError):
    """The job queue's database could not be reached or used."""

    exit_code = 3


class QueueNotDrained(MailbackupError):
    """Jobs were still queued or running when the wait ran out."""


class NotAnArchive(UsageError):
    """The path is not a mailbackup archive."""


class ArchiveReadOnly(StoreError):
    """This command writes to the archive, and the archive cannot be written."""

    exit_code = 2


class AccountMismatch(UsageError):
    """The archive holds another account's mail."""


class CatalogDamaged(StoreError):
    """The archive's catalog is damaged or lost; run 'mailbackup repair ARCHIVE'."""


class ArchiveKeyError(MailbackupError):
    """This archive is encrypted: give its passphrase (or identity file)."""

    exit_code = 3


class WrongPassphrase(ArchiveKeyError):
    """The passphrase (or identity) does not open any key slot of this archive."""
