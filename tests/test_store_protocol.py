"""The Store seam: a toy in-memory store, one class plus one registry line, goes through
the real backup write path (pipeline.commit) and the real verify."""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

import mailbackup
from mailbackup.catalog import Catalog, create_engine
from mailbackup.errors import StoreError
from mailbackup.model import ArchivedFolder, Folder, Message
from mailbackup.pipeline import commit
from mailbackup.stores import REGISTRY, Finding, Recovered, open_store
from mailbackup.verify import CORRUPT, UNRECORDED, Problem, verify

_ARCHIVES: dict[str, tuple[Catalog, dict[str, bytes]]] = {}


class ToyStore:
    """Messages in a dict, content-addressed; the catalog in an in-memory SQLite database."""

    kind = "toy"

    def __init__(self, name: str, *, mode: str = "read", account: str | None = None) -> None:
        if name not in _ARCHIVES:
            _ARCHIVES[name] = (Catalog(create_engine("sqlite:///:memory:")), {})
        self.catalog, self.blobs = _ARCHIVES[name]
        self.catalog.choose_account(account, claim=mode == "write", several=False)
        self.url = f"toy:{name}"
        self.writable = mode == "write"

    @staticmethod
    def accepts(url: str) -> str | None:
        return url[len("toy:") :] if url.startswith("toy:") else None

    @staticmethod
    def set_catalog_aside(where: str) -> str:
        raise StoreError("a toy catalog cannot be set aside")

    def folder_path(self, folder: Folder) -> str:
        return folder.name

    def put(self, folder: ArchivedFolder, messages: Sequence[Message]) -> list[str]:
        for message in messages:
            self.blobs[message.sha256] = message.raw
        return [m.sha256 for m in messages]

    def get(self, location: str) -> bytes:
        if location not in self.blobs:
            raise StoreError(f"no blob {location}")
        return self.blobs[location]

    def set_flags(self, location: str, flags: tuple[str, ...]) -> str:
        return location

    @contextmanager
    def lock(self) -> Iterator[None]:
        yield

    def holds_messages(self) -> bool:
        return bool(self.blobs)

    def unrecorded(self) -> Iterator[Finding]:
        known = set(self.catalog.stored_hashes())
        for sha256 in sorted(set(self.blobs) - known):
            yield Finding(None, f"blob {sha256}")

    def duplicates(self) -> Iterator[Finding]:
        return iter(())

    def recover(self) -> Iterator[Recovered]:
        return iter(())

    def close(self) -> None:
        pass  # the toy archive lives on in _ARCHIVES for the next open


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(REGISTRY, "toy", f"{__name__}:ToyStore")
    yield
    _ARCHIVES.clear()


def test_a_toy_store_goes_through_the_backup_write_path_and_verify(toy_registered: None) -> None:
    store = open_store("toy:one", mode="write", account="alice@example.org")
    folder = store.catalog.ensure_folder(Folder("INBOX"), store.folder_path(Folder("INBOX")))
    messages = [Message(raw=b"Subject: %d\r\n\r\nbody\r\n" % i, uid=i + 1) for i in range(3)]
    commit(store, folder, 7, messages, None)
    store.close()

    found: list[Problem] = []
    summary = verify("toy:one", report=found.append)
    assert summary.ok and summary.checked == 3 and found == []

    store = open_store("toy:one", mode="read")
    store.blobs[messages[0].sha256] = b"Subject: 0\r\n\r\nbodY\r\n"  # type: ignore[attr-defined]
    store.blobs[hashlib.sha256(b"stray").hexdigest()] = b"stray"  # type: ignore[attr-defined]
    assert store.catalog.account == "alice@example.org"
    store.close()
    found = []
    verify("toy:one", report=found.append)
    assert sorted(p.kind for p in found) == [CORRUPT, UNRECORDED]


def test_verify_and_search_know_no_store_class_or_catalog_table() -> None:
    """verify, search and show reach the store only through the protocol and named catalog methods."""
    package = Path(mailbackup.__file__).parent
    for module in ("verify.py", "search.py", "show.py", "export.py", "repair.py"):
        tree = ast.parse((package / module).read_text())
        imported = {
            f"{node.module}:{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            for alias in node.names
        }
        assert not any(name.startswith(("stores.maildir", "stores.mbox", "stores.sql")) for name in imported), module
        assert not any(name.endswith((":messages", ":folders", ":blobs")) for name in imported), module
        assert "isinstance(store" not in (package / module).read_text(), module
