"""Fixtures: real Dovecot, Cyrus and PostgreSQL servers, and the message corpus.

Servers start once per session, on demand, under short temp dirs on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # so that 'servers' and 'corpus' import the same way everywhere
    sys.path.insert(0, str(TESTS_DIR))

from corpus.tricky import tricky_messages as _tricky_messages  # noqa: E402
from servers.cyrus import Cyrus  # noqa: E402
from servers.dovecot import Account, Dovecot  # noqa: E402
from servers.postgres import Postgres  # noqa: E402
from servers.s3 import S3Server  # noqa: E402

_database_numbers = itertools.count(1)

# Restore and migrate keep their journals under $XDG_STATE_HOME: never the real one.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mbstate")


class Server(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


def _serve(what: str, prefix: str, start: Callable[[str], S]) -> Iterator[S]:
    """A server started in a temp directory of its own, stopped (by its PID) and removed afterwards."""
    # Short path: Unix sockets live under it (107-byte limit)
    directory = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        server = start(directory)
    except Exception as exc:  # the log tail is in the message
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"cannot start {what} (run bash tests/bootstrap.sh?): {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _start_dovecot(separator: str) -> Iterator[Dovecot]:
    return _serve("Dovecot", "mbdc", lambda directory: Dovecot().start(directory, separator=separator))


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """Dovecot with hierarchy separator '/', plain and TLS IMAP/POP3 listeners."""
    yield from _start_dovecot("/")


@pytest.fixture
def account(dovecot: Dovecot) -> Account:
    """A fresh, empty mail account on ``dovecot``."""
    return dovecot.add_user()


MASTER = ("admin", "pw-master-admin")


@pytest.fixture(scope="session")
def dovecot_master() -> Iterator[Dovecot]:
    """Dovecot with a master user MASTER (admin logins), started only when asked for."""
    yield from _serve("Dovecot", "mbdm", lambda directory: Dovecot().start(directory, master=MASTER))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """`rclone serve s3` on a free loopback port over its own temp dir, stopped by PID."""

    def start(directory: str) -> S3Server:
        server = S3Server(Path(directory) / "data")
        server.directory.mkdir()
        return server.start()

    yield from _serve("rclone serve s3", "mbs3", start)


_bucket_numbers = itertools.count(1)


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh bucket, with the AWS variables set for this test; returns its folder on disk."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.bucket(f"mb{next(_bucket_numbers)}")


@pytest.fixture(scope="session")
def dovecot_dot() -> Iterator[Dovecot]:
    """A second Dovecot whose hierarchy separator is '.' (started only when asked for)."""
    yield from _start_dovecot(".")


@pytest.fixture
def account_dot(dovecot_dot: Dovecot) -> Account:
    return dovecot_dot.add_user()


@pytest.fixture(scope="session")
def cyrus() -> Iterator[Cyrus]:
    """Cyrus IMAP 3.6: delimiter '.', personal folders under "INBOX." (started only when asked for)."""
    yield from _serve("Cyrus", "mbcy", lambda directory: Cyrus().start(directory))


@pytest.fixture
def account_cyrus(cyrus: Cyrus) -> Account:
    """A fresh Cyrus account with an empty INBOX."""
    return cyrus.add_user()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster (Unix socket only), started only when asked for."""
    server = Postgres()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"cannot start PostgreSQL (run bash tests/bootstrap.sh?): {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """SQLAlchemy URL of a fresh, empty database: postgresql+psycopg://mb@/NAME?host=DIR."""
    return postgres.create_database(f"mbtest_{next(_database_numbers)}")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """tests/corpus: mikel-mail/, cpython/, tricky.py, NOTES.md."""
    return TESTS_DIR / "corpus"


@pytest.fixture(scope="session")
def tricky_messages() -> dict[str, bytes]:
    """Name -> raw bytes of the synthetic messages in corpus/tricky.py."""
    return _tricky_messages()
