"""Gmail's label model (X-GM-EXT-1): back up All Mail once; label folders are views of it.

Gmail keeps each message once and shows it in every folder whose label it carries,
and again in "[Gmail]/All Mail". Walking the folders would download a message once
per label. So when the server offers X-GM-EXT-1:

- only All Mail (the \\All folder) is downloaded by the ordinary backup loop; Trash
  and Spam, whose messages are not in All Mail, only when asked for;
- one metadata pass over All Mail, ``UID FETCH (X-GM-MSGID X-GM-THRID X-GM-LABELS)``,
  with ``(CHANGEDSINCE modseq)`` after the first run (Gmail moves a message's MODSEQ
  when its labels change), records each message's labels in the catalog. One pass
  over one folder, instead of a UID walk of every label folder, which would cost a
  SELECT and a FETCH per label and still not tell which message is which without
  X-GM-MSGID;
- each label then becomes an ordinary archive folder holding the message again,
  written through the store's one write path (``put``), so ``ls``, verify, search
  and restore to any server see one folder per label with no special case.
  A Maildir or mbox archive holds one copy per label rather than a hard link: the
  copy takes the stores' one durable write path (no second way to add a message),
  mbox cannot link, a damaged file costs one folder its copy rather than every label
  at once, and cp -r or rsync without -H would make copies of links anyway. SQL
  stores keep message bytes by SHA-256, so there a label costs one catalog row.

The label folders are recorded in the catalog (``gmail_views``) so a restore to a
server with X-GM-EXT-1 appends each message once and sets its labels instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from imapclient import imap_utf7

from ..imapconn import ImapSession, sequence_set
from ..model import Folder, FolderReport, Message
from . import Connect, Traits
from .imap import ImapSource

if TYPE_CHECKING:
    from ..model import Entry
    from ..stores import Store

GMAIL = Traits("Gmail", many_folders=True, flags=True, resumes=True, deletes_at_close=False, exact_sizes=True)
LABEL_ITEMS = ["X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"]
LABEL_SLICE = 5000
COPY_BATCH = 200
# Gmail's published IMAP limits: 2,500 MB downloaded a day, 15 connections per account.
DAILY_BUDGET = 2400 * 1000 * 1000  # bytes: under Google's 2,500 MB, with room for what other clients fetch
MAX_CONNECTIONS = 15
# A system label in X-GM-LABELS -> the special-use attribute of its folder (INBOX has none).
SYSTEM_LABELS = {"\\Sent": "\\Sent", "\\Starred": "\\Flagged", "\\Important": "\\Important", "\\Draft": "\\Drafts"}
HIDDEN = ("\\Trash", "\\Junk")  # their messages are not in All Mail: downloaded only with the option


def decode_labels(value: object) -> tuple[str, ...]:
    """X-GM-LABELS as parsed by imapclient: a tuple of atoms/strings (bytes), or one atom."""
    items = value if isinstance(value, (tuple, list)) else (value,) if value else ()
    out = []
    for item in items:
        text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
        if "&" in text:  # modified UTF-7, as in folder names
            text = imap_utf7.decode(text.encode("ascii", "replace"))
        out.append(text)
    return tuple(sorted(set(out)))


def label_folders(listed: Sequence[Folder]) -> dict[str, Folder]:
    """Label -> the folder Gmail shows it as, for the labels that are not user labels."""
    out: dict[str, Folder] = {}
    for folder in listed:
        if folder.name.upper() == "INBOX":
            out["\\Inbox"] = folder
        for label, attribute in SYSTEM_LABELS.items():
            if attribute in folder.attributes:
                out[label] = folder
    return out


def is_all_mail(folder: Folder) -> bool:
    return "\\All" in folder.attributes


def is_hidden(folder: Folder) -> bool:
    return any(a in folder.attributes for a in HIDDEN)


@dataclass(frozen=True)
class Plan:
    """What a backup does with the wanted folders of a Gmail account."""

    download: list[Folder]  # All Mail (and Trash, Spam when asked for): the ordinary loop
    views: list[Folder]  # label folders, filled from All Mail's labels


class GmailSource(ImapSource):
    """A Gmail account: an IMAP source whose label folders are views of All Mail."""

    traits = GMAIL
    daily_budget = DAILY_BUDGET
    max_connections = MAX_CONNECTIONS

    def __init__(self, session: ImapSession, *, trash_and_spam: bool = False) -> None:
        super().__init__(session)
        self.trash_and_spam = trash_and_spam

    @classmethod
    def from_session(cls, session: ImapSession, connect: Connect) -> GmailSource:
        return cls(session, trash_and_spam=connect.gmail_trash_and_spam)

    def plan(self, listed: Sequence[Folder], chosen: Sequence[Folder]) -> Plan:
        """All Mail is downloaded whenever any of its labels is wanted; labels are views."""
        if not any(is_all_mail(f) for f in listed):
            # No \All folder to read labels from: walk the folders like any IMAP server.
            return Plan(list(chosen), [])
        download, views = [], []
        for folder in chosen:
            if is_all_mail(folder):
                continue
            if is_hidden(folder):
                if self.trash_and_spam:
                    download.append(folder)
            elif folder.selectable:
                views.append(folder)
        all_mail = [f for f in listed if is_all_mail(f)]
        if all_mail and (views or any(is_all_mail(f) for f in chosen)):
            download.insert(0, all_mail[0])
        return Plan(download, views)

    def sync_views(self, store: Store, listed: Sequence[Folder], views: Sequence[Folder]) -> list[FolderReport]:
        """Record All Mail's labels in the catalog and bring each label folder in line with them."""
        all_mail = next((f for f in listed if is_all_mail(f)), None)
        archived = store.catalog.folder(all_mail.name) if all_mail else None
        if all_mail is None or archived is None:
            return []
        state = self.examine(all_mail)
        validity = state.uid_validity
        self.record_labels(store, archived.id, validity, state.highest_modseq)
        labels = store.catalog.gmail_labels(archived.id, validity)
        stored = {e.uid: e for e in store.catalog.entries(archived.id) if not e.gone and e.uid_validity == validity}
        return [
            LabelView(store, archived.id, validity, folder, label).sync(labels, stored)
            for folder, label in self.labels_of(listed, views)
        ]

    def labels_of(self, listed: Sequence[Folder], views: Sequence[Folder]) -> Iterator[tuple[Folder, str]]:
        system = {folder.name: label for label, folder in label_folders(listed).items()}
        for folder in views:
            yield folder, system.get(folder.name, folder.name)

    def record_labels(self, store: Store, folder_id: int, validity: int, modseq: int | None) -> None:
        """One metadata pass over All Mail: only what changed since the last one, with CONDSTORE."""
        catalog = store.catalog
        known_validity, known_modseq = catalog.gmail_checkpoint(folder_id)
        if self.condstore and modseq is not None and known_validity == validity and known_modseq is not None:
            if modseq != known_modseq:
                changed = self.session.uid_fetch("1:*", LABEL_ITEMS, f"(CHANGEDSINCE {known_modseq})")
                catalog.set_gmail_labels(folder_id, validity, as_rows(changed))
        else:
            uids = self.uids() if self._state and self._state.exists else []
            for start in range(0, len(uids), LABEL_SLICE):
                part = self.session.uid_fetch(sequence_set(uids[start : start + LABEL_SLICE]), LABEL_ITEMS)
                catalog.set_gmail_labels(folder_id, validity, as_rows(part))
        # Moves last: labels fetched are in the catalog before the checkpoint says so.
        catalog.set_gmail_checkpoint(folder_id, validity, modseq if self.condstore else None)


