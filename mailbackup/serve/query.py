"""IMAP SEARCH: keys parsed into a predicate, matched against catalog entries and, where needed, the bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from email.utils import parsedate_to_datetime

from ..model import Entry
from .parts import Part, parse, split_header
from .wire import BadCommand, in_ranges, is_sequence_set, sequence_set, text

FLAG_KEYS = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft", "FLAGGED": "\\Flagged", "SEEN": "\\Seen"}


@dataclass
class Candidate:
    """One message being matched; its bytes are read only if a key needs them."""

    seq: int
    uid: int
    entry: Entry
    load: Callable[[], bytes]
    largest_seq: int
    largest_uid: int
    _raw: bytes | None = None
    _part: Part | None = field(default=None)

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.load()
        return self._raw

    @property
    def part(self) -> Part:
        if self._part is None:
            self._part = parse(self.raw)
        return self._part


Predicate = Callable[[Candidate], bool]
# For TEXT and BODY: the SHA-256s the search index finds for a word, or None without an index.
# (matching, covered by the index), or None where the archive has no index.
IndexLookup = Callable[[str], "tuple[set[str], set[str]] | None"]


def _imap_date(token: object) -> date:
    try:
        return datetime.strptime(text(token).strip('"'), "%d-%b-%Y").date()
    except ValueError as exc:
        raise BadCommand(f"bad date {text(token)!r} (want 1-Feb-2024)") from exc


def _internal_day(c: Candidate) -> date | None:
    return c.entry.internal_date.date() if c.entry.internal_date else None


def _sent_day(c: Candidate) -> date | None:
    value = c.part.headers.get("date")
    try:
        return parsedate_to_datetime(str(value)).date() if value else None
    except (TypeError, ValueError):
        return None


def _header_has(name: str, needle: str) -> Predicate:
    lowered = needle.lower()

    def match(c: Candidate) -> bool:
        values = c.part.headers.get_all(name) or []
        if not lowered:
            return bool(values)
        return any(lowered in " ".join(str(v).split()).lower() for v in values)

    return match


def _contains(needle: str, where: str, index: IndexLookup) -> Predicate:
    # Indexed messages match on decoded words (base64, quoted-printable, HTML); others on their bytes.
    words = needle.split()
    found: set[str] | None = None
    covered: set[str] = set()
    for word in words:
        answer = index(word)
        if answer is None:
            found, covered = None, set()
            break
        found = answer[0] if found is None else found & answer[0]
        covered = answer[1]
    raw_needle = needle.lower().encode("utf-8")

    def match(c: Candidate) -> bool:
        if found is not None and c.entry.sha256 in covered:
            return c.entry.sha256 in found
        haystack = c.raw if where == "TEXT" else split_header(c.raw)[1]
        return raw_needle in haystack.lower()

    return match


def _compare_day(day_of: Callable[[Candidate], date | None], when: date, how: str) -> Predicate:
    def match(c: Candidate) -> bool:
        day = day_of(c)
        if day is None:
            return False
        return day < when if how == "BEFORE" else day == when if how == "ON" else day >= when

    return match


def _in_set(spec: str, by_uid: bool) -> Predicate:
    sequence_set(spec, 1)  # a bad set is a BAD answer now, not at the first message
    ranges: list[list[tuple[int, int]]] = []  # parsed once, at the first message: '*' needs the largest

    def match(c: Candidate) -> bool:
        if not ranges:
            ranges.append(sequence_set(spec, c.largest_uid if by_uid else c.largest_seq))
        return in_ranges(c.uid if by_uid else c.seq, ranges[0])

    return match


def parse_keys(tokens: list, index: IndexLookup) -> Predicate:
    """All keys ANDed; raises BadCommand on what it does not know."""
    items = list(tokens)
    if len(items) >= 2 and isinstance(items[0], str) and items[0].upper() == "CHARSET":
        charset = text(items[1]).upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise BadCommand(f"[BADCHARSET (UTF-8 US-ASCII)] charset {charset} not supported")
        items = items[2:]
    predicates = []
    while items:
        predicates.append(_one(items, index))
    return lambda c: all(p(c) for p in predicates)


def _one(items: list, index: IndexLookup) -> Predicate:
    token = items.pop(0)
    if isinstance(token, list):
        inner = list(token)
        parts = []
        while inner:
            parts.append(_one(inner, index))
        return lambda c: all(p(c) for p in parts)
    if is_sequence_set(token):
        return _in_set(str(token), by_uid=False)
    if not isinstance(token, str):
        raise BadCommand("expected a search key")
    key = token.upper()

    def arg() -> object:
        if not items:
            raise BadCommand(f"{key} needs an argument")
        return items.pop(0)

    if key == "ALL":
        return lambda c: True
    if key in FLAG_KEYS:
        flag = FLAG_KEYS[key]
        return lambda c: flag in c.entry.flags
    if key.startswith("UN") and key[2:] in FLAG_KEYS:
        flag = FLAG_KEYS[key[2:]]
        return lambda c: flag not in c.entry.flags
    if key in ("NEW", "RECENT"):
        return lambda c: False  # nothing is \Recent in an archive
    if key == "OLD":
        return lambda c: True
    if key in ("KEYWORD", "UNKEYWORD"):
        word = text(arg()).lower()
        has = key == "KEYWORD"
        return lambda c: (word in {f.lower() for f in c.entry.flags}) == has
    if key in ("BEFORE", "ON", "SINCE"):
        return _compare_day(_internal_day, _imap_date(arg()), key)
    if key in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return _compare_day(_sent_day, _imap_date(arg()), key[4:])
    if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return _header_has(key.lower(), text(arg()))
    if key == "HEADER":
        name = text(arg()).lower()
        return _header_has(name, text(arg()))
    if key in ("TEXT", "BODY"):
        return _contains(text(arg()), key, index)
    if key in ("LARGER", "SMALLER"):
        try:
            size = int(text(arg()))
        except ValueError as exc:
            raise BadCommand(f"{key} needs a number") from exc
        return (lambda c: c.entry.size > size) if key == "LARGER" else (lambda c: c.entry.size < size)
    if key == "UID":
        return _in_set(text(arg()), by_uid=True)
    if key == "NOT":
        negated = _one(items, index)
        return lambda c: not negated(c)
    if key == "OR":
        left, right = _one(items, index), _one(items, index)
        return lambda c: left(c) or right(c)
    raise BadCommand(f"unknown search key {key}")
