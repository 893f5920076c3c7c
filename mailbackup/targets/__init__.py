"""Where restored mail goes: an IMAP account (imap.py, APPEND) or an SMTP server (smtp.py).

A target receives batches of `Outgoing` messages for one destination and answers
with one `Delivered` per message. Sending and collecting are separate calls so that
a target may keep several batches in flight (IMAP pipelining) while the caller
stays sequential: mark a batch in flight in the journal, send it, collect results.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class Outgoing:
    """One message to deliver; `item` is its journal key."""

    item: str
    raw: bytes
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None


@dataclass(frozen=True)
class Delivered:
    """What the target said about one message."""

    item: str
    ok: bool
    uid: int | None = None
    uid_validity: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Destination:
    """A target mailbox (IMAP) or a recipient list (SMTP), ready to receive."""

    name: str
    uid_validity: int | None = None
    # The UIDs there now; None when the target cannot be asked (SMTP).
    uids: frozenset[int] | None = None
    # (Message-ID or None, size) -> the UIDs of the messages there with it; filled when
    # opened with contents=True (it costs a FETCH of every message's size and Message-ID).
    where: Mapping[tuple[str | None, int], tuple[int, ...]] = field(default_factory=dict)
    contents: bool = False
    exists: bool = True  # False: a dry run found no such folder
    created: bool = False  # this run created the folder

    @property
    def present(self) -> Counter[tuple[str | None, int]]:
        """(Message-ID or None, size) of every message there, with multiplicity."""
        return Counter({key: len(uids) for key, uids in self.where.items()})


class Target(Protocol):
    identity: str  # the journal's name for this target
    window: int  # batches kept in flight

    def destination(self, source_name: str, delimiter: str | None, attributes: frozenset[str]) -> str:
        """The destination name for an archived or source folder."""

    def open(self, name: str, *, create: bool = True, contents: bool = True) -> Destination:
        """Make the destination ready (create the folder) and say what it holds already:
        its UIDVALIDITY and UIDs always, each message's (Message-ID, size) if contents.

        With create=False (a dry run) nothing changes: a missing folder comes back with exists=False.
        """

    def copies(self, destination: Destination, size: int, sha256: str) -> list[int]:
        """The UIDs of the messages in the destination that have exactly these bytes."""

    def settle(self, name: str, quiet: float, limit: float) -> None:
        """Return once nothing has arrived in the named destination for `quiet` seconds (at most `limit`).

        After a dropped line the server may still be committing what the dead session sent
        last; what is there is asked only after that, or it would be sent twice.
        """

    def send(self, destination: Destination, batch: Sequence[Outgoing]) -> None:
        """Start delivering a batch."""

    @property
    def pending(self) -> int:
        """Batches sent but not collected."""

    @property
    def full(self) -> bool:
        """Whether to collect before sending more."""

    def collect(self) -> list[Delivered]:
        """Wait for the oldest batch sent and return its outcome, one per message."""

    def store_flags(self, name: str, changes: dict[tuple[str, ...], list[int]]) -> None:
        """Replace the flags of messages in the named destination, by target UID, grouped by new flag set."""

    def close(self) -> None: ...


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)


def header_block(raw: bytes) -> bytes:
    """The header section of a message: everything before the first empty line."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i != -1]
    return raw[: min(ends)] if ends else raw


def message_id(raw: bytes) -> str | None:
    """The Message-ID header, unfolded and stripped, or None."""
    match = _MESSAGE_ID.search(header_block(raw))
    if not match:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip()
    return value.decode("utf-8", "replace") or None
