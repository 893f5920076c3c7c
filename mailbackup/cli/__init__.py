"""Command line: parse options, call the library, draw progress, map errors to exit codes.

One module per family of commands; each registers its commands on `main` (app.py) when imported.
"""

from . import archive, backup, key, queue, transfer  # noqa: F401  (they register their commands)
from .app import main

__all__ = ["main"]
