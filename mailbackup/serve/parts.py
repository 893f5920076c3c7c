"""A message's MIME tree over its raw bytes, for IMAP: ENVELOPE, BODYSTRUCTURE and BODY[section]."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32

from ..mime import split_multipart
from .wire import nstring, plist, quoted

_HEADERS = BytesHeaderParser(policy=compat32)
MAX_DEPTH = 20


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """(header including its blank line, body); a message without a blank line is all header."""
    if raw.startswith((b"\r\n", b"\n")):
        cut = 2 if raw.startswith(b"\r\n") else 1
        return raw[:cut], raw[cut:]
    found = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    if not found:
        return raw, b""
    at = min(found)
    cut = at + (4 if raw[at : at + 4] == b"\r\n\r\n" else 2)
    return raw[:cut], raw[cut:]


@dataclass
class Part:
    header: bytes
    body: bytes
    headers: EmailMessage
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # a message/rfc822 part's own message

    @property
    def content_type(self) -> tuple[str, str]:
        value = self.headers.get_content_type()  # text/plain by default, as RFC 2045 says
        main, _, sub = value.partition("/")
        return main, sub

    @property
    def whole(self) -> bytes:
        return self.header + self.body


def parse(raw: bytes, depth: int = 0, default: str = "text/plain") -> Part:
    header, body = split_header(raw)
    headers = _HEADERS.parsebytes(header)
    if "content-type" not in headers and default != "text/plain":
        headers.set_default_type(default)
    part = Part(header, body, headers)
    main, sub = part.content_type
    if depth >= MAX_DEPTH:
        return part
    if main == "multipart":
        boundary = headers.get_param("boundary")
        if isinstance(boundary, str) and boundary:
            child_default = "message/rfc822" if sub == "digest" else "text/plain"
            part.children = [
                parse(piece, depth + 1, child_default)
                for piece in split_multipart(body, boundary.encode("utf-8", "surrogateescape"))
            ]
    elif (main, sub) == ("message", "rfc822"):
        part.message = parse(body, depth + 1)
    return part


def _header_value(headers: EmailMessage, name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())  # unfolded; encoded words stay as sent, as servers do


def _addresses(headers: EmailMessage, name: str) -> bytes:
    value = headers.get_all(name)
    if not value:
        return b"NIL"
    items = []
    for display, address in email.utils.getaddresses([str(v) for v in value]):
        if not display and not address:
            continue
        local, at, host = address.rpartition("@")
        if not at:
            local, host = address, ""
        items.append(plist([nstring(display or None), b"NIL", nstring(local), nstring(host or None)]))
    return plist(items) if items else b"NIL"


def envelope(part: Part) -> bytes:
    h = part.headers
    sender = "sender" if "sender" in h else "from"
    reply_to = "reply-to" if "reply-to" in h else "from"
    return plist([
        nstring(_header_value(h, "date")),
        nstring(_header_value(h, "subject")),
        _addresses(h, "from"),
        _addresses(h, sender),
        _addresses(h, reply_to),
        _addresses(h, "to"),
        _addresses(h, "cc"),
        _addresses(h, "bcc"),
        nstring(_header_value(h, "in-reply-to")),
        nstring(_header_value(h, "message-id")),
    ])


def _params(headers: EmailMessage, header: str) -> bytes:
    params = headers.get_params(header=header, unquote=True) or []
    items: list[bytes] = []
    for key, value in params[1:]:
        if isinstance(value, tuple):
            value = email.utils.collapse_rfc2231_value(value)
        items += [quoted(key), quoted(str(value))]
    return plist(items) if items else b"NIL"


def _disposition(headers: EmailMessage) -> bytes:
    value = headers.get("content-disposition")
    if value is None:
        return b"NIL"
    kind = str(value).split(";")[0].strip() or "attachment"
    return plist([quoted(kind), _params(headers, "content-disposition")])


def bodystructure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not) of a part, per RFC 3501 7.4.2."""
    h = part.headers
    main, sub = part.content_type
    if part.children:
        out = b"(" + b"".join(bodystructure(c, extended) for c in part.children) + b" " + quoted(sub)
        if extended:
            out += b" " + b" ".join([
                _params(h, "content-type"), _disposition(h),
                nstring(_header_value(h, "content-language")), nstring(_header_value(h, "content-location"))])
        return out + b")"
    if main == "multipart":  # no parts found: show it as the text it is
        main, sub = "text", "plain"
    params = _params(h, "content-type")
    if params == b"NIL" and main == "text":
        params = b'("charset" "us-ascii")'
    fields = [
        quoted(main), quoted(sub), params,
        nstring(_header_value(h, "content-id")),
        nstring(_header_value(h, "content-description")),
        quoted((_header_value(h, "content-transfer-encoding") or "7bit").upper()),
        b"%d" % len(part.body),
    ]
    if part.message is not None:
        fields += [envelope(part.message), bodystructure(part.message, extended), b"%d" % part.body.count(b"\n")]
    elif main == "text":
        fields.append(b"%d" % part.body.count(b"\n"))
    if extended:
        fields += [nstring(_header_value(h, "content-md5")), _disposition(h),
                   nstring(_header_value(h, "content-language")), nstring(_header_value(h, "content-location"))]
    return plist(fields)


def header_lines(header: bytes) -> list[tuple[str, bytes]]:
    """(lower-case field name, the field's bytes with its continuation lines)."""
    fields: list[tuple[str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        else:
            fields.append((line.split(b":", 1)[0].strip().decode("latin-1").lower(), line))
    return fields


def header_fields(header: bytes, names: set[str], keep: bool) -> bytes:
    picked = [raw for name, raw in header_lines(header) if (name in names) == keep]
    return b"".join(picked) + b"\r\n"


def section(part: Part, spec: str) -> bytes | None:
    """The bytes of BODY[spec] ('' is the whole message); None where the section does not exist."""
    numbers: list[int] = []
    rest = spec
    while rest and rest[0].isdigit():
        number, _, rest = rest.partition(".")
        numbers.append(int(number))
    current = part
    for i, n in enumerate(numbers):
        if current.message is not None and i > 0:
            current = current.message
        if current.children:
            if not 1 <= n <= len(current.children):
                return None
            current = current.children[n - 1]
        elif n != 1:
            return None
        elif current is part and current.message is None:
            current = Part(b"", current.body, current.headers)  # BODY[1] of a single-part message: its body
    text_of = current.message if numbers and current.message is not None else current
    upper = rest.upper()
    if upper == "":
        return part.whole if not numbers else current.body
    if upper == "MIME":
        return current.header if numbers else None
    if upper == "HEADER":
        return text_of.header
    if upper == "TEXT":
        return text_of.body
    if upper.startswith("HEADER.FIELDS"):
        keep = not upper.startswith("HEADER.FIELDS.NOT")
        names = {n.lower() for n in upper[upper.find("(") + 1 : upper.rfind(")")].replace('"', " ").split()}
        return header_fields(text_of.header, names, keep)
    return None
