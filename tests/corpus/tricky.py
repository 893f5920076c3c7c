"""Synthetic messages that break naive mail code; see NOTES.md for what Dovecot serves back."""

from __future__ import annotations

import base64
import random
import re

CRLF = b"\r\n"


def as_dovecot_serves(raw: bytes) -> bytes:
    """What Dovecot 2.3 returns as BODY[] after APPEND of ``raw`` (see NOTES.md).

    Every line ending becomes CRLF (bare LF and lone CR included), NUL becomes
    0x80, anything else is untouched, including a missing final newline.
    Compare real fetches against this only to explain differences; tests should
    compare against what the server actually serves.
    """
    return re.sub(rb"\r\n|\n|\r", b"\r\n", raw).replace(b"\0", b"\x80")


def _headers(subject: bytes, extra: tuple[bytes, ...] = ()) -> list[bytes]:
    return [
        b"From: Tricky Sender <sender@example.org>",
        b"To: Recipient <rcpt@example.net>",
        b"Subject: " + subject,
        b"Date: Mon, 01 Jan 2024 12:00:00 +0000",
        b"Message-ID: <" + subject.split()[0].lower().replace(b"=?", b"") + b"@tricky.example>",
        b"MIME-Version: 1.0",
        *extra,
    ]


def _message(subject: bytes, body: list[bytes], *, eol: bytes = CRLF,
             extra: tuple[bytes, ...] = (), final_eol: bool = True) -> bytes:
    text = eol.join(_headers(subject, extra) + [b""] + body)
    return text + eol if final_eol else text


def _attachment(size: int) -> bytes:
    payload = base64.encodebytes(random.Random(5).randbytes(size))  # 76-char lines, LF
    boundary = b"=_tricky_boundary_5mb"
    body = [
        b"--" + boundary,
        b"Content-Type: text/plain; charset=us-ascii",
        b"",
        b"A large attachment follows.",
        b"--" + boundary,
        b"Content-Type: application/octet-stream",
        b"Content-Transfer-Encoding: base64",
        b'Content-Disposition: attachment; filename="blob.bin"',
        b"",
        *payload.rstrip(b"\n").split(b"\n"),
        b"--" + boundary + b"--",
    ]
    return _message(b"attachment 5 MB", body,
                    extra=(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"',))


def tricky_messages() -> dict[str, bytes]:
    """Name -> raw message; all are valid APPEND input for Dovecot."""
    plain = (b"Content-Type: text/plain; charset=us-ascii",)
    utf8 = (b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit")
    return {
        "from_lines": _message(b"from-lines in the body", [
            b"Mbox readers split messages here:",
            b"From here to eternity",
            b">From an already quoted line",
            b">>From a doubly quoted line",
            b"From",
            b"end",
        ], extra=plain),
        "header_8bit_utf8": _message(
            "header-utf8 Grüße aus Köln, 東京".encode(),
            [b"Raw UTF-8 in headers, no RFC 2047.", "Körper: ÄÖÜ".encode()],
            extra=("X-Sender-Name: Jürgen Müller".encode(), *utf8)),
        "header_8bit_latin1": _message(
            "header-latin1 Grüße aus Köln".encode("latin-1"),
            ["Raw Latin-1 in the Subject: café".encode("latin-1")],
            extra=(b"Content-Type: text/plain; charset=iso-8859-1",
                   b"Content-Transfer-Encoding: 8bit")),
        "subject_rfc2047": _message(
            b"=?utf-8?q?subject-encoded_Gr=C3=BC=C3=9Fe_=E2=82=AC?=",
            [b"The Subject is RFC 2047 encoded UTF-8."], extra=plain),
        "attachment_5mb": _attachment(5 * 1024 * 1024),
        "bare_lf": _message(b"bare-lf line endings",
                            [b"every line", b"ends in LF only"], eol=b"\n", extra=plain),
        "mixed_crlf_lf": (b"From: Tricky Sender <sender@example.org>\r\n"
                          b"To: Recipient <rcpt@example.net>\n"
                          b"Subject: mixed-eol CRLF and LF\r\n"
                          b"Message-ID: <mixed-eol@tricky.example>\n"
                          b"\r\n"
                          b"crlf line\r\nlf line\nlone CR\rinside\r\nlast\n"),
        "empty_body": _message(b"empty-body", [], extra=plain),  # headers + blank line only
        "dot_lines": _message(b"dot-lines", [
            b"next line is a lone dot", b".", b"..two dots", b".leading dot", b"...", b"end",
        ], extra=plain),
        "no_trailing_newline": _message(b"no-trailing-newline",
                                        [b"the last line has no EOL"], extra=plain,
                                        final_eol=False),
        "long_line": _message(b"long-line over 998", [
            b"x" * 1200, b"word " * 600, b"short"], extra=plain),
    }


if __name__ == "__main__":
    for name, raw in tricky_messages().items():
        print(f"{name:22} {len(raw):>9} bytes  {raw[:60]!r}")
