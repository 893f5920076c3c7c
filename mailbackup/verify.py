"""Verification: every stored message re-hashes to its catalog SHA-256, nothing unrecorded
lies in the store, and (optionally) the archive agrees with the live IMAP server.

Problems are handed to a callback as they are found, so memory stays flat however
many messages (or problems) the archive holds.
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .catalog import Catalog
from .errors import ArchiveCorrupt, StoreError, UsageError, setting
from .model import ArchivedFolder, Entry, Folder
from .net import parse_url
from .pipeline import batches, diff_sorted, wanted
from .sources.gmail import is_hidden
from .sources.imap import ImapSource
from .stores import Store, open_store
from .stores.codec import content_name

# Problem kinds, stable for --json.
MISSING = "missing"  # the catalog has an entry whose bytes are not in the store
CORRUPT = "corrupt"  # the stored bytes do not hash to the catalog's SHA-256
UNRECORDED = "unrecorded"  # bytes in the store the catalog does not know
NOT_ARCHIVED = "not-archived"  # on the server, not in the archive
NOT_ON_SERVER = "not-on-server"  # live in the archive, gone from the server
DIFFERS = "differs"  # the server's bytes hash differently from the archive's
UID_VALIDITY = "uidvalidity"  # the server folder was reset since the last backup
DUPLICATE = "duplicate"  # one message stored twice in one folder


@dataclass(frozen=True)
class Problem:
    kind: str
    folder: str | None
    detail: str
    entry_id: int | None = None
    uid: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"problem": self.kind, "folder": self.folder, "detail": self.detail, "id": self.entry_id, "uid": self.uid}


@dataclass(frozen=True)
class VerifySummary:
    archive: str
    checked: int  # stored messages re-hashed
    bytes: int
    compared: int  # server messages whose bytes were compared (with --against)
    problems: dict[str, int] = field(default_factory=dict)  # kind -> count
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {
            "archive": self.archive,
            "ok": self.ok,
            "checked": self.checked,
            "bytes": self.bytes,
            "compared": self.compared,
            "problems": dict(self.problems),
            "elapsed": round(self.elapsed, 3),
        }


@dataclass(frozen=True)
class AgainstOptions:
    """How to reach the server for --against; the same TLS options as backup."""

    source: str
    password: str
    sample: float = 100.0  # percent of the messages present on both sides whose bytes are fetched
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    no_tls: bool = False
    ca_file: str | None = None
    timeout: float = 120.0
    seed: int | None = None
    auth: str = "password"  # or an OAuth2 SASL mechanism: password is then an access token
    admin_user: str | None = None  # log in as this admin for the URL's user


Report = Callable[[Problem], None]


class _Counter:
    """Counts problems by kind and passes each one on."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.counts: dict[str, int] = {}

    def __call__(self, problem: Problem) -> None:
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        self.report(problem)


def verify(
    archive: str,
    *,
    report: Report = lambda problem: None,
    against: AgainstOptions | None = None,
    mailbox: str | None = None,
) -> VerifySummary:
    """Check ARCHIVE (and, with `against`, the server); every problem goes to `report`.

    mailbox (user@host) picks one account of an archive that holds several.
    """
    started = time.monotonic()
    endpoint = None
    if against is not None:
        endpoint = parse_url(against.source, no_tls=against.no_tls, schemes=("imap", "imaps"))
        if not 0 < against.sample <= 100:
            raise UsageError(f"{setting('sample')} needs a percentage above 0 and at most 100")
    store = open_store(archive, mode="read", account=mailbox)
    counter = _Counter(report)
    try:
        if mailbox is None and endpoint is not None and len(store.catalog.accounts()) > 1:
            # Several accounts and none named: the one --against logs in as.
            store.catalog.choose_account(f"{endpoint.user}@{endpoint.host}", claim=False, several=True)
        folders = {f.id: f for f in store.catalog.folders()}
        checked, size = check_stored(store, folders, counter)
        check_unrecorded(store, counter)
        check_duplicates(store, list(folders.values()), counter)
        compared = 0
        if against is not None and endpoint is not None:
            source = ImapSource.connect(
                endpoint,
                against.password,
                ca_file=against.ca_file,
                timeout=against.timeout,
                auth=against.auth,
                admin_user=against.admin_user,
            )
            try:
                compared = compare_with_server(source, store, against, counter)
            finally:
                source.close()
    finally:
        store.close()
    return VerifySummary(store.url, checked, size, compared, dict(counter.counts), time.monotonic() - started)


def check_stored(store: Store, folders: dict[int, ArchivedFolder], report: Report) -> tuple[int, int]:
    """Re-read every entry's bytes and compare their SHA-256 with the catalog's."""
    checked = size = 0
    for entry in store.catalog.entries():
        name = folders[entry.folder_id].name
        try:
            raw = store.get(entry.location)
        except ArchiveCorrupt as exc:  # an encrypted object that fails authentication, named
            report(Problem(CORRUPT, name, str(exc), entry.id, entry.uid))
            continue
        except StoreError as exc:
            report(Problem(MISSING, name, str(exc), entry.id, entry.uid))
            continue
        digest = content_name(store, raw)
        checked += 1
        size += len(raw)
        if digest != entry.sha256:
            report(
                Problem(
                    CORRUPT,
                    name,
                    f"{entry.location}: SHA-256 {digest[:16]}… instead of {entry.sha256[:16]}… ({len(raw)} bytes, {entry.size} recorded)",
                    entry.id,
                    entry.uid,
                )
            )
    return checked, size


