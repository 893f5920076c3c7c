"""IMAP source: folders, UIDs, flags and message bytes, read-only (EXAMINE, BODY.PEEK).

imapclient's dicts are turned into model records here and nowhere else; the
session itself (connect, login, literal guard, UID FETCH) is imapconn.py's.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from imapclient.datetime_util import parse_to_datetime

from ..errors import ServerError
from ..imapconn import (  # noqa: F401  (parse_fetch and friends: imported from here by tests)
    BIG_LITERAL,
    SMALL_LITERAL,
    Cut,
    ImapSession,
    as_folder,
    command_errors,
    literal_room,
    parse_fetch,
    parse_fetch_fast,
    parse_fetch_general,
    sequence_set,
)
from ..model import Folder, FolderState, Message
from ..net import Endpoint, parse_url
from . import (
    IMAP,
    LIST_SLICE,
    Checkpoint,
    Connect,
    Fetched,
    Listed,
    OpenFolder,
    SourceId,
)

FETCH_ITEMS = ["BODY.PEEK[]", "FLAGS", "INTERNALDATE", "RFC822.SIZE"]
FLAG_CHUNK = 2000
EXPUNGE_CHUNK = 1000
# \Recent belongs to a session and cannot be set again on restore.
SESSION_FLAGS = {"\\recent"}


def decode_flags(flags: Sequence[bytes | str]) -> tuple[str, ...]:
    out = set()
    for flag in flags:
        text = flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)
        if text.lower() not in SESSION_FLAGS:
            out.add(text)
    return tuple(sorted(out))


def decode_date(value: datetime | None) -> datetime | None:
    """Keep the server's own UTC offset, as a plain datetime.timezone."""
    if value is None or value.tzinfo is None:
        return value
    offset = value.utcoffset() or timedelta(0)
    return value.replace(tzinfo=timezone(offset))


def as_message(uid: int, raw: bytes, data: Mapping[bytes, object]) -> Message:
    date = data.get(b"INTERNALDATE")
    return Message(
        raw=raw,
        flags=decode_flags(data.get(b"FLAGS", ())),  # type: ignore[arg-type]  # parsed FETCH values are untyped
        internal_date=decode_date(parse_to_datetime(date, normalise=False)) if isinstance(date, bytes) else None,
        uid=uid,
    )


def body_of(data: Mapping[bytes, object]) -> tuple[int, bytes] | None:
    """(offset, bytes) of BODY[] or a partial BODY[]<offset> in a parsed FETCH response."""
    for key, value in data.items():
        if key == b"BODY[]" and isinstance(value, bytes):
            return 0, value
        if key.startswith(b"BODY[]<") and isinstance(value, bytes):
            return int(key[7:].rstrip(b">").split(b".")[0]), value
    return None


