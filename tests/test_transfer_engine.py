"""The seams of the transfer engine, without a server: a toy in-memory source and
target run through the real Engine; and the package's import graph has no cycle."""

from __future__ import annotations

import ast
import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailbackup.catalog import create_engine
from mailbackup.errors import ConnectionLost
from mailbackup.journal import Journal
from mailbackup.model import Folder, Message
from mailbackup.pipeline import Progress
from mailbackup.sources import (
    Checkpoint,
    Fetched,
    Listed,
    OpenFolder,
    Source,
    SourceId,
    Traits,
)
from mailbackup.targets import Delivered, Destination, Outgoing, Target, message_id
from mailbackup.transfer import Engine, TransferOptions

PACKAGE = Path(__file__).resolve().parent.parent / "mailbackup"


# the import graph


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every mailbackup module this file imports, at module level, inside functions or under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from . import imap" names a module, "from . import Delivered" a package attribute.
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    # A module's own parent packages run before it anyway: importing from them adds no edge
    # (so a registry in a package's __init__ may import its submodules lazily).
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports(p, modules) for p in files}
    # The package root re-exports the API and imports everything: leave it out, nothing imports it.
    assert not any("mailbackup" in edges for edges in graph.values())
    graph.pop("mailbackup")
    assert graph["mailbackup.targets.smtp"] & {"mailbackup.restore", "mailbackup.transfer"} == set()
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


# a toy source and a toy target through the real engine


TOY = Traits("toy", many_folders=True, flags=True, resumes=False, deletes_at_close=False, exact_sizes=True)


class ToySource:
    """Folders of messages in memory; ids are list positions + 1 under a fixed validity."""

    traits = TOY

    def __init__(self, folders: dict[str, list[Message]]) -> None:
        self.data = folders
        self.current: list[Message] = []
        self.fetches = 0

    def folders(self) -> list[Folder]:
        return [Folder(name) for name in self.data]

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        self.current = self.data[folder.name]
        return OpenFolder(folder, Checkpoint(7), list(range(1, len(self.current) + 1)))

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        yield [Listed(i, self.current[int(i) - 1].size) for i in ids]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        self.fetches += 1
        for item in batch:
            yield Fetched(item.id, self.current[int(item.id) - 1])

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        yield {i: self.current[int(i) - 1].flags for i in ids}

    def before(self, cutoff: datetime) -> None:
        return None

    def delete(self, ids: Sequence[SourceId]) -> None:
        raise AssertionError("a transfer never deletes")

    def close(self, *, commit: bool = True) -> None:
        pass


class ToyServer:
    """The state of a toy IMAP-like account: folders of (uid, raw, flags), a validity per folder."""

    def __init__(self) -> None:
        self.folders: dict[str, list[tuple[int, bytes, tuple[str, ...]]]] = {}
        self.validity: dict[str, int] = {}
        self.next_validity = 100
        self.drop_after: int | None = None  # messages to accept before the line drops (once)

    def create(self, name: str) -> None:
        self.folders[name] = []
        self.next_validity += 1
        self.validity[name] = self.next_validity


class ToyTarget:
    window = 2

    def __init__(self, server: ToyServer) -> None:
        self.server = server
        self.identity = "toy://me@here"
        self.outcomes: list[list[Delivered]] = []

    def destination(self, source_name: str, delimiter: str | None, attributes: frozenset[str]) -> str:
        return f"Restored/{source_name}"

    def open(self, name: str, *, create: bool = True, contents: bool = True) -> Destination:
        created = name not in self.server.folders
        if created:
            if not create:
                return Destination(name, uids=frozenset(), exists=False)
            self.server.create(name)
        held = self.server.folders[name]
        where: dict[tuple[str | None, int], tuple[int, ...]] = {}
        if contents:
            for uid, raw, _ in held:
                key = (message_id(raw), len(raw))
                where[key] = (*where.get(key, ()), uid)
        uids = frozenset(u for u, _, _ in held)
        return Destination(name, self.server.validity[name], uids, where, contents=contents, created=created)

    def settle(self, name: str, quiet: float, limit: float) -> None:
        pass  # the toy server commits at once

    def copies(self, destination: Destination, size: int, sha256: str) -> list[int]:
        return [u for u, raw, _ in self.server.folders[destination.name] if hashlib.sha256(raw).hexdigest() == sha256]

    def send(self, destination: Destination, batch: Sequence[Outgoing]) -> None:
        held = self.server.folders[destination.name]
        done = []
        for message in batch:
            if self.server.drop_after is not None:
                if self.server.drop_after == 0:
                    self.server.drop_after = None
                    raise ConnectionLost("toy line dropped")
                self.server.drop_after -= 1
            uid = (held[-1][0] if held else 0) + 1
            held.append((uid, message.raw, message.flags))
            done.append(Delivered(message.item, ok=True, uid=uid, uid_validity=self.server.validity[destination.name]))
        self.outcomes.append(done)

    @property
    def pending(self) -> int:
        return len(self.outcomes)

    @property
    def full(self) -> bool:
        return len(self.outcomes) >= self.window

    def collect(self) -> list[Delivered]:
        return self.outcomes.pop(0)

    def store_flags(self, name: str, changes: dict[tuple[str, ...], list[int]]) -> None:
        by_uid = {uid: flags for flags, uids in changes.items() for uid in uids}
        self.server.folders[name] = [(u, raw, by_uid.get(u, flags)) for u, raw, flags in self.server.folders[name]]

    def close(self) -> None:
        pass


