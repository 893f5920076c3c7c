"""Where mail comes from: the Source protocol, and open_source(url) to get one.

A source is anything that holds folders of messages and can hand over their
bytes: an IMAP account (imap.py), a POP3 maildrop (pop3.py), or an archive being
read back (restore). The backup loop in pipeline.py, prune.py and the transfer
engine talk to sources only through this protocol and the records below.

The contract, in the order a caller uses it:

1. ``folders()`` lists what there is.
2. ``open(folder)`` selects one folder and returns an ``OpenFolder``: its
   ``Checkpoint`` and every id in it, ascending. Ids are ints (IMAP UIDs,
   catalog ids) or strings (POP3 UIDLs); an id means the same message for as
   long as ``checkpoint.validity`` stays the same. Every other call below acts on
   the folder opened last.
3. ``listing(ids)`` yields ``Listed(id, size)`` for the ids asked for, in
   slices of at most ``LIST_SLICE``, so memory stays flat however big the folder.
   Ids that vanished since ``open`` are left out.
4. ``fetch(batch)`` takes ``Listed`` records, sizes included, and yields one
   ``Fetched`` per id, in the order the bytes arrive. The sizes bound what the
   source accepts from the wire (a guard against a server announcing absurd
   literals), so they are passed in, never remembered from step 3. When the
   connection drops, everything yielded before stays valid, a ``Fetched`` with
   ``partial`` bytes may come for the message that was cut, and then
   ``ConnectionLost`` is raised. Passing that prefix back in ``resume`` on a new
   connection lets a source that can (``traits.resumes``) send only the rest.
5. Optional, see ``traits``: ``flag_changes(since, ids)`` reports flags that
   changed since a checkpoint; ``before(cutoff)`` names ids older than a date;
   ``delete(ids)`` removes messages.
6. ``close(commit=...)``: a source whose deletes take effect at a clean end
   (POP3's QUIT) carries them out only when commit is true.

A source whose folders are views of one folder (Gmail's labels, sources/gmail.py)
has ``plan(listed, chosen)`` and ``sync_views(store, listed, views)``: the loop
downloads only ``plan().download`` and then lets the source fill the views.

A new kind of source is one new module plus one ``register(...)`` line below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, Union

from ..errors import UsageError
from ..model import Folder, Message

SourceId = Union[int, str]
LIST_SLICE = 5000  # ids per listing slice: RFC822.SIZE for 5,000 UIDs is one round trip


@dataclass(frozen=True)
class Traits:
    """What a kind of source can do, known before connecting (so options can be checked early)."""

    name: str  # "IMAP", "POP3": for messages to the user
    many_folders: bool  # False: one maildrop, archived under one folder name (--into)
    flags: bool  # flag_changes() reports something
    resumes: bool  # fetch() can continue a cut message from a prefix
    deletes_at_close: bool  # delete() takes effect only at close(commit=True)
    exact_sizes: bool  # a listed size is the length of the bytes fetch() gives (POP3 may add a CRLF)


@dataclass(frozen=True)
class Checkpoint:
    """Where a folder stood when opened. Ids compare only under the same validity."""

    validity: int | None  # IMAP UIDVALIDITY; None when an id never changes meaning (POP3 UIDL)
    modseq: int | None = None  # CONDSTORE HIGHESTMODSEQ, when the source has one


@dataclass(frozen=True)
class OpenFolder:
    folder: Folder
    checkpoint: Checkpoint
    ids: Sequence[SourceId]  # every message now in the folder, ascending for int ids
    notes: tuple[str, ...] = ()  # things the user should know, e.g. a fallback in use


@dataclass(frozen=True)
class Listed:
    """One message as listed: its id and its size in bytes (as the source reports it)."""

    id: SourceId
    size: int


@dataclass(frozen=True)
class Fetched:
    """The outcome for one id: its message, or why there is none (failure).

    Neither message nor failure: the line dropped while this message was read,
    and ``partial`` holds the prefix of it that arrived (perhaps empty).
    """

    id: SourceId
    message: Message | None
    failure: str | None = None
    partial: bytes = b""


class Source(Protocol):
    """A connected source of mail. See the module docstring for the contract."""

    traits: Traits

    def folders(self) -> list[Folder]:
        """Every folder, selectable or not."""
        ...

    def open(self, folder: Folder, *, writable: bool = False) -> OpenFolder:
        """Select a folder read-only; writable only for a caller that deletes."""
        ...

    def listing(self, ids: Sequence[SourceId]) -> Iterator[list[Listed]]:
        """(id, size) of the ids asked for, a slice at a time; vanished ids are left out."""
        ...

    def fetch(self, batch: Sequence[Listed], resume: Mapping[SourceId, bytes] = {}) -> Iterator[Fetched]:
        """One Fetched per id in batch; raises ConnectionLost after yielding what arrived whole."""
        ...

    def flag_changes(self, since: Checkpoint, ids: Sequence[SourceId]) -> Iterator[dict[SourceId, tuple[str, ...]]]:
        """Current flags of those of ids that changed since the checkpoint, in chunks (all of
        them when the source cannot tell what changed). Nothing for a source without flags."""
        ...

    def before(self, cutoff: datetime) -> Sequence[SourceId] | None:
        """Ids the source itself dates before cutoff; None when it keeps no dates (ask the archive)."""
        ...

    def delete(self, ids: Sequence[SourceId]) -> None:
        """Remove exactly these messages (see traits.deletes_at_close)."""
        ...

    def close(self, *, commit: bool = True) -> None:
        """Hang up; commit=False after a failure, so deferred deletes never happen."""
        ...


@dataclass(frozen=True)
class Connect:
    """How to reach and log in to a source's server."""

    secret: str  # a password, or an OAuth2 access token when auth is not "password"
    auth: str = "password"  # "password", "xoauth2" or "oauthbearer"
    ca_file: str | None = None
    no_tls: bool = False
    timeout: float = 120.0  # covers connect, TLS handshake, greeting and every read
    admin_user: str | None = None  # log in as this administrator on behalf of the URL's user (SASL PLAIN)
    gmail_trash_and_spam: bool = False  # Gmail (sources/gmail.py): download Trash and Spam too


