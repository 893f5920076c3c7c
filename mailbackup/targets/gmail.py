"""Restore a Gmail archive to Gmail: each message once, into All Mail, then its labels.

A backup from Gmail (sources/gmail.py) keeps All Mail plus one folder per label,
the label folders marked in the catalog as views of All Mail. Appending every
folder to Gmail would make one new message per label. So when the target offers
X-GM-EXT-1, the label folders are not appended; the engine appends All Mail (the
journal says which target UID each message got), and then each label is put back
with ``UID STORE +X-GM-LABELS``, which is idempotent, so a rerun is safe.

The labels come from the label folders' own entries, chosen as the restore chooses
messages, so ``--as-of`` and ``--include-gone`` restore the labels of that time.
To any other server, nothing here applies: the label folders are ordinary folders.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ..catalog import Selection
from ..journal import DONE, FOUND, Journal
from ..model import Folder
from ..stores import Store
from ..transfer import journal_item
from .imap import ImapTarget, command_errors

LABEL_CHUNK = 500


def offers_labels(target: object) -> bool:
    """Whether a connected target is Gmail (X-GM-EXT-1)."""
    return isinstance(target, ImapTarget) and target.session.has("X-GM-EXT-1")


@dataclass(frozen=True)
class LabelPlan:
    """The archive's label folders, and the folders they are views of."""

    views: dict[int, tuple[int, str]]  # label folder id -> (All Mail folder id, label)
    names: dict[int, str]  # folder id -> name

    def hidden(self, wanted: Callable[[str], bool]) -> frozenset[str]:
        """Label folders a restore to Gmail does not append: those whose All Mail is restored too.
        (A restore of only some label folders appends them as folders, so nothing is left out.)"""
        return frozenset(self.names[view] for view, (of_id, _) in self.views.items() if wanted(self.names[of_id]))

    def labels(self, store: Store, selection: Selection) -> dict[int, dict[tuple[int | None, int | None], set[str]]]:
        """All Mail folder id -> (UIDVALIDITY, UID) of its message -> labels, from the label folders' entries."""
        out: dict[int, dict[tuple[int | None, int | None], set[str]]] = defaultdict(lambda: defaultdict(set))
        for folder_id, (of_id, label) in self.views.items():
            for entry in store.catalog.selected_entries(folder_id, selection):
                out[of_id][(entry.uid_validity, entry.uid)].add(label)
        return out


def label_plan(store: Store) -> LabelPlan | None:
    views = store.catalog.gmail_views()
    if not views:
        return None
    return LabelPlan(views, {f.id: f.name for f in store.catalog.folders()})


def apply_labels(
    target: ImapTarget, store: Store, journal: Journal, plan: LabelPlan, selection: Selection
) -> int:
    """STORE +X-GM-LABELS on the copies the journal says each All Mail message has; the number of label sets."""
    applied = 0
    folders = {f.id: f for f in store.catalog.folders()}
    for of_id, labels in plan.labels(store, selection).items():
        source = folders[of_id]
        destination = target.destination(source.name, source.delimiter, source.attributes)
        records = journal.records(source.name, destination)
        by_label: dict[str, list[int]] = defaultdict(list)
        for entry in store.catalog.entries(of_id):
            carried = labels.get((entry.uid_validity, entry.uid))
            record = records.get(journal_item(None, entry.id))
            if not carried or record is None or record.state not in (DONE, FOUND) or record.target_uid is None:
                continue
            for label in carried:
                by_label[label].append(record.target_uid)
        if not by_label:
            continue
        with command_errors():
            target.client.select_folder(destination)
            for label, uids in sorted(by_label.items()):
                for start in range(0, len(uids), LABEL_CHUNK):
                    target.client.add_gmail_labels(sorted(uids[start : start + LABEL_CHUNK]), [label], silent=True)
                    applied += len(uids[start : start + LABEL_CHUNK])
            target.client.unselect_folder() if target.unselect else target.client.close_folder()
    return applied


def without(folders: list[Folder], hidden: frozenset[str]) -> list[Folder]:
    return [f for f in folders if f.name not in hidden]