class ImapSource:
    """An IMAP account as a Source (see sources/__init__.py)."""

    traits = IMAP

    def __init__(self, session: ImapSession) -> None:
        self.session = session
        self.client = session.client
        self.endpoint = session.endpoint
        self.condstore = session.has("CONDSTORE")
        if self.condstore and session.has("ENABLE"):
            self.client.enable("CONDSTORE")
        self._state: FolderState | None = None  # of the folder opened last

    @classmethod
    def open_url(cls, url: str, connect: Connect) -> ImapSource:
        return cls(cls.login(url, connect))

    @staticmethod
    def login(url: str, connect: Connect) -> ImapSession:
        endpoint = parse_url(url, no_tls=connect.no_tls, schemes=("imap", "imaps"))
        return ImapSession.connect(
            endpoint,
            connect.secret,
            ca_file=connect.ca_file,
            timeout=connect.timeout,
            auth=connect.auth,
            admin_user=connect.admin_user,
        )

    @classmethod
    def connect(cls, endpoint: Endpoint, password: str, **options: Any) -> ImapSource:
        return cls(ImapSession.connect(endpoint, password, **options))

    def __str__(self) -> str:
        return str(self.endpoint)

    def close(self, *, commit: bool = True) -> None:
        self.session.close()

    def folders(self) -> list[Folder]:
        with command_errors():
            listed = self.client.list_folders()
        return [as_folder(*item) for item in listed]

    def personal_prefix(self) -> str:
        """The personal namespace's prefix: "INBOX." on Cyrus and Courier, "" on Dovecot or without NAMESPACE."""
        if not self.session.has("NAMESPACE"):
            return ""
        with command_errors():
            personal = self.client.namespace().personal
        return str(personal[0][0]) if personal else ""

    # the Source protocol

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        state = self.examine(folder, writable=writable)
        ids = self.uids() if state.exists else array("q")
        return OpenFolder(folder, Checkpoint(state.uid_validity, state.highest_modseq), ids)

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        for start in range(0, len(ids), LIST_SLICE):
            part = ids[start : start + LIST_SLICE]
            sizes = self.sizes(part)  # type: ignore[arg-type]  # an IMAP folder's ids are int UIDs
            # A UID without a size was expunged since SEARCH: nothing to back up.
            yield [Listed(uid, sizes[uid]) for uid in part if uid in sizes]

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        """BODY.PEEK[] for the batch; a message cut earlier is asked for from where it broke off."""
        if not batch:
            return
        limit = literal_room(max(item.size for item in batch))
        for item in batch:
            prefix = resume.get(item.id)
            if prefix:
                yield from self._fetch_rest(item, prefix, limit)
        whole = [int(item.id) for item in batch if not resume.get(item.id)]
        if whole:
            yield from self._fetch_whole(whole, limit)

    def _fetch_whole(self, uids: list[int], limit: int) -> Iterator[Fetched]:
        pending = dict.fromkeys(uids)
        try:
            for part in self.session.uid_fetch_stream(sequence_set(uids), FETCH_ITEMS, literal_limit=limit):
                if isinstance(part, Cut):
                    if part.uid in pending and part.offset == 0 and part.data:
                        yield Fetched(part.uid, None, partial=part.data)
                    continue
                for uid, data in part.items():
                    body = body_of(data)
                    if uid in pending and body is not None and body[0] == 0:
                        del pending[uid]
                        yield Fetched(uid, as_message(uid, body[1], data))
        except ServerError as exc:
            yield from (Fetched(uid, None, str(exc)) for uid in pending)
            return
        yield from (Fetched(uid, None, "server sent no body") for uid in pending)

    def _fetch_rest(self, item: Listed, prefix: bytes, limit: int) -> Iterator[Fetched]:
        uid, offset = int(item.id), len(prefix)
        items = ["FLAGS", "INTERNALDATE", f"BODY.PEEK[]<{offset}.{limit}>"]
        try:
            for part in self.session.uid_fetch_stream(str(uid), items, literal_limit=limit):
                if isinstance(part, Cut):
                    if part.uid == uid and part.offset == offset:
                        yield Fetched(uid, None, partial=prefix + part.data)
                    continue
                body = body_of(part.get(uid, {}))
                if body is not None and body[0] == offset:
                    yield Fetched(uid, as_message(uid, prefix + body[1], part[uid]))
                    return
        except ServerError as exc:
            yield Fetched(uid, None, str(exc))
            return
        yield Fetched(uid, None, "server sent no body")

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        """With CONDSTORE, only what changed since the checkpoint's MODSEQ; otherwise a FLAGS sweep."""
        now = self._state.highest_modseq if self._state else None
        if now is not None and since.modseq is not None:
            if now == since.modseq:
                return
            changed = self.changed_flags(since.modseq)
            uids = sorted(changed)
            for start in range(0, len(uids), FLAG_CHUNK):
                yield {uid: changed[uid] for uid in uids[start : start + FLAG_CHUNK]}
            return
        for start in range(0, len(ids), FLAG_CHUNK):
            yield dict(self.flags(ids[start : start + FLAG_CHUNK]))  # type: ignore[arg-type]  # an IMAP folder's ids are int UIDs

    def before(self, cutoff: datetime) -> Sequence[SourceId]:
        # SEARCH BEFORE compares dates only, in the server's idea of the day.
        return self.uids(["BEFORE", cutoff.date()]) if self._state and self._state.exists else []

    def delete(self, ids: Sequence[SourceId]) -> None:
        for start in range(0, len(ids), EXPUNGE_CHUNK):
            self.expunge([int(uid) for uid in ids[start : start + EXPUNGE_CHUNK]])

    # IMAP commands

    def examine(self, folder: Folder, *, writable: bool = False) -> FolderState:
        """EXAMINE (read-only); SELECT only for the one command that deletes, prune-server."""
        with command_errors():
            response = self.client.select_folder(folder.name, readonly=not writable)
        if b"UIDVALIDITY" not in response:
            raise ServerError(f"{folder.name}: server sent no UIDVALIDITY")
        self._state = FolderState(
            uid_validity=int(response[b"UIDVALIDITY"]),
            exists=int(response.get(b"EXISTS", 0)),
            uid_next=response.get(b"UIDNEXT"),
            highest_modseq=response.get(b"HIGHESTMODSEQ") if self.condstore else None,
        )
        return self._state

    def status(self, folder: Folder) -> dict[str, int | None]:
        """MESSAGES, UIDVALIDITY and HIGHESTMODSEQ of a folder without selecting it (RFC 7162 STATUS)."""
        items = ["MESSAGES", "UIDVALIDITY"] + (["HIGHESTMODSEQ"] if self.condstore else [])
        with command_errors():
            response = self.client.folder_status(folder.name, items)
        return {item: int(response[item.encode()]) if item.encode() in response else None for item in items}

    def uids(self, criteria: str | list[Any] = "ALL") -> array[int]:
        """The UIDs in the selected folder that match, ascending."""
        with command_errors():
            found = self.client.search(criteria)
        return array("q", sorted(int(u) for u in found))

    def expunge(self, uids: Sequence[int]) -> None:
        """Mark uids \\Deleted and expunge exactly them.

        Without UIDPLUS a plain EXPUNGE would also remove messages the user had
        marked \\Deleted, so it is only sent when none but ours are marked.
        """
        with command_errors():
            self.client.add_flags(list(uids), [b"\\Deleted"], silent=True)
            if self.session.has("UIDPLUS"):
                self.client.uid_expunge(list(uids))
                return
            marked = set(self.client.search("DELETED"))
            if marked != set(uids):
                self.client.remove_flags(list(uids), [b"\\Deleted"], silent=True)
                raise ServerError(
                    "server lacks UIDPLUS and other messages are marked \\Deleted; "
                    "expunging would remove them too, so nothing was deleted"
                )
            self.client.expunge()

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        response = self.session.uid_fetch(sequence_set(uids), ["RFC822.SIZE"])
        return {uid: int(data.get(b"RFC822.SIZE", 0)) for uid, data in response.items()}  # type: ignore[call-overload]  # parsed FETCH values are untyped

    def flags(self, uids: Sequence[int]) -> dict[int, tuple[str, ...]]:
        response = self.session.uid_fetch(sequence_set(uids), ["FLAGS"])
        return {uid: decode_flags(data.get(b"FLAGS", ())) for uid, data in response.items()}  # type: ignore[arg-type]  # parsed FETCH values are untyped

    def changed_flags(self, modseq: int) -> dict[int, tuple[str, ...]]:
        """Flags of the messages changed since modseq (CONDSTORE)."""
        response = self.session.uid_fetch("1:*", ["FLAGS"], f"(CHANGEDSINCE {modseq})")
        return {uid: decode_flags(data.get(b"FLAGS", ())) for uid, data in response.items()}  # type: ignore[arg-type]  # parsed FETCH values are untyped

    def fetch_uids(self, uids: Sequence[int], sizes: Mapping[int, int]) -> tuple[list[Message], list[int]]:
        """A batch as (messages, UIDs the server sent no body for); sizes bound the literals."""
        messages, missing, refused = [], [], None
        for fetched in self.fetch([Listed(uid, sizes.get(uid, 0)) for uid in uids]):
            if fetched.message is not None:
                messages.append(fetched.message)
            elif fetched.failure == "server sent no body":
                missing.append(int(fetched.id))
            else:
                refused = fetched.failure
        if refused is not None:
            raise ServerError(refused)
        order = {uid: n for n, uid in enumerate(uids)}
        messages.sort(key=lambda m: order.get(m.uid or 0, 0))
        return messages, missing