def as_rows(response: dict[int, dict[bytes, object]]) -> list[tuple[int, int, int, tuple[str, ...]]]:
    rows = []
    for uid, data in response.items():
        msgid, thrid = data.get(b"X-GM-MSGID"), data.get(b"X-GM-THRID")
        if msgid is None:
            continue
        rows.append((uid, int(msgid), int(thrid if thrid is not None else msgid), decode_labels(data.get(b"X-GM-LABELS"))))  # type: ignore[call-overload]  # FETCH items are untyped: X-GM-MSGID is a number
    return rows


class LabelView:
    """One label folder in the archive, brought in line with the labels All Mail's messages carry."""

    def __init__(self, store: Store, all_mail_id: int, validity: int, folder: Folder, label: str) -> None:
        self.store = store
        self.catalog = store.catalog
        self.all_mail_id = all_mail_id
        self.validity = validity
        self.folder = folder
        self.label = label

    def sync(self, labels: dict[int, tuple[int, int, tuple[str, ...]]], source: dict[int | None, Entry]) -> FolderReport:
        """labels: All Mail's UID -> (X-GM-MSGID, X-GM-THRID, labels); source: its live entries by UID."""
        started = datetime.now(timezone.utc)
        store, catalog = self.store, self.catalog
        archived = catalog.ensure_folder(self.folder, store.folder_path(self.folder))
        catalog.set_gmail_view(archived.id, self.all_mail_id, self.label)
        wanted = {uid for uid, (_, _, carried) in labels.items() if self.label in carried}
        wanted &= set(source)  # a message not stored yet joins its labels when it is
        held = set(catalog.live_uids(archived.id, self.validity))
        new = sorted(wanted - held)
        gone = sorted(held - wanted)
        stored = size = 0
        for start in range(0, len(new), COPY_BATCH):
            batch = [source[uid] for uid in new[start : start + COPY_BATCH]]
            messages = [Message(raw=store.get(e.location), flags=e.flags, internal_date=e.internal_date, uid=e.uid) for e in batch]
            locations = store.put(archived, messages)  # durable first,
            catalog.add(archived.id, self.validity, list(zip(messages, locations)))  # then recorded
            stored += len(messages)
            size += sum(m.size for m in messages)
        if gone:
            catalog.mark_gone(archived.id, self.validity, gone)
        changes = []
        for entry in catalog.entries_for_uids(archived.id, self.validity, sorted(held & wanted)):
            now = source[entry.uid].flags
            if set(now) != set(entry.flags):
                changes.append((entry.id, now, store.set_flags(entry.location, now)))
        catalog.update_flags(changes)
        stale = catalog.mark_stale_gone(archived.id, self.validity) if catalog.has_stale(archived.id, self.validity) else 0
        catalog.set_folder_state(archived.id, self.validity, None)
        # Copies are not counted as new: the summary's new messages and bytes are what was downloaded.
        return FolderReport(
            name=self.folder.name,
            flags_updated=len(changes),
            gone=len(gone) + stale,
            notes=(f"{stored} message(s) labelled {self.label} filed from All Mail ({size} bytes, not downloaded)",) if stored else (),
            elapsed=(datetime.now(timezone.utc) - started).total_seconds(),
        )