def toy_messages(count: int, tag: str) -> list[Message]:
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [
        Message(raw=b"Subject: %s %d\r\n%s\r\nbody\r\n" % (tag.encode(), i, b"" if i % 4 == 0 else b"Message-ID: <%d.%s@toy>\r\n" % (i, tag.encode())),
                flags=("\\Seen",) if i % 2 else (), internal_date=when)
        for i in range(count)
    ]


def run(source: ToySource, server: ToyServer, journal: Journal, **options: object) -> list:  # type: ignore[type-arg]
    source_typed: Source = source
    connects = []

    def connect() -> tuple[Source, Target]:
        connects.append(1)
        return source_typed, ToyTarget(server)

    reports = Engine(connect, lambda target: journal, TransferOptions(batch_messages=3, retry_delay=0, **options), Progress()).run()  # type: ignore[arg-type]
    return [reports, len(connects)]


def held(server: ToyServer) -> dict[str, Counter[bytes]]:
    return {name: Counter(raw for _, raw, _ in messages) for name, messages in server.folders.items()}


@pytest.fixture
def journal() -> Journal:
    return Journal(create_engine("sqlite:///:memory:"), "toy-source", "toy://me@here")


def test_a_toy_source_and_target_run_through_the_engine_exactly_once(journal: Journal) -> None:
    data = {"INBOX": toy_messages(10, "in"), "Work": toy_messages(7, "work"), "Empty": []}
    source, server = ToySource(data), ToyServer()
    reports, _ = run(source, server, journal)
    assert [(r.source, r.target, r.sent) for r in reports] == [("INBOX", "Restored/INBOX", 10), ("Work", "Restored/Work", 7), ("Empty", "Restored/Empty", 0)]
    want = {f"Restored/{name}": Counter(m.raw for m in messages) for name, messages in data.items()}
    assert held(server) == want
    # A rerun sends nothing and reads nothing; a folder lost on the target is filled again.
    fetches = source.fetches
    again, _ = run(source, server, journal)
    assert [r.sent for r in again] == [0, 0, 0] and [r.done_before for r in again] == [10, 7, 0]
    assert source.fetches == fetches
    del server.folders["Restored/Work"]
    third, _ = run(source, server, journal)
    assert [r.sent for r in third] == [0, 7, 0] and third[1].notes
    assert held(server) == want


def test_a_dropped_target_is_reconnected_and_nothing_arrives_twice(journal: Journal) -> None:
    data = {"INBOX": toy_messages(20, "in")}
    source, server = ToySource(data), ToyServer()
    server.drop_after = 8
    reports, connects = run(source, server, journal)
    assert connects == 2
    assert held(server) == {"Restored/INBOX": Counter(m.raw for m in data["INBOX"])}
    [report] = reports
    assert report.sent + report.recovered + report.found == 20


def test_flag_changes_on_the_source_reach_the_target(journal: Journal) -> None:
    data = {"INBOX": toy_messages(4, "in")}
    source, server = ToySource(data), ToyServer()
    run(source, server, journal)
    data["INBOX"][0] = Message(raw=data["INBOX"][0].raw, flags=("\\Flagged",), internal_date=data["INBOX"][0].internal_date)
    [report], _ = run(source, server, journal)
    assert (report.sent, report.flags_updated) == (0, 1)
    assert server.folders["Restored/INBOX"][0][2] == ("\\Flagged",)


def test_the_journal_syncs_at_checkpoints_and_the_catalog_at_every_commit(tmp_path: Path) -> None:
    # A journal row lost to a power cut is looked up on the target again; a catalog row is what
    # lets POP3 delete from the server, so only the catalog pays an fsync per commit.
    from mailbackup.journal import state_engine

    journal = state_engine(tmp_path / "state" / "restore.sqlite", dry_run=False)
    catalog = create_engine(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    with journal.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with catalog.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL

