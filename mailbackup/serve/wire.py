"""IMAP on the wire, as pure functions over bytes: reading a command's tokens, writing strings and lists."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from imapclient import imap_utf7

Token = "str | bytes | list[Token]"  # atom (str), string (bytes), parenthesised list

LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\r?\n$")
ATOM_SPECIALS = b'(){ %*"\\]'


class BadCommand(ValueError):
    """The client sent something that is not IMAP; answered with BAD."""


@dataclass(frozen=True)
class Command:
    tag: str
    name: str  # upper case; "UID FETCH" for the UID forms
    args: list


def literal_at_end(line: bytes) -> tuple[int, bool] | None:
    """(size, non-synchronising) if line ends with a literal's announcement."""
    match = LITERAL_AT_END.search(line)
    if match is None:
        return None
    return int(match.group(1)), bool(match.group(2))


def tokenize(data: bytes) -> list:
    """Tokens of one whole command (literals inlined after their '{n}\\r\\n')."""
    stack: list[list] = [[]]
    i, end = 0, len(data)
    while i < end:
        c = data[i]
        if c in b" \r\n":
            i += 1
        elif c == ord("("):
            stack.append([])
            i += 1
        elif c == ord(")"):
            if len(stack) == 1:
                raise BadCommand("unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == ord('"'):
            out = bytearray()
            i += 1
            while True:
                if i >= end:
                    raise BadCommand("unterminated quoted string")
                ch = data[i]
                if ch == ord("\\") and i + 1 < end:
                    out.append(data[i + 1])
                    i += 2
                elif ch == ord('"'):
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            stack[-1].append(bytes(out))
        elif c == ord("{"):
            close = data.find(b"}", i)
            if close < 0:
                raise BadCommand("bad literal")
            size = int(data[i + 1 : close].rstrip(b"+") or b"-1")
            start = data.find(b"\n", close) + 1
            if size < 0 or start == 0 or start + size > end:
                raise BadCommand("bad literal")
            stack[-1].append(data[start : start + size])
            i = start + size
        else:
            start = i
            depth = 0
            while i < end:
                ch = data[i]
                if ch == ord("["):
                    depth += 1
                elif ch == ord("]"):
                    depth -= 1
                elif depth == 0 and ch in b" ()\r\n":
                    break
                i += 1
            stack[-1].append(data[start:i].decode("utf-8", "surrogateescape"))
    if len(stack) != 1:
        raise BadCommand("unbalanced '('")
    return stack[0]


def parse_command(data: bytes) -> Command:
    tokens = tokenize(data)
    if len(tokens) < 2 or not isinstance(tokens[0], str) or not isinstance(tokens[1], str):
        raise BadCommand("expected: tag command [arguments]")
    tag, name, args = tokens[0], tokens[1].upper(), tokens[2:]
    if name == "UID":
        if not args or not isinstance(args[0], str):
            raise BadCommand("UID what?")
        name, args = "UID " + args[0].upper(), args[1:]
    return Command(tag, name, args)


def text(token: object) -> str:
    """An astring argument as text (atoms are text already; strings are UTF-8 or Latin-1)."""
    if isinstance(token, str):
        return token
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            return token.decode("latin-1")
    raise BadCommand("expected a string")


def mailbox_name(token: object) -> str:
    """A mailbox argument, decoded from modified UTF-7; INBOX in any case is INBOX."""
    name = text(token)
    try:
        decoded = imap_utf7.decode(name.encode("ascii")) if name.isascii() else name
    except (ValueError, UnicodeError):  # not valid modified UTF-7: take it as it is
        decoded = name
    return "INBOX" if decoded.upper() == "INBOX" else decoded


def encode_mailbox(name: str) -> bytes:
    return quoted(imap_utf7.encode(name))


def quoted(value: str | bytes) -> bytes:
    """A string as IMAP quoted string, or a literal if it holds CR, LF, NUL or 8-bit bytes."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if any(b in raw for b in b"\r\n\0") or not raw.isascii():
        return literal(raw)
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(raw: bytes) -> bytes:
    return b"{%d}\r\n" % len(raw) + raw


def nstring(value: str | bytes | None) -> bytes:
    return b"NIL" if value is None else quoted(value)


def plist(items: Iterable[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


def flag_list(flags: Sequence[str]) -> bytes:
    return plist(f.encode("utf-8", "replace") for f in flags)


def internal_date(when: datetime | None) -> bytes:
    when = when or datetime(1970, 1, 1, tzinfo=UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return b'"' + when.strftime("%d-%b-%Y %H:%M:%S %z").encode("ascii") + b'"'


def sequence_set(spec: str, largest: int) -> list[tuple[int, int]]:
    """'1:3,7,9:*' as sorted (low, high) ranges; '*' is largest."""
    ranges = []
    for item in spec.split(","):
        low, _, high = item.partition(":")
        try:
            a = largest if low == "*" else int(low)
            b = a if not high else (largest if high == "*" else int(high))
        except ValueError as exc:
            raise BadCommand(f"bad sequence set {spec!r}") from exc
        if a < 0 or b < 0:
            raise BadCommand(f"bad sequence set {spec!r}")
        ranges.append((min(a, b), max(a, b)))
    return sorted(ranges)


def in_ranges(value: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(low <= value <= high for low, high in ranges)


def is_sequence_set(token: object) -> bool:
    return isinstance(token, str) and bool(re.fullmatch(r"[0-9*:,]+", token))
