"""mailbackup: faithful, incremental mail backups.

The library API; `mailbackup.cli` is a thin shell around it.
"""

from .errors import MailbackupError
from .model import Folder, Message, Summary
from .pipeline import BackupOptions, Progress, backup
from .prune import prune_server
from .restore import RestoreOptions, migrate, restore
from .show import listing
from .stores import open_store
from .verify import verify

__all__ = [
    "BackupOptions",
    "Folder",
    "MailbackupError",
    "Message",
    "Progress",
    "RestoreOptions",
    "Summary",
    "backup",
    "listing",
    "migrate",
    "open_store",
    "prune_server",
    "restore",
    "verify",
]
__version__ = "0.1.0"
