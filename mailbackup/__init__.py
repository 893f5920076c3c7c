"""mailbackup: faithful, incremental mail backups.

The library API; `mailbackup.cli` is a thin shell around it.
"""

from .errors import MailbackupError
from .model import Folder, Message, Summary
from .pipeline import BackupOptions, Progress, archive_stats, backup
from .prune import prune_server
from .restore import RestoreOptions, migrate, restore
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
    "archive_stats",
    "backup",
    "migrate",
    "open_store",
    "prune_server",
    "restore",
    "verify",
]
__version__ = "0.1.0"