def check_unrecorded(store: Store, report: Report) -> None:
    for finding in store.unrecorded():
        report(Problem(UNRECORDED, finding.folder, finding.detail))


def check_duplicates(store: Store, folders: Sequence[ArchivedFolder], report: Report) -> None:
    """Second copies of one message in one folder: in the store's files, or as catalog entries."""
    for finding in store.duplicates():
        report(Problem(DUPLICATE, finding.folder, finding.detail))
    for folder in folders:
        for sha256, copies in store.catalog.duplicates(folder.id):
            report(Problem(DUPLICATE, folder.name, f"{copies} entries hold {sha256[:16]}… and no server id tells them apart"))


def compare_with_server(source: ImapSource, store: Store, options: AgainstOptions, report: Report) -> int:
    """Folder by folder: UIDVALIDITY, UIDs both ways, and the bytes of a sample. Returns messages compared."""
    catalog = store.catalog
    chooser = random.Random(options.seed)
    compared = 0
    seen: set[str] = set()
    # Gmail: label folders hold All Mail's messages under All Mail's UIDs, so they are checked
    # through All Mail; Trash and Spam are left out of a backup unless asked for.
    names = {f.id: f.name for f in catalog.folders()}
    views = {names[folder_id] for folder_id in catalog.gmail_views() if folder_id in names}
    gmail = source.session.has("X-GM-EXT-1")
    for folder in source.folders():
        if not folder.selectable or not wanted(folder, options.include, options.exclude):
            continue
        seen.add(folder.name)
        if folder.name in views or (gmail and is_hidden(folder) and catalog.folder(folder.name) is None):
            continue
        state = source.examine(folder)
        server = source.uids() if state.exists else []
        archived = catalog.folder(folder.name)
        if archived is None:
            if server:
                report(Problem(NOT_ARCHIVED, folder.name, f"folder with {len(server)} messages is not in the archive"))
            continue
        if archived.uid_validity is not None and archived.uid_validity != state.uid_validity:
            report(
                Problem(
                    UID_VALIDITY,
                    folder.name,
                    f"UIDVALIDITY is {state.uid_validity} on the server, {archived.uid_validity} in the archive; "
                    "a backup will match messages by SHA-256",
                )
            )
            continue
        known = catalog.live_uids(archived.id, state.uid_validity)
        only_server, only_archive = diff_sorted(server, known)
        for uid in only_server:
            report(Problem(NOT_ARCHIVED, folder.name, f"UID {uid} is on the server but not in the archive", uid=uid))
        for entry in _entries(catalog, archived.id, state.uid_validity, only_archive):
            report(
                Problem(NOT_ON_SERVER, folder.name, f"UID {entry.uid} is in the archive but gone from the server", entry.id, entry.uid)
            )
        absent = set(only_server)
        both = array("q", (u for u in server if u not in absent and (options.sample >= 100 or chooser.random() * 100 < options.sample)))
        compared += _compare_bytes(source, catalog, archived, state.uid_validity, both, report, lambda raw: content_name(store, raw))
    for archived in catalog.folders():
        if archived.name in seen or not wanted_name(archived, options):
            continue
        live = catalog.live_uids(archived.id, archived.uid_validity) if archived.uid_validity is not None else []
        if live:
            report(Problem(NOT_ON_SERVER, archived.name, f"folder with {len(live)} live messages is not on the server"))
    return compared


def wanted_name(archived: ArchivedFolder, options: AgainstOptions) -> bool:
    return wanted(Folder(archived.name, archived.delimiter, archived.attributes), options.include, options.exclude)


def _entries(catalog: Catalog, folder_id: int, uid_validity: int, uids: Sequence[int]) -> Iterator[Entry]:
    for start in range(0, len(uids), 500):
        yield from sorted(catalog.entries_for_uids(folder_id, uid_validity, uids[start : start + 500]), key=lambda e: e.uid or 0)


def _compare_bytes(
    source: ImapSource, catalog: Catalog, archived: ArchivedFolder, uid_validity: int, uids: Sequence[int], report: Report,
    name: Callable[[bytes], str],
) -> int:
    compared = 0
    for start in range(0, len(uids), 2000):
        entries = {e.uid: e for e in catalog.entries_for_uids(archived.id, uid_validity, uids[start : start + 2000])}
        sizes = {uid: entry.size for uid, entry in entries.items() if uid is not None}
        for batch in batches(sorted(sizes), sizes, 200, 16 << 20):
            fetched, missing = source.fetch_uids(batch, sizes)
            for uid in missing:
                report(Problem(NOT_ARCHIVED, archived.name, f"UID {uid}: the server sent no body to compare", uid=uid))
            for message in fetched:
                entry = entries[message.uid or 0]
                compared += 1
                if name(message.raw) != entry.sha256:  # a keyed MAC in an encrypted archive
                    report(
                        Problem(
                            DIFFERS,
                            archived.name,
                            f"UID {message.uid}: the server's bytes hash to {message.sha256[:16]}…, "
                            f"the archive's to {entry.sha256[:16]}…",
                            entry.id,
                            message.uid,
                        )
                    )
    return compared