@dataclass(frozen=True)
class Kind:
    traits: Traits
    opener: Callable[[str, Connect], Source]  # connect and log in
    address: Callable[[str, Connect], str]  # check the URL without connecting; how to name it to the user


_KINDS: dict[str, Kind] = {}


def register(
    schemes: Sequence[str],
    traits: Traits,
    opener: Callable[[str, Connect], Source],
    address: Callable[[str, Connect], str],
) -> None:
    for scheme in schemes:
        _KINDS[scheme] = Kind(traits, opener, address)


def source_kind(url: str) -> Kind:
    """The kind of source a URL names, without connecting; a UsageError for an unknown scheme."""
    scheme, sep, _ = url.partition("://")
    kind = _KINDS.get(scheme.lower()) if sep else None
    if kind is None:
        raise UsageError(f"source {url!r} must look like {' or '.join(s + '://user@host[:port]' for s in _KINDS)}")
    return kind


def open_source(url: str, connect: Connect) -> Source:
    """Connect to the source a URL names and log in."""
    return source_kind(url).opener(url, connect)


def account_name(url: str) -> str:
    """USER@HOST, the account an archive records for scheme://user@host[:port] (the user may hold '@')."""
    rest = url.partition("://")[2]
    user, _, host = rest.rpartition("@")
    host = host.split("/", 1)[0]
    if host.startswith("["):  # [IPv6]:port
        host = host[: host.find("]") + 1]
    else:
        host = host.rsplit(":", 1)[0]
    return f"{user}@{host.lower()}"


def imap_source(url: str, connect: Connect) -> Source:
    """Log in to an IMAP server: a Gmail source on Gmail, a plain IMAP source elsewhere."""
    from .imap import ImapSource

    session = ImapSource.login(url, connect)
    if session.has("X-GM-EXT-1"):  # Gmail: labels, not folders
        from .gmail import GmailSource

        return GmailSource.from_session(session, connect)
    return ImapSource(session)


def _open_pop3(url: str, connect: Connect) -> Source:
    from .pop3 import Pop3Source

    return Pop3Source.open_url(url, connect)


def _server_address(schemes: tuple[str, ...]) -> Callable[[str, Connect], str]:
    def address(url: str, connect: Connect) -> str:
        from ..net import parse_url

        return str(parse_url(url, no_tls=connect.no_tls, schemes=schemes))

    return address


IMAP = Traits("IMAP", many_folders=True, flags=True, resumes=True, deletes_at_close=False, exact_sizes=True)
POP3 = Traits("POP3", many_folders=False, flags=False, resumes=False, deletes_at_close=True, exact_sizes=False)
register(("imaps", "imap"), IMAP, imap_source, _server_address(("imap", "imaps")))
register(("pop3s", "pop3"), POP3, _open_pop3, _server_address(("pop3", "pop3s")))
