"""mailbackup: faithful, incremental mail backups.

The library API; `mailbackup.cli` is a thin shell around it. Names are loaded on
first use, so a small piece (the indexer process imports only mailbackup.mime)
does not pay for SQLAlchemy and the rest.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BackupOptions": "pipeline",
    "Progress": "pipeline",
    "archive_stats": "pipeline",
    "backup": "pipeline",
    "Folder": "model",
    "Message": "model",
    "Summary": "model",
    "MailbackupError": "errors",
    "open_store": "stores",
    "RestoreOptions": "restore",
    "restore": "restore",
    "migrate": "restore",
    "verify": "verify",
    "prune_server": "prune",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mailbackup' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
