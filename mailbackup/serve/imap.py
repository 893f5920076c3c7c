"""One IMAP client's session over a read-only archive: a thread per connection, blocking sockets.

The store and catalog are synchronous (files, SQLAlchemy), so a thread per client keeps the
code straight; a FETCH writes each message to the socket as it is read, so a slow client
holds back the reading (socket back-pressure) and memory stays flat whatever the folder's size.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import logging
import socket
import socketserver
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .. import keys
from ..errors import MailbackupError
from ..stores import Store, open_store
from . import parts, query, view, wire
from .wire import BadCommand, Command

if TYPE_CHECKING:
    from . import ServeSettings

log = logging.getLogger("mailbackup")

MAX_LINE = 64 * 1024
MAX_LITERAL = 64 << 20  # an APPEND is refused anyway; its literal is read to stay in step
IDLE_TIMEOUT = 30 * 60
READ_ONLY = b"NO [CANNOT] the archive is read-only: mailbackup serve never changes it"
WRITES = {"APPEND", "STORE", "UID STORE", "COPY", "UID COPY", "MOVE", "UID MOVE", "EXPUNGE", "UID EXPUNGE",
          "CREATE", "DELETE", "RENAME"}
NEEDS_RAW = ("ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "BINARY")


class Closed(Exception):
    """The client went away or logged out."""


class Session(socketserver.StreamRequestHandler):
    server: ImapServer
    timeout = IDLE_TIMEOUT
    wbufsize = 1 << 16  # FETCH responses are buffered and flushed with the tagged answer

    def setup(self) -> None:
        # Responses go out in pieces (a header, a message, a closing parenthesis): without
        # TCP_NODELAY, Nagle's algorithm and the client's delayed ACK stall the small ones.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.store: Store | None = None
        self.user: str | None = None
        self.tls = self.server.settings.implicit_tls
        self.selected: view.Mailbox | None = None
        self.snap: view.Snapshot | None = None
        self.boxes: list[view.Mailbox] = []
        self.delimiter = "/"
        peer = self.client_address[0]
        self.loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback if peer else True

    def handle(self) -> None:
        try:
            self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] mailbackup serve: a read-only archive")
            while True:
                data = self.read_command()
                try:
                    command = wire.parse_command(data)
                except BadCommand as exc:
                    tag = data.split(b" ", 1)[0] if data.strip() else b"*"
                    self.send(tag + b" BAD " + str(exc).encode())
                    continue
                self.run(command)
        except (Closed, ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            log.debug("serve: client %s gone: %s", self.client_address, exc)
        finally:
            if self.store is not None:
                self.store.close()

    # the wire

    def send(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")
        self.wfile.flush()

    def read_line(self) -> bytes:
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise Closed("end of stream")
        if len(line) > MAX_LINE:
            self.send(b"* BYE line too long")
            raise Closed("line too long")
        return line

    def read_command(self) -> bytes:
        data = self.read_line()
        # Before login a command is small; after it, an APPEND's message is read (then refused).
        limit = MAX_LITERAL if self.user is not None else 8192
        while (announced := wire.literal_at_end(data)) is not None:
            size, non_sync = announced
            if size + len(data) > limit:
                self.send(b"* BYE command too large")
                raise Closed("command too large")
            if not non_sync:
                words = data.split(b" ", 2)
                if len(words) > 1 and words[1].upper() == b"APPEND":
                    # Refused before the client sends the message: no "+ go ahead", and the
                    # announcement is dropped so the command parses (and is answered NO).
                    match = wire.LITERAL_AT_END.search(data)
                    return data[: match.start()] if match else data
                self.send(b"+ go ahead")
            body = self.rfile.read(size)
            if len(body) < size:
                raise Closed("end of stream in a literal")
            data += body + self.read_line()
        return data

    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "IDLE", "NAMESPACE", "UNSELECT", "CHILDREN", "SPECIAL-USE"]
        if self.server.ssl_context is not None and not self.tls:
            caps.append("STARTTLS")
        if self.may_log_in():
            caps.append("AUTH=PLAIN")
        else:
            caps.append("LOGINDISABLED")
        return " ".join(caps).encode()

    def may_log_in(self) -> bool:
        return self.tls or self.loopback

    # commands

    def run(self, command: Command) -> None:
        tag = command.tag.encode()
        handler: Callable[[Command], bytes | None] | None = getattr(self, "do_" + command.name.replace(" ", "_").lower(), None)
        try:
            if self.user is None and command.name not in ("CAPABILITY", "NOOP", "LOGOUT", "LOGIN", "AUTHENTICATE", "STARTTLS", "ID"):
                self.send(tag + b" NO log in first")
                return
            if command.name in WRITES:
                self.send(tag + b" " + READ_ONLY)
                return
            if handler is None:
                self.send(tag + b" BAD unknown command " + command.name.encode())
                return
            answer = handler(command)
            if answer is not None:
                self.send(tag + b" " + answer)
        except BadCommand as exc:
            self.send(tag + b" BAD " + str(exc).encode())
        except (MailbackupError, sa.exc.SQLAlchemyError) as exc:
            log.warning("serve: %s failed: %s", command.name, exc)
            self.send(tag + b" NO [SERVERBUG] " + (str(exc).splitlines() or [""])[0].encode("utf-8", "replace")[:300])
        except (ValueError, LookupError, TypeError, UnicodeError, AttributeError) as exc:
            # A message this code reads wrong must cost one command, not the client's connection.
            log.exception("serve: %s failed", command.name)
            self.send(tag + b" NO [SERVERBUG] " + type(exc).__name__.encode())
        if command.name == "LOGOUT":
            raise Closed("logout")

    def do_capability(self, command: Command) -> bytes:
        self.send(b"* CAPABILITY " + self.capabilities())
        return b"OK CAPABILITY completed"

    def do_noop(self, command: Command) -> bytes:
        return b"OK NOOP completed"

    do_check = do_noop

    def do_id(self, command: Command) -> bytes:
        self.send(b'* ID ("name" "mailbackup serve")')
        return b"OK ID completed"

    def do_logout(self, command: Command) -> bytes:
        self.send(b"* BYE logging out")
        return b"OK LOGOUT completed"

    def do_starttls(self, command: Command) -> bytes | None:
        if self.server.ssl_context is None or self.tls:
            return b"BAD STARTTLS not available"
        # Whatever the client sent after STARTTLS in the clear is dropped with the old reader (no injection).
        self.send(command.tag.encode() + b" OK begin TLS")
        self.connection = self.request = self.server.ssl_context.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.tls = True
        return None

    def do_login(self, command: Command) -> bytes:
        if len(command.args) != 2:
            raise BadCommand("LOGIN user password")
        return self.log_in(wire.text(command.args[0]), wire.text(command.args[1]))

    def do_authenticate(self, command: Command) -> bytes:
        if not command.args or wire.text(command.args[0]).upper() != "PLAIN":
            return b"NO [CANNOT] only AUTHENTICATE PLAIN"
        if len(command.args) > 1:
            response = wire.text(command.args[1])
        else:
            self.send(b"+ ")
            response = self.read_line().strip().decode("ascii", "replace")
        if response == "*":
            return b"BAD authentication cancelled"
        try:
            _authz, user, password = base64.b64decode(response, validate=True).decode("utf-8").split("\0")
        except (ValueError, UnicodeDecodeError):
            return b"BAD malformed PLAIN response"
        return self.log_in(user, password)

    def log_in(self, user: str, password: str) -> bytes:
        if self.user is not None:
            return b"BAD already logged in"
        if not self.may_log_in():
            return b"NO [PRIVACYREQUIRED] use STARTTLS first"
        settings = self.server.settings
        good_user = hmac.compare_digest(user.encode(), settings.user.encode())
        good_password = hmac.compare_digest(password.encode(), settings.password.encode())
        if not (good_user and good_password):
            return b"NO [AUTHENTICATIONFAILED] wrong user name or password"
        self.store = open_store(settings.archive, mode="read", account=settings.mailbox, key_ring=self.server.key_ring)
        self.delimiter = view.archive_delimiter(self.store)
        self.user = user
        return b"OK [CAPABILITY " + self.capabilities() + b"] logged in, read-only"

    def do_enable(self, command: Command) -> bytes:
        self.send(b"* ENABLED")
        return b"OK nothing enabled"

    def do_namespace(self, command: Command) -> bytes:
        self.send(b'* NAMESPACE (("" ' + wire.quoted(self.delimiter) + b")) NIL NIL")
        return b"OK NAMESPACE completed"

    def mailboxes(self) -> list[view.Mailbox]:
        assert self.store is not None
        self.boxes = view.mailboxes(self.store, self.delimiter, self.server.settings.include_gone)
        return self.boxes

    def find(self, name: str) -> view.Mailbox | None:
        for box in self.boxes or self.mailboxes():
            if box.name == name:
                return box
        return next((box for box in self.mailboxes() if box.name == name), None)

    def do_list(self, command: Command) -> bytes:
        args = list(command.args)
        special_only = False
        if args and isinstance(args[0], list):  # LIST (SPECIAL-USE) "" "*"
            special_only = any(wire.text(o).upper() == "SPECIAL-USE" for o in args.pop(0))
        if len(args) < 2:
            raise BadCommand("LIST reference pattern")
        reference, pattern = wire.text(args[0]), wire.text(args[1])
        name = "LSUB" if command.name == "LSUB" else "LIST"
        if pattern == "":
            self.send(b"* " + name.encode() + b' (\\Noselect) ' + wire.quoted(self.delimiter) + b' ""')
            return b"OK " + name.encode() + b" completed"
        matcher = _pattern(wire.mailbox_name(reference + pattern) if pattern else "", self.delimiter)
        for box in self.mailboxes():
            if not matcher(box.name):
                continue
            if special_only and not set(box.attributes) & {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}:
                continue
            self.send(b"* " + name.encode() + b" " + wire.flag_list(box.attributes) + b" " + wire.quoted(self.delimiter) + b" " + wire.encode_mailbox(box.name))
        return b"OK " + name.encode() + b" completed"

    do_lsub = do_list

    def do_subscribe(self, command: Command) -> bytes:
        return b"OK every folder is subscribed"  # changes nothing: LSUB lists every folder

    do_unsubscribe = do_subscribe

    def open_snapshot(self, box: view.Mailbox) -> view.Snapshot:
        assert self.store is not None and box.folder is not None
        return view.snapshot(self.store, box.folder, box.gone)

    def do_status(self, command: Command) -> bytes:
        if len(command.args) != 2 or not isinstance(command.args[1], list):
            raise BadCommand("STATUS mailbox (items)")
        box = self.find(wire.mailbox_name(command.args[0]))
        if box is None or box.folder is None:
            return b"NO [NONEXISTENT] no such folder"
        snap = self.open_snapshot(box)
        values = {
            "MESSAGES": len(snap.uids), "RECENT": 0, "UIDNEXT": snap.uid_next, "UIDVALIDITY": snap.uid_validity,
            "UNSEEN": sum(1 for e in snap.entries if "\\Seen" not in e.flags),
        }
        items = []
        for item in command.args[1]:
            key = wire.text(item).upper()
            if key not in values:
                raise BadCommand(f"unknown STATUS item {key}")
            items.append(b"%s %d" % (key.encode(), values[key]))
        self.send(b"* STATUS " + wire.encode_mailbox(box.name) + b" " + wire.plist(items))
        return b"OK STATUS completed"

    def do_select(self, command: Command) -> bytes:
        self.selected = self.snap = None
        if len(command.args) < 1:
            raise BadCommand(f"{command.name} mailbox")
        box = self.find(wire.mailbox_name(command.args[0]))
        if box is None or box.folder is None:
            return b"NO [NONEXISTENT] no such folder"
        snap = self.open_snapshot(box)
        flags = sorted({"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"} | {f for e in snap.entries for f in e.flags if f != "\\Recent"})
        self.send(b"* FLAGS " + wire.flag_list(flags))
        self.send(b"* OK [PERMANENTFLAGS ()] read-only archive")
        self.send(b"* %d EXISTS" % len(snap.uids))
        self.send(b"* 0 RECENT")
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % snap.uid_validity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % snap.uid_next)
        self.selected, self.snap = box, snap
        return b"OK [READ-ONLY] " + command.name.encode() + b" completed"

    do_examine = do_select

    def do_close(self, command: Command) -> bytes:
        if self.snap is None:
            return b"BAD no folder selected"
        self.selected = self.snap = None
        return b"OK " + command.name.encode() + b" completed"

    do_unselect = do_close

    def do_idle(self, command: Command) -> bytes:
        self.send(b"+ idling (an archive does not change while served)")
        while True:
            line = self.read_line()
            if line.strip().upper() == b"DONE":
                return b"OK IDLE terminated"
            self.send(b"* BAD expected DONE")

    def do_fetch(self, command: Command) -> bytes:
        snap = self.require_selected()
        if len(command.args) < 2:
            raise BadCommand("FETCH set items")
        by_uid = command.name == "UID FETCH"
        spec = wire.text(command.args[0])
        items = _fetch_items(command.args[1])
        if by_uid and "UID" not in items:
            items.insert(0, "UID")
        largest = snap.uids[-1] if by_uid and snap.uids else len(snap.uids)
        ranges = wire.sequence_set(spec, largest)
        indexes = snap.by_uid_ranges(ranges) if by_uid else snap.by_seq_ranges(ranges)
        failed = []
        needs_raw = any(i.split("[")[0].split(".PEEK")[0] in NEEDS_RAW for i in items)
        assert self.store is not None
        wanted = ((index, snap.entries[index]) for index in indexes)
        read: Iterator[tuple[int, view.Entry, bytes | MailbackupError | None]]
        read = view.read_messages(self.store, wanted) if needs_raw else ((i, e, None) for i, e in wanted)
        for index, entry, raw in read:
            if isinstance(raw, MailbackupError):
                log.warning("serve: %s", raw)
                failed.append(str(raw))
                continue
            small = bytearray(b"* %d FETCH (" % (index + 1))
            for piece in _fetch_response(items, snap.uids[index], entry, raw):
                if len(piece) < 8192:
                    small += piece
                    continue
                self.wfile.write(small)  # then the message itself, uncopied
                self.wfile.write(piece)
                small = bytearray()
            small += b")\r\n"
            self.wfile.write(small)
        if failed:
            return b"NO " + failed[0].encode("utf-8", "replace") + (b" (and %d more)" % (len(failed) - 1) if len(failed) > 1 else b"")
        return b"OK " + command.name.encode() + b" completed"

    do_uid_fetch = do_fetch

    def do_search(self, command: Command) -> bytes:
        snap = self.require_selected()
        assert self.store is not None
        store = self.store
        predicate = query.parse_keys(list(command.args), self.index_lookup)
        found = []
        largest_uid = snap.uids[-1] if snap.uids else 0
        for index, entry in enumerate(snap.entries):
            load = functools.partial(view.message_bytes, store, entry)
            candidate = query.Candidate(index + 1, snap.uids[index], entry, load, len(snap.uids), largest_uid)
            if predicate(candidate):
                found.append(snap.uids[index] if command.name == "UID SEARCH" else index + 1)
        self.send(b"* SEARCH" + b"".join(b" %d" % n for n in found))
        return b"OK " + command.name.encode() + b" completed"

    do_uid_search = do_search

    def index_lookup(self, word: str) -> tuple[set[str], set[str]] | None:
        """SHA-256s the search index finds for a word, or None if the archive has no index."""
        from ..search import indexed_hashes

        assert self.store is not None
        return indexed_hashes(self.store, word)

    def require_selected(self) -> view.Snapshot:
        if self.snap is None:
            raise BadCommand("no folder selected")
        return self.snap


def _pattern(pattern: str, delimiter: str) -> Callable[[str], bool]:
    import re

    regex = "".join(".*" if c == "*" else f"[^{re.escape(delimiter)}]*" if c == "%" else re.escape(c) for c in pattern)
    compiled = re.compile(regex + r"\Z", re.IGNORECASE if pattern.upper().startswith("INBOX") else 0)
    return lambda name: bool(compiled.match(name))


MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"], "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
          "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}


def _fetch_items(token: object) -> list[str]:
    if isinstance(token, list):
        items = [wire.text(t) for t in token]
    else:
        items = MACROS.get(wire.text(token).upper(), [wire.text(token)])
    return [i if "[" in i else i.upper() for i in items]


def _fetch_response(items: list[str], uid: int, entry: view.Entry, raw: bytes | None) -> list[bytes]:
    """The FETCH data items as pieces to write in turn (a message's bytes are never copied into a bigger one)."""
    out: list[bytes] = []
    tree: parts.Part | None = None

    def add(*pieces: bytes) -> None:
        if out:
            out.append(b" ")
        out.extend(pieces)

    for item in items:
        upper = item.upper()
        if upper == "UID":
            add(b"UID %d" % uid)
        elif upper == "FLAGS":
            add(b"FLAGS " + wire.flag_list([f for f in entry.flags if f != "\\Recent"]))
        elif upper == "INTERNALDATE":
            add(b"INTERNALDATE " + wire.internal_date(entry.internal_date))
        elif upper == "RFC822.SIZE":
            add(b"RFC822.SIZE %d" % (len(raw) if raw is not None else entry.size))
        elif upper in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            assert raw is not None
            tree = tree or parts.parse(raw)
            value = parts.envelope(tree) if upper == "ENVELOPE" else parts.bodystructure(tree, upper == "BODYSTRUCTURE")
            add(upper.encode() + b" " + value)
        elif upper in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            assert raw is not None
            data = raw if upper == "RFC822" else parts.split_header(raw)[0 if upper == "RFC822.HEADER" else 1]
            add(upper.encode() + b" {%d}\r\n" % len(data), data)
        elif upper.startswith(("BODY[", "BODY.PEEK[", "BINARY[", "BINARY.PEEK[")):
            assert raw is not None
            spec = item.split("[", 1)[1].partition("]")[0]
            if spec and tree is None:  # BODY[] needs no MIME tree: the common case stays cheap
                tree = parts.parse(raw)
            add(*_section_response(item, raw, tree))
        else:
            raise BadCommand(f"unknown FETCH item {item}")
    return out


def _section_response(item: str, raw: bytes, tree: parts.Part | None) -> tuple[bytes, bytes]:
    name = item.split("[", 1)[0].upper().replace(".PEEK", "")
    spec, _, partial = item.split("[", 1)[1].partition("]")
    data = (parts.section(tree, spec) if tree is not None else raw) or b""
    label = f"{name}[{spec}]"
    if partial:
        try:
            start, _, count = partial.strip("<>").partition(".")
            offset, length = int(start), int(count) if count else None
        except ValueError as exc:
            raise BadCommand(f"bad partial {partial}") from exc
        data = data[offset : offset + length if length is not None else None]
        label += f"<{offset}>"
    return label.encode("utf-8", "surrogateescape") + b" {%d}\r\n" % len(data), data


class ImapServer(socketserver.ThreadingTCPServer):
    """Serves one archive, read-only, to any number of clients (a thread each)."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], settings: ServeSettings, key_ring: keys.KeyRing | None = None) -> None:
        self.settings = settings
        self.key_ring = key_ring or keys.KeyRing(keys.KeySource())  # unlocked by start_imap for an encrypted archive
        self.ssl_context = settings.ssl_context()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Session)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        if self.settings.implicit_tls:
            assert self.ssl_context is not None
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(60)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                log.debug("serve: TLS handshake with %s failed: %s", client_address, exc)
                return
        super().finish_request(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

