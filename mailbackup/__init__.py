"""mailbackup: faithful, incremental mail backups.

The library API; `mailbackup.cli` is a thin shell around it.
"""

from .errors import MailbackupError
from .model import Folder, Message, Summary
from .pipeline import BackupOptions, Progress, archive_stats, backup
from .stores import open_store

__all__ = [
    "BackupOptions",
    "Folder",
    "MailbackupError",
    "Message",
    "Progress",
    "Summary",
    "archive_stats",
    "backup",
    "open_store",
]
__version__ = "0.1.0"
