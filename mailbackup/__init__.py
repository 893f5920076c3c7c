"""mailbackup: faithful, incremental mail backups.

The library API; `mailbackup.cli` is a thin shell around it. Each name is imported
on first use, so `python -m mailbackup backup ...` does not pay for restore, verify
and the rest (an incremental run with nothing new takes a fraction of a second).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import MailbackupError
    from .model import Folder, Message, Summary
    from .pipeline import BackupOptions, Progress, backup
    from .prune import prune_server
    from .restore import RestoreOptions, migrate, restore
    from .show import listing
    from .stores import open_store
    from .verify import verify

_HOME = {
    "BackupOptions": "pipeline",
    "Folder": "model",
    "MailbackupError": "errors",
    "Message": "model",
    "Progress": "pipeline",
    "RestoreOptions": "restore",
    "Summary": "model",
    "backup": "pipeline",
    "listing": "show",
    "migrate": "restore",
    "open_store": "stores",
    "prune_server": "prune",
    "restore": "restore",
    "verify": "verify",
}
__all__ = [  # the names _HOME loads on first use
    "BackupOptions", "Folder", "MailbackupError", "Message", "Progress", "RestoreOptions", "Summary",
    "backup", "listing", "migrate", "open_store", "prune_server", "restore", "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'mailbackup' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`restore` and `verify` name both a submodule and the function it exports.

    Importing a submodule sets it as an attribute of its package; the API name must
    stay the function, as it did when this file imported it eagerly.
    """

    @property
    def restore(self) -> Any:
        return importlib.import_module(".restore", __name__).restore

    @restore.setter
    def restore(self, value: Any) -> None:
        pass  # the import system recording the submodule: sys.modules keeps it

    @property
    def verify(self) -> Any:
        return importlib.import_module(".verify", __name__).verify

    @verify.setter
    def verify(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
