"""A small scripted IMAP server for the faults a real server won't produce on demand.

It serves folders of messages read-only, lets a test choose hostile folder names
and capabilities, and records every command it received.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from typing import Self

from imapclient import imap_utf7


class LoopbackServer:
    """A stand-in server on a free 127.0.0.1 port: each connection is `serve(rfile, wfile)` on a thread of its own."""

    scheme = "imap"
    user = "alice"

    def __enter__(self) -> Self:
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def handle(self) -> None:
                fake.serve(self.rfile, self.wfile)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, user: str | None = None) -> str:
        return f"{self.scheme}://{user or self.user}@127.0.0.1:{self.port}"

    def serve(self, rfile, wfile) -> None:  # type: ignore[no-untyped-def]
        raise NotImplementedError


@dataclass
class FakeImap(LoopbackServer):
    folders: dict[str, list[bytes]]
    delimiter: str = "/"
    capabilities: tuple[str, ...] = ("IMAP4rev1", "AUTH=PLAIN")
    uid_validity: int = 7
    commands: list[str] = field(default_factory=list)
    # Faults a real server will not produce on demand:
    announce: dict[int, int] = field(default_factory=dict)  # UID -> literal size to claim for BODY[]
    rotate_uid_validity: bool = False  # a new UIDVALIDITY on every SELECT/EXAMINE
    stall_on_body: bool = False  # never answer a UID FETCH of BODY[]
    malformed_body: bool = False  # answer BODY[] fetches with broken syntax

    # protocol

    def serve(self, rfile, wfile) -> None:  # type: ignore[no-untyped-def]
        selected: list[bytes] = []
        wfile.write(b"* OK [CAPABILITY " + " ".join(self.capabilities).encode() + b"] fake ready\r\n")
        while True:
            line = read_command(rfile, wfile)
            if line is None:
                return
            tag, _, rest = line.partition(b" ")
            words = rest.split(b" ", 2)
            command = words[0].upper().decode()
            self.commands.append(command if command != "UID" else "UID " + words[1].upper().decode())
            ok = tag + b" OK done\r\n"
            if command == "CAPABILITY":
                wfile.write(b"* CAPABILITY " + " ".join(self.capabilities).encode() + b"\r\n" + ok)
            elif command == "LOGIN":
                wfile.write(ok)
            elif command == "LIST":
                for name in self.folders:
                    encoded = imap_utf7.encode(name)
                    wfile.write(b'* LIST () "%s" {%d}\r\n%s\r\n' % (self.delimiter.encode(), len(encoded), encoded))
                wfile.write(ok)
            elif command in ("EXAMINE", "SELECT"):
                name = imap_utf7.decode(parse_string(rest[len(command) + 1 :]))
                selected = self.folders.get(name, [])
                if self.rotate_uid_validity:
                    self.uid_validity += 1
                wfile.write(
                    b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT %d] ok\r\n"
                    % (len(selected), self.uid_validity, len(selected) + 1)
                )
                wfile.write(tag + b" OK [READ-ONLY] done\r\n")
            elif command == "UID" and words[1].upper() == b"SEARCH":
                wfile.write(b"* SEARCH " + b" ".join(b"%d" % (i + 1) for i in range(len(selected))) + b"\r\n" + ok)
            elif command == "UID" and words[1].upper() == b"FETCH":
                uid_set, _, items = words[2].partition(b" ")
                body = b"BODY" in items.upper()
                if body and self.stall_on_body:
                    rfile.read()  # say nothing until the client gives up
                    return
                for uid in expand(uid_set.decode(), len(selected)):
                    raw = selected[uid - 1]
                    head = b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS (\\Seen)" % (uid, uid, len(raw))
                    if body and self.malformed_body:
                        head += b' BODY[] "unterminated'
                    elif body:
                        size = self.announce.get(uid, len(raw))
                        head += b' INTERNALDATE "01-Jan-2024 10:00:00 +0100" BODY[] {%d}\r\n' % size + raw
                        if size != len(raw):
                            wfile.write(head)
                            wfile.flush()
                            rfile.read()  # a client that believed the size would wait here forever
                            return
                    wfile.write(head + b")\r\n")
                wfile.write(ok)
            elif command == "LOGOUT":
                wfile.write(b"* BYE bye\r\n" + ok)
                return
            elif command in ("ENABLE", "NOOP"):
                wfile.write(ok)
            else:
                wfile.write(tag + b" BAD unknown command\r\n")


def read_command(rfile, wfile) -> bytes | None:  # type: ignore[no-untyped-def]
    """One command line, with any {n} literals spliced in after a continuation."""
    line = b""
    while True:
        try:
            chunk = rfile.readline()
        except (ConnectionError, socket.timeout):
            return None
        if not chunk:
            return None
        chunk = chunk.rstrip(b"\r\n")
        match = re.search(rb"\{(\d+)\+?\}$", chunk)
        if not match:
            return line + chunk
        wfile.write(b"+ go on\r\n")
        wfile.flush()
        line += chunk[: match.start()] + b'"' + rfile.read(int(match.group(1))).replace(b'"', b'\\"') + b'"'


def parse_string(text: bytes) -> bytes:
    text = text.strip()
    if text.startswith(b'"'):
        return re.sub(rb"\\(.)", rb"\1", text[1:-1])
    return text


def expand(uid_set: str, last: int) -> list[int]:
    out: list[int] = []
    for part in uid_set.split(","):
        low, _, high = part.partition(":")
        start = last if low == "*" else int(low)
        end = start if not high else (last if high == "*" else int(high))
        out.extend(u for u in range(min(start, end), max(start, end) + 1) if 1 <= u <= last)
    return out


@dataclass
class FakePop3(LoopbackServer):
    """A POP3 maildrop with a chosen capability list (no UIDL, no STLS, ...)."""

    messages: list[bytes]
    capabilities: tuple[str, ...] = ("USER", "TOP")
    commands: list[str] = field(default_factory=list)

    scheme = "pop3"

    def serve(self, rfile, wfile) -> None:  # type: ignore[no-untyped-def]
        wfile.write(b"+OK fake pop3\r\n")
        while True:
            line = rfile.readline()
            if not line:
                return
            words = line.decode().split()
            command = words[0].upper() if words else ""
            self.commands.append(command)
            if command == "CAPA":
                wfile.write(b"+OK\r\n" + b"".join(c.encode() + b"\r\n" for c in self.capabilities) + b".\r\n")
            elif command in ("USER", "PASS", "NOOP", "DELE", "RSET"):
                wfile.write(b"+OK\r\n")
            elif command == "STAT":
                wfile.write(b"+OK %d %d\r\n" % (len(self.messages), sum(map(len, self.messages))))
            elif command == "LIST":
                wfile.write(b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, len(m)) for i, m in enumerate(self.messages)) + b".\r\n")
            elif command == "UIDL" and "UIDL" in self.capabilities:
                wfile.write(b"+OK\r\n" + b"".join(b"%d id%d\r\n" % (i + 1, i) for i in range(len(self.messages))) + b".\r\n")
            elif command in ("RETR", "TOP"):
                raw = self.messages[int(words[1]) - 1]
                if command == "TOP":
                    raw = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                stuffed = re.sub(rb"(?m)^\.", b"..", raw)
                wfile.write(b"+OK\r\n" + stuffed + (b"" if stuffed.endswith(b"\n") else b"\r\n") + b".\r\n")
            elif command == "QUIT":
                wfile.write(b"+OK bye\r\n")
                return
            else:
                wfile.write(b"-ERR unknown\r\n")
