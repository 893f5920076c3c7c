"""A message's parts as byte ranges of its raw bytes, and a part's body decoded a piece at a time.

The email package keeps a parsed message whole, as text, and decodes a payload whole: an
attachment download would hold the message two or three times over. Here only the headers
are parsed; an attachment is decoded in pieces straight from the raw bytes. The walk numbers
parts as email.message.Message.walk() does. Where a message strays from what this reader is
sure of (a missing boundary, a header block that is not one, message/delivery-status), it
raises Unsure and the caller falls back on the email package.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32

CHUNK = 1 << 18  # decoded a quarter megabyte at a time
MAX_DEPTH = 20
_HEADERS = BytesHeaderParser(policy=compat32)
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")  # a field name and its colon, or a continuation
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


Raw = bytes | bytearray  # a download reads the message into a bytearray of its size


class Unsure(Exception):
    """The message is not plain enough for this reader: use the email package."""


@dataclass(frozen=True)
class Span:
    index: int  # the part's place in Message.walk()
    headers: EmailMessage  # its headers only
    body_start: int
    body_end: int
    container: bool  # a multipart or message/* part: its parts follow it in the walk


def walk(raw: Raw) -> list[Span]:
    """Every part of the message, in walk() order, with where its body lies in raw."""
    spans: list[Span] = []
    # An mbox "From " line first is no header: the email package sets it aside (get_unixfrom).
    start = 0
    if raw.startswith(b"From "):
        start = raw.find(b"\n") + 1 or len(raw)
    _walk(raw, start, len(raw), "text/plain", 0, spans)
    return spans


def _walk(raw: Raw, start: int, end: int, default: str, depth: int, spans: list[Span]) -> None:
    if depth > MAX_DEPTH:
        raise Unsure("nested too deep")
    headers, body_start = _header_block(raw, start, end)
    if "content-type" not in headers and default != "text/plain":
        headers.set_default_type(default)
    main, sub = headers.get_content_maintype(), headers.get_content_subtype()
    if main == "multipart":
        boundary = headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise Unsure("a multipart without a boundary")
        spans.append(Span(len(spans), headers, body_start, end, True))
        child_default = "message/rfc822" if sub == "digest" else "text/plain"
        for piece_start, piece_end in _split(raw, body_start, end, boundary.encode("utf-8", "surrogateescape")):
            _walk(raw, piece_start, piece_end, child_default, depth + 1, spans)
    elif main == "message":
        if sub == "delivery-status":
            raise Unsure("message/delivery-status")
        spans.append(Span(len(spans), headers, body_start, end, True))
        _walk(raw, body_start, end, "text/plain", depth + 1, spans)
    else:
        spans.append(Span(len(spans), headers, body_start, end, False))


def _header_block(raw: Raw, start: int, end: int) -> tuple[EmailMessage, int]:
    """The part's parsed headers and where its body starts (after the blank line)."""
    position = start
    while position < end:
        newline = raw.find(b"\n", position, end)
        line_end = end if newline < 0 else newline + 1
        line = raw[position:line_end]
        if line in (b"\n", b"\r\n"):
            return _HEADERS.parsebytes(raw[start:position]), line_end
        if not _HEADER_LINE.match(line) or (position == start and line[:1] in b" \t"):
            raise Unsure("a header block that the email package reads otherwise")
        position = line_end
    return _HEADERS.parsebytes(raw[start:end]), end


def _split(raw: Raw, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each part between '--boundary' lines, up to the closing '--boundary--'."""
    marker = b"--" + boundary
    part_start: int | None = None
    found = raw.find(marker, start, end)
    while found >= 0:
        newline = raw.find(b"\n", found, end)
        line_end = end if newline < 0 else newline
        rest = raw[found + len(marker) : line_end]
        closing = rest.startswith(b"--")
        if (found == start or raw[found - 1] == 0x0A) and not (rest[2:] if closing else rest).strip(b" \t\r"):
            if part_start is not None:
                # The line break before a delimiter belongs to the delimiter.
                cut = found - 1 if found > start else found
                cut = cut - 1 if cut > part_start and raw[cut - 1] == 0x0D else cut
                yield part_start, max(cut, part_start)
            if closing:
                return
            part_start = min(line_end + 1, end)
        found = raw.find(marker, found + 1, end)
    raise Unsure("a multipart without its closing boundary")


def decoded(raw: Raw, span: Span) -> Iterator[bytes]:
    """The part's body with its Content-Transfer-Encoding undone, a piece at a time; joined,
    it equals the email package's get_payload(decode=True)."""
    encoding = str(span.headers.get("content-transfer-encoding", "")).lower()
    if encoding == "base64":
        _check_base64(raw, span.body_start, span.body_end)  # before the first piece goes out
        return _base64(raw, span.body_start, span.body_end)
    if encoding == "quoted-printable":
        return (binascii.a2b_qp(piece) for piece in _lines(raw, span.body_start, span.body_end))
    if encoding in ("x-uuencode", "uuencode", "uue", "x-uue"):
        raise Unsure("uuencode")
    return (bytes(raw[start : min(start + CHUNK, span.body_end)]) for start in range(span.body_start, span.body_end, CHUNK))


def _lines(raw: Raw, start: int, end: int) -> Iterator[Raw]:
    """raw[start:end] in pieces of about CHUNK bytes, each ending at a line end (or at end)."""
    position = start
    while position < end:
        newline = raw.find(b"\n", min(position + CHUNK, end), end)
        cut = end if newline < 0 else newline + 1
        yield raw[position:cut]
        position = cut


def _check_base64(raw: Raw, start: int, end: int) -> None:
    """Only the alphabet and line breaks, '=' only at the end: else the email package's lenient decoding."""
    padded = False  # an earlier piece ended in '=': nothing but more '=' may follow
    for piece in _lines(raw, start, end):
        if piece.translate(None, _BASE64 + b"\r\n="):
            raise Unsure("base64 with other characters")
        data = piece.translate(None, b"\r\n")
        if (padded and data.strip(b"=")) or b"=" in data.rstrip(b"="):
            raise Unsure("base64 padding in the middle")
        padded = padded or data.endswith(b"=")


def _base64(raw: Raw, start: int, end: int) -> Iterator[bytes]:
    carry = b""
    for piece in _lines(raw, start, end):
        data = carry + piece.translate(None, b"\r\n")
        whole = len(data) - len(data) % 4
        carry = data[whole:]
        if whole:
            yield binascii.a2b_base64(data[:whole])
    if carry:
        yield _base64_tail(carry)


def _base64_tail(carry: bytes) -> bytes:
    """The last 1-3 characters, as email._encoded_words.decode_b reads a body that lacks its padding."""
    try:
        return base64.b64decode(carry + b"==="[: 4 - len(carry) % 4], validate=True)
    except binascii.Error:
        if len(carry) % 4 == 1:
            raise Unsure("base64 one character too long") from None
        raise
