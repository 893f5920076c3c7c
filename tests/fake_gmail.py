"""A stand-in for Gmail's IMAP server, built to Google's X-GM-EXT-1 documentation.

Google cannot be reached from the test machine, so this small threaded server
plays the part: it is not Gmail, only as much of it as mailbackup's label model
relies on, written from https://developers.google.com/gmail/imap/imap-extensions
and Google's published IMAP limits.

- Each message lives once, with an X-GM-MSGID, an X-GM-THRID and a set of labels.
- "[Gmail]/All Mail" (\\All) shows every message that is not in Trash or Spam;
  every label is a folder: INBOX for \\Inbox, "[Gmail]/Sent Mail" (\\Sent) for
  \\Sent, "[Gmail]/Starred" (\\Flagged) for \\Starred, "[Gmail]/Important" for
  \\Important, "[Gmail]/Trash" (\\Trash) and "[Gmail]/Spam" (\\Junk); user labels
  are folders of their own name.
- UID FETCH returns X-GM-MSGID, X-GM-THRID, X-GM-LABELS (the folder's own label is
  left out of the list, as Gmail does), MODSEQ, and honours (CHANGEDSINCE n): a
  label change bumps the message's MODSEQ, as it does on Gmail.
- UID STORE +X-GM-LABELS / -X-GM-LABELS / +FLAGS, APPEND with APPENDUID.
- A byte budget: once `budget` bytes of BODY[] have gone out, FETCH of a body is
  refused with NO [OVERQUOTA]; `refuse_login` answers LOGIN the way Gmail does
  when too many connections are open.

Every BODY[] sent is counted per X-GM-MSGID in `bodies_sent`.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field

from imapclient import imap_utf7

from tests.fakes import LoopbackServer, expand, read_command

ALL_MAIL = "[Gmail]/All Mail"
SYSTEM = {  # label as in X-GM-LABELS -> (folder, special-use attribute)
    "\\Inbox": ("INBOX", None),
    "\\Sent": ("[Gmail]/Sent Mail", "\\Sent"),
    "\\Starred": ("[Gmail]/Starred", "\\Flagged"),
    "\\Important": ("[Gmail]/Important", "\\Important"),
    "\\Draft": ("[Gmail]/Drafts", "\\Drafts"),
    "\\Trash": ("[Gmail]/Trash", "\\Trash"),
    "\\Spam": ("[Gmail]/Spam", "\\Junk"),
}
HIDDEN = {"\\Trash", "\\Spam"}  # messages there are not in All Mail


@dataclass
class GmailMessage:
    raw: bytes
    msgid: int
    thrid: int
    labels: set[str]
    flags: set[str]
    uid: int  # one UID per message, the same in every folder it shows in (enough for a stand-in)
    modseq: int


def quote(text: str) -> bytes:
    if re.fullmatch(r"[A-Za-z0-9\\]+", text):
        return text.encode()
    return b'"' + imap_utf7.encode(text).replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def parse_list(text: bytes) -> list[str]:
    """The atoms and quoted strings of a parenthesized list such as (\\Inbox "My Label" Work)."""
    text = text.strip()
    if text.startswith(b"(") and text.endswith(b")"):
        text = text[1:-1]
    items = re.findall(rb'"((?:[^"\\]|\\.)*)"|([^\s"()]+)', text)
    return [imap_utf7.decode(re.sub(rb"\\(.)", rb"\1", q) if q else a) for q, a in items]


@dataclass
class FakeGmail(LoopbackServer):
    user = "alice@gmail.com"

    messages: list[GmailMessage] = field(default_factory=list)
    user_labels: set[str] = field(default_factory=set)
    uid_validity: int = 11
    budget: int | None = None  # bytes of BODY[] before [OVERQUOTA]
    refuse_login: bool = False
    bodies_sent: Counter[int] = field(default_factory=Counter)
    bytes_sent: int = 0
    appended: list[str] = field(default_factory=list)  # folder of each APPEND
    commands: list[str] = field(default_factory=list)
    changedsince: list[int] = field(default_factory=list)  # the CHANGEDSINCE of each label FETCH
    highest_modseq: int = 100
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # state

    def add(self, raw: bytes, labels: set[str] = frozenset(), flags: set[str] = frozenset(), thread: int | None = None) -> GmailMessage:  # type: ignore[assignment]
        uid = len(self.messages) + 1
        self.highest_modseq += 1
        msgid = 1_600_000_000_000_000_000 + uid
        message = GmailMessage(raw, msgid, thread or msgid, set(labels), set(flags), uid, self.highest_modseq)
        self.user_labels |= {label for label in labels if not label.startswith("\\")}
        self.messages.append(message)
        return message

    def relabel(self, message: GmailMessage, add: set[str] = frozenset(), remove: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        message.labels = (message.labels | add) - remove
        self.user_labels |= {label for label in add if not label.startswith("\\")}
        self.highest_modseq += 1
        message.modseq = self.highest_modseq

    def folders(self) -> dict[str, tuple[str | None, str | None]]:
        """folder -> (label it shows, special-use attribute)."""
        out: dict[str, tuple[str | None, str | None]] = {"INBOX": ("\\Inbox", None), ALL_MAIL: (None, "\\All")}
        for label, (name, attribute) in SYSTEM.items():
            out.setdefault(name, (label, attribute))
        for label in sorted(self.user_labels):
            out[label] = (label, None)
        return out

    def validity(self, name: str) -> int:
        """Every Gmail folder has a UIDVALIDITY of its own."""
        return self.uid_validity if name == ALL_MAIL else self.uid_validity + 1 + zlib.crc32(name.encode()) % 10000

    def label_of_folder(self, name: str) -> str | None:
        for label, (folder, _) in SYSTEM.items():
            if folder == name:
                return label
        return name

    def in_folder(self, name: str) -> list[GmailMessage]:
        if name == ALL_MAIL:
            return [m for m in self.messages if not (m.labels & HIDDEN)]
        label = self.label_of_folder(name)
        return [m for m in self.messages if label in m.labels]

    # server

    # Gmail's list, less what the stand-in does not do (IDLE, COMPRESS, MOVE, ESEARCH, UTF8=ACCEPT...)
    capabilities = "IMAP4rev1 UNSELECT NAMESPACE ID CHILDREN X-GM-EXT-1 UIDPLUS ENABLE CONDSTORE LITERAL- SPECIAL-USE"

    def serve(self, rfile, wfile) -> None:  # type: ignore[no-untyped-def]
        selected: str | None = None
        wfile.write(b"* OK Gimap ready for requests (stand-in)\r\n")
        while True:
            line = read_command(rfile, wfile)
            if line is None:
                return
            tag, _, rest = line.partition(b" ")
            words = rest.split(b" ", 2)
            command = words[0].upper().decode()
            self.commands.append(command if command != "UID" else "UID " + words[1].upper().decode())
            ok = tag + b" OK Success\r\n"
            with self.lock:
                if command == "CAPABILITY":
                    wfile.write(b"* CAPABILITY " + self.capabilities.encode() + b"\r\n" + ok)
                elif command in ("LOGIN", "AUTHENTICATE"):
                    if self.refuse_login:
                        wfile.write(tag + b" NO [ALERT] Too many simultaneous connections. (Failure)\r\n")
                    else:
                        wfile.write(b"* CAPABILITY " + self.capabilities.encode() + b"\r\n" + ok)
                elif command == "LIST":
                    for name, (_, attribute) in self.folders().items():
                        attrs = "\\HasNoChildren" + (" " + attribute if attribute else "")
                        wfile.write(b'* LIST (%s) "/" %s\r\n' % (attrs.encode(), quote(name)))
                    wfile.write(b'* LIST (\\HasChildren \\Noselect) "/" "[Gmail]"\r\n' + ok)
                elif command in ("EXAMINE", "SELECT"):
                    name = parse_list(rest[len(command) + 1 :])[0]
                    if name not in self.folders():
                        wfile.write(tag + b" NO [NONEXISTENT] Unknown Mailbox\r\n")
                        continue
                    selected = name
                    shown = self.in_folder(name)
                    wfile.write(
                        b"* FLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen)\r\n"
                        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen \\*)] Flags permitted.\r\n"
                        b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT %d] ok\r\n* OK [HIGHESTMODSEQ %d] ok\r\n"
                        % (len(shown), self.validity(name), len(self.messages) + 1, self.highest_modseq)
                    )
                    mode = b"READ-ONLY" if command == "EXAMINE" else b"READ-WRITE"
                    wfile.write(tag + b" OK [" + mode + b"] " + command.encode() + b" (Success)\r\n")
                elif command == "UID" and words[1].upper() == b"SEARCH":
                    shown = self.in_folder(selected or "")
                    criteria = words[2] if len(words) > 2 else b"ALL"
                    match = re.search(rb"X-GM-MSGID (\d+)", criteria, re.IGNORECASE)
                    if match:
                        shown = [m for m in shown if m.msgid == int(match.group(1))]
                    wfile.write(b"* SEARCH" + b"".join(b" %d" % m.uid for m in shown) + b"\r\n" + ok)
                elif command == "UID" and words[1].upper() == b"FETCH":
                    self.fetch(tag, selected or "", words[2], wfile)
                elif command == "UID" and words[1].upper() == b"STORE":
                    self.store(tag, selected or "", words[2], wfile)
                elif command == "APPEND":
                    self.append(tag, rest[len("APPEND ") :], wfile)
                elif command == "LOGOUT":
                    wfile.write(b"* BYE LOGOUT Requested\r\n" + ok)
                    return
                elif command == "NAMESPACE":
                    wfile.write(b'* NAMESPACE (("" "/")) NIL NIL\r\n' + ok)
                elif command in ("ENABLE", "NOOP", "CLOSE", "UNSELECT", "CREATE", "ID"):
                    if command == "CREATE":
                        self.user_labels.add(parse_list(rest[len("CREATE ") :])[0])
                    wfile.write(ok)
                else:
                    wfile.write(tag + b" BAD Unknown command\r\n")
            wfile.flush()

    def fetch(self, tag: bytes, folder: str, args: bytes, wfile) -> None:  # type: ignore[no-untyped-def]
        uid_set, _, items = args.partition(b" ")
        changed = re.search(rb"\(CHANGEDSINCE (\d+)\)\s*$", items, re.IGNORECASE)
        since = int(changed.group(1)) if changed else None
        if changed:
            items = items[: changed.start()]
            if b"X-GM-LABELS" in items.upper():
                self.changedsince.append(since)
        wants = items.upper()
        header = b"HEADER.FIELDS" in wants  # a restore looking for Message-IDs
        body = b"BODY[]" in wants or b"BODY.PEEK[]" in wants or b"RFC822 " in wants + b" "
        shown = {m.uid: m for m in self.in_folder(folder)}
        own_label = None if folder == ALL_MAIL else self.label_of_folder(folder)
        for uid in expand(uid_set.decode(), max(shown, default=0)):
            message = shown.get(uid)
            if message is None or (since is not None and message.modseq <= since):
                continue
            if body and self.budget is not None and self.bytes_sent + len(message.raw) > self.budget:
                wfile.write(tag + b" NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)\r\n")
                return
            parts = [b"UID %d" % uid]
            if b"X-GM-MSGID" in wants:
                parts.append(b"X-GM-MSGID %d" % message.msgid)
            if b"X-GM-THRID" in wants:
                parts.append(b"X-GM-THRID %d" % message.thrid)
            if b"X-GM-LABELS" in wants:
                labels = sorted(message.labels - {own_label})
                parts.append(b"X-GM-LABELS (" + b" ".join(quote(label) for label in labels) + b")")
            if b"MODSEQ" in wants or since is not None:
                parts.append(b"MODSEQ (%d)" % message.modseq)
            if b"FLAGS" in wants:
                parts.append(b"FLAGS (" + " ".join(sorted(message.flags)).encode() + b")")
            if b"INTERNALDATE" in wants:
                parts.append(b'INTERNALDATE "01-Jan-2024 10:00:00 +0000"')
            if b"RFC822.SIZE" in wants:
                parts.append(b"RFC822.SIZE %d" % len(message.raw))
            literal = b""
            if header:
                found = re.search(rb"(?im)^message-id:.*\r\n", message.raw.split(b"\r\n\r\n", 1)[0] + b"\r\n")
                text = (found.group(0) if found else b"") + b"\r\n"
                parts.append(b"BODY[HEADER.FIELDS (MESSAGE-ID)] {%d}" % len(text))
                literal = b"\r\n" + text
            elif body:
                self.bodies_sent[message.msgid] += 1
                self.bytes_sent += len(message.raw)
                parts.append(b"BODY[] {%d}" % len(message.raw))
                literal = b"\r\n" + message.raw
            wfile.write(b"* %d FETCH (" % uid + b" ".join(parts) + literal + b")\r\n")
        wfile.write(tag + b" OK Success\r\n")

    def store(self, tag: bytes, folder: str, args: bytes, wfile) -> None:  # type: ignore[no-untyped-def]
        uid_set, _, rest = args.partition(b" ")
        item, _, values = rest.partition(b" ")
        shown = {m.uid: m for m in self.in_folder(folder)}
        names = set(parse_list(values))
        for uid in expand(uid_set.decode(), max(shown, default=0)):
            message = shown.get(uid)
            if message is None:
                continue
            key = item.upper().replace(b".SILENT", b"")
            if key == b"+X-GM-LABELS":
                self.relabel(message, add=names)
            elif key == b"-X-GM-LABELS":
                self.relabel(message, remove=names)
            elif key == b"X-GM-LABELS":
                self.relabel(message, add=names, remove=message.labels - names)
            elif key == b"+FLAGS":
                message.flags |= names
            elif key == b"-FLAGS":
                message.flags -= names
            elif key == b"FLAGS":
                message.flags = set(names)
        wfile.write(tag + b" OK Success\r\n")

    def append(self, tag: bytes, args: bytes, wfile) -> None:  # type: ignore[no-untyped-def]
        # read_command spliced each literal in as a quoted string: "mailbox" (flags) "date" "raw"
        strings = re.findall(rb'"((?:[^"\\]|\\.)*)"|(\([^)]*\))|([^\s"()]+)', args)
        folder = imap_utf7.decode(re.sub(rb"\\(.)", rb"\1", strings[0][0]) if strings[0][0] else strings[0][2])
        flags: set[str] = set()
        raws = []
        for quoted, parens, _atom in strings[1:]:
            if parens:
                flags = set(parse_list(parens))
            elif quoted and (b"\r\n" in quoted or b"\n" in quoted):
                raws.append((re.sub(rb"\\(.)", rb"\1", quoted), flags))
                flags = set()
        uids = []
        for raw, message_flags in raws:
            label = None if folder == ALL_MAIL else self.label_of_folder(folder)
            message = self.add(raw, {label} if label else set(), message_flags)
            self.appended.append(folder)
            uids.append(message.uid)
        wfile.write(tag + b" OK [APPENDUID %d %s] (Success)\r\n" % (self.validity(folder), ",".join(map(str, uids)).encode()))
