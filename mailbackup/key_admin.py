"""Key slot commands on a SQL archive: open its database without its messages (keys.py never imports a store)."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from .catalog import create_engine, engine_where
from .errors import UsageError
from .stores import resolve
from .stores.sql import SqlStore, database_url


def archive_engine(archive: str) -> tuple[sa.Engine, str]:
    """The database of a SQL archive, for managing its slots without opening its messages."""
    cls, where = resolve(archive)
    if cls is not SqlStore:
        raise UsageError(f"{archive} is not a SQL archive: only SQLite and PostgreSQL archives are encrypted")
    engine = create_engine(database_url(where))
    return engine, engine_where(engine)


def manage(archive: str, action: Callable[[sa.Engine, str], object]) -> object:
    """Run action on the archive's database, then let it go."""
    engine, where = archive_engine(archive)
    try:
        return action(engine, where)
    finally:
        engine.dispose()
