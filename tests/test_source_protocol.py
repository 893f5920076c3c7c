"""The Source seam: a toy in-memory source, registered under its own scheme, runs
through the real backup loop into a real store, with no IMAP or POP3 in sight."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest

import mailbackup.sources as sources
from mailbackup import BackupOptions, backup
from mailbackup.errors import ConnectionLost, UsageError
from mailbackup.model import Folder, Message
from mailbackup.sources import Checkpoint, Connect, Fetched, Listed, OpenFolder, SourceId, Traits
from tests.archive_view import archived

TOY = Traits("toy", many_folders=True, flags=True, resumes=True, deletes_at_close=False, exact_sizes=True)
WHEN = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


class ToyServer:
    """Folders of (uid -> (raw, flags)), and faults on demand."""

    def __init__(self) -> None:
        self.folders: dict[str, dict[int, tuple[bytes, tuple[str, ...]]]] = {}
        self.validity = 1
        self.cut_after: int | None = None  # bytes of BODY a connection carries before it drops
        self.connections = 0


class ToySource:
    traits = TOY

    def __init__(self, server: ToyServer) -> None:
        self.server = server
        self.server.connections += 1
        self.carried = 0
        self.selected: dict[int, tuple[bytes, tuple[str, ...]]] = {}

    def folders(self) -> list[Folder]:
        return [Folder(name, "/") for name in self.server.folders]

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        self.selected = self.server.folders[folder.name]
        return OpenFolder(folder, Checkpoint(self.server.validity), sorted(self.selected))

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        yield [Listed(i, len(self.selected[int(i)][0])) for i in ids if int(i) in self.selected]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        for item in batch:
            raw, flags = self.selected[int(item.id)]
            prefix = resume.get(item.id, b"")
            rest = raw[len(prefix) :]
            limit = self.server.cut_after
            if limit is not None and self.carried + len(rest) > limit:
                room = limit - self.carried
                yield Fetched(item.id, None, partial=prefix + rest[:room])
                raise ConnectionLost("toy line dropped")
            self.carried += len(rest)
            yield Fetched(item.id, Message(raw=prefix + rest, flags=flags, internal_date=WHEN, uid=int(item.id)))

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        yield {i: self.selected[int(i)][1] for i in ids}

    def before(self, cutoff: datetime) -> Sequence[SourceId] | None:
        return None

    def delete(self, ids: Sequence[SourceId]) -> None:
        for i in ids:
            del self.selected[int(i)]

    def close(self, *, commit: bool = True) -> None:
        pass


@pytest.fixture
def toy(monkeypatch) -> ToyServer:  # type: ignore[no-untyped-def]
    server = ToyServer()
    monkeypatch.setattr(sources, "_KINDS", dict(sources._KINDS))
    sources.register(("toy",), TOY, lambda url, connect: ToySource(server), lambda url, connect: url)
    return server


def raw(n: int, size: int = 100) -> bytes:
    return b"Subject: toy %d\r\n\r\n" % n + b"x" * size + b"\r\n"


def run(url: str, **options: object):  # type: ignore[no-untyped-def]
    return backup("toy://me@nowhere", url, password="", options=BackupOptions(index=False, retry_delay=0, **options))  # type: ignore[arg-type]


def test_a_toy_source_backs_up_incrementally_through_the_real_loop(toy: ToyServer, tmp_path: Path) -> None:
    toy.folders = {"INBOX": {1: (raw(1), ("\\Seen",)), 2: (raw(2), ())}, "Work": {5: (raw(5), ())}}
    url = str(tmp_path / "a.sqlite")
    first = run(url)
    assert (first.new, first.ok) == (3, True)
    assert {name: [m.raw for m in ms] for name, ms in archived(url).items()} == {"INBOX": [raw(1), raw(2)], "Work": [raw(5)]}
    assert all(f.elapsed > 0 for f in first.folders)
    toy.folders["INBOX"][3] = (raw(3), ())
    toy.folders["INBOX"][2] = (raw(2), ("\\Flagged",))
    del toy.folders["INBOX"][1]
    again = run(url)
    assert again.new == 1
    inbox = [f for f in again.folders if f.name == "INBOX"][0]
    assert (inbox.flags_updated, inbox.gone) == (1, 1)
    view = archived(url, include_gone=True)["INBOX"]
    assert [(m.uid, m.gone, m.flags) for m in view] == [(1, True, {"\\Seen"}), (2, False, {"\\Flagged"}), (3, False, frozenset())]
    assert run(url).new == 0


def test_a_cut_message_is_resumed_from_its_prefix_on_the_next_connection(toy: ToyServer, tmp_path: Path) -> None:
    toy.folders = {"INBOX": {n: (raw(n, 3000), ()) for n in range(1, 6)}}
    toy.cut_after = 2000  # every connection drops after 2,000 bytes: no message fits whole
    url = f"maildir:{tmp_path / 'md'}"
    summary = run(url)
    assert summary.ok and summary.new == 5
    assert sorted(m.raw for m in archived(url)["INBOX"]) == sorted(raw(n, 3000) for n in range(1, 6))
    assert toy.connections >= 8


def test_the_retry_budget_counts_only_attempts_that_got_nowhere(toy: ToyServer, tmp_path: Path) -> None:
    toy.folders = {"INBOX": {n: (raw(n, 3000), ()) for n in range(1, 6)}}
    toy.cut_after = 0  # nothing ever arrives
    with pytest.raises(ConnectionLost):
        run(str(tmp_path / "a.sqlite"), retries=2)
    assert toy.connections == 3  # the first try and two retries


def test_a_folder_pattern_that_matches_nothing_lists_the_folders(toy: ToyServer, tmp_path: Path) -> None:
    toy.folders = {"INBOX": {}, "Work": {}}
    with pytest.raises(UsageError, match=r"include 'Wrok' matches no folder; the server has: INBOX, Work"):
        run(str(tmp_path / "a.sqlite"), include=("Wrok",))
    with pytest.raises(UsageError, match="exclude 'Junk'"):
        run(str(tmp_path / "a.sqlite"), exclude=("Junk",))


def test_an_unknown_scheme_is_a_usage_error_naming_the_known_ones() -> None:
    with pytest.raises(UsageError, match="imaps://user@host"):
        sources.open_source("ftp://me@host", Connect(secret=""))
