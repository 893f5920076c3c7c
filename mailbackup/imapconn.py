"""One IMAP session, shared by the source (sources/imap.py) and the target (targets/imap.py).

Here and nowhere else: connect (the timeout covers TCP connect, TLS handshake and
greeting), STARTTLS or a refusal before any credential, login, the mapping of
imapclient and socket failures to our errors, the guard that refuses an absurd
literal before it is allocated, and UID FETCH with our own parser, streamed one
response at a time so that what arrived whole before a dropped line is kept.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient
from imapclient import exceptions as imap_errors
from imapclient.response_parser import gen_parsed_response

from .errors import (
    AuthError,
    ConnectionLost,
    HostileServer,
    ProviderLimit,
    ServerError,
    TLSError,
    UsageError,
    setting,
)
from .model import Folder
from .net import (
    Endpoint,
    connect_errors,
    greeting_errors,
    retry_temporary,
    tls_context,
    warn_cleartext,
)

SMALL_LITERAL = 1 << 20  # folder names and the like
BIG_LITERAL = 1 << 30  # a message whose size the server never told


def as_folder(flags: Sequence[bytes], delimiter: bytes | str | None, name: str | bytes) -> Folder:
    if isinstance(delimiter, bytes):
        delimiter = delimiter.decode("ascii", "replace")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    attributes = frozenset(f.decode("ascii", "replace") if isinstance(f, bytes) else str(f) for f in flags)
    return Folder(name=str(name), delimiter=delimiter or None, attributes=attributes)


def literal_room(size: int) -> int:
    """The biggest literal to accept for a message of this RFC822.SIZE: room for a server
    whose size is a little off, not for one that lies wildly."""
    return 2 * size + (1 << 20)


def sequence_set(uids: Sequence[int]) -> str:
    """Compress ascending UIDs into an IMAP sequence set such as '1:5,7,9:12'."""
    if not uids:
        raise ValueError("empty UID set")
    parts = []
    start = prev = uids[0]
    for uid in uids[1:]:
        if uid != prev + 1:
            parts.append(f"{start}:{prev}" if prev != start else str(start))
            start = uid
        prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


# The common shapes of a FETCH reply, read with regexes instead of imapclient's
# byte-by-byte lexer; anything else falls back to that lexer.
_FAST_ITEM = re.compile(
    rb' *(?:(UID|RFC822\.SIZE) (\d+)|FLAGS \(([^()"{}]*)\)|INTERNALDATE "([^"\\]*)"|MODSEQ \((\d+)\))',
    re.IGNORECASE,
)
_FAST_WITH_BODY = re.compile(rb"\d+ \((.*)BODY\[\] \{(\d+)\}", re.DOTALL)
_FAST_PLAIN = re.compile(rb"\d+ \((.*)\)", re.DOTALL)


def _fast_items(text: bytes, data: dict[bytes, object]) -> bool:
    text = text.rstrip(b" ")
    pos = 0
    while pos < len(text):
        match = _FAST_ITEM.match(text, pos)
        if not match or match.end() == pos:
            return False
        number_key, number, flags, date, modseq = match.groups()
        if number_key is not None:
            data[number_key.upper()] = int(number)
        elif flags is not None:
            data[b"FLAGS"] = tuple(flags.split())
        elif date is not None:
            data[b"INTERNALDATE"] = date
        else:
            data[b"MODSEQ"] = (int(modseq),)
        pos = match.end()
    return True


def parse_fetch_fast(lines: list[object]) -> dict[int, dict[bytes, object]] | None:
    """parse_fetch for replies made only of UID, RFC822.SIZE, FLAGS, INTERNALDATE,
    MODSEQ and one BODY[] literal; None when the reply has any other shape."""
    out: dict[int, dict[bytes, object]] = {}
    items = iter(lines)
    for item in items:
        data: dict[bytes, object] = {}
        if isinstance(item, tuple) and len(item) == 2:
            head, literal = item
            match = _FAST_WITH_BODY.fullmatch(head)
            trailer = next(items, None)
            if (
                match is None
                or int(match.group(2)) != len(literal)
                or not isinstance(trailer, bytes)
                or not trailer.endswith(b")")
                or not _fast_items(match.group(1), data)
                or not _fast_items(trailer[:-1], data)
            ):
                return None
            data[b"BODY[]"] = literal
        elif isinstance(item, bytes):
            match = _FAST_PLAIN.fullmatch(item)
            if match is None or not _fast_items(match.group(1), data):
                return None
        else:
            return None
        uid = data.get(b"UID")
        if isinstance(uid, int):
            out.setdefault(uid, {}).update(data)
    return out


def parse_fetch(lines: list[object]) -> dict[int, dict[bytes, object]]:
    """FETCH responses keyed by UID. Replies without a UID are unsolicited and dropped:
    keyed by sequence number they could be mistaken for another message's UID."""
    out: dict[int, dict[bytes, object]] = {}
    if lines == [None]:
        return out
    fast = parse_fetch_fast(lines)
    return fast if fast is not None else parse_fetch_general(lines)


def parse_fetch_general(lines: list[object]) -> dict[int, dict[bytes, object]]:
    """parse_fetch for any reply, through imapclient's lexer."""
    try:
        return _parse_fetch_general(lines)
    except (imap_errors.IMAPClientError, ValueError, TypeError) as exc:
        raise ServerError(f"malformed FETCH response: {exc}") from exc


def _parse_fetch_general(lines: list[object]) -> dict[int, dict[bytes, object]]:
    out: dict[int, dict[bytes, object]] = {}
    parsed = gen_parsed_response(lines)
    for _seq in parsed:
        attributes = next(parsed, None)
        if not isinstance(attributes, tuple) or len(attributes) % 2:
            raise ServerError(f"malformed FETCH response: {str(attributes)[:80]}")
        if not all(isinstance(key, bytes) for key in attributes[::2]):
            raise ServerError(f"malformed FETCH response: {str(attributes)[:80]}")
        data = {bytes(k).upper(): v for k, v in zip(attributes[::2], attributes[1::2])}
        uid = data.get(b"UID")
        if uid is None:
            continue
        try:
            out.setdefault(int(uid), {}).update(data)
        except ValueError:
            raise ServerError(f"malformed UID in FETCH response: {uid!r}") from None
    return out


def login(client: imapclient.IMAPClient, endpoint: Endpoint, secret: str, auth: str, admin_user: str | None = None) -> None:
    """LOGIN with a password, SASL PLAIN as an admin for the user, or SASL XOAUTH2/OAUTHBEARER with an access token."""
    if admin_user and auth != "password":
        raise UsageError(f"{setting('admin_user')} goes with the admin's password, not with OAuth2")
    if admin_user:
        if not client.has_capability("AUTH=PLAIN"):
            raise imap_errors.LoginError(f"the server offers no AUTHENTICATE PLAIN for the admin login as {admin_user}")
        client.plain_login(admin_user, secret, authorization_identity=endpoint.user)
    elif auth == "password":
        client.login(endpoint.user, secret)
    elif auth == "xoauth2":
        client.oauth2_login(endpoint.user, secret, mech="XOAUTH2")
    elif auth == "oauthbearer":
        client.oauthbearer_login(endpoint.user, secret)
    else:
        raise ValueError(f"unknown auth {auth!r}")


# Response codes and login refusals by which a provider says "not now": Gmail's
# [OVERQUOTA] (daily download limit), [THROTTLED], [LIMIT], and too many connections.
# Retrying them only digs deeper (Gmail suspends access for 24 hours), so they end the run.
_LIMIT = re.compile(
    r"\[(OVERQUOTA|THROTTLED|LIMIT)\]|too many (?:simultaneous )?connections", re.IGNORECASE
)


def limit_hit(text: str, where: str = "server") -> ProviderLimit | None:
    """A ProviderLimit naming the limit when a response says one was reached, else None."""
    match = _LIMIT.search(text)
    if match is None:
        return None
    name = match.group(1).upper() if match.group(1) else "too many connections"
    return ProviderLimit(
        f"{where} limit reached ({name}): {text.strip()[:160]}; stopped without retrying, "
        "what was stored is kept; rerun later to go on"
    )


def lost(exc: BaseException, side: str = "server") -> ConnectionLost | ProviderLimit:
    limit = limit_hit(str(exc), f"IMAP {side}")
    if limit is not None:  # a BYE [OVERQUOTA] or the like: not a line to reconnect
        return limit
    return ConnectionLost(f"connection to the IMAP {side} lost: {exc}; rerun to finish")


@contextmanager
def command_errors(side: str = "server") -> Iterator[None]:
    """Map imapclient and socket failures during a command to our errors; side names the
    other end in messages ("server" for a source, "target" for a restore target)."""
    try:
        yield
    except (imap_errors.IMAPClientAbortError, OSError) as exc:  # OSError covers timeouts and TLS
        raise lost(exc, side) from exc
    except imap_errors.IMAPClientError as exc:
        limit = limit_hit(text_of(exc), f"IMAP {side}")
        if limit is not None:
            raise limit from exc
        raise ServerError(f"{'server' if side == 'server' else side} refused: {text_of(exc)}") from exc


def text_of(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text


@dataclass(frozen=True)
class Cut:
    """The message whose BODY[] literal was being read when the line dropped: the bytes
    that arrived, from offset on (offset > 0 when the fetch itself was a resume)."""

    uid: int
    offset: int
    data: bytes


_CUT_HEAD = re.compile(rb"\bUID (\d+)\b.*\bBODY\[\](?:<(\d+)>)? \{\d+\}$", re.DOTALL | re.IGNORECASE)


def cut_body(lines: list[object]) -> Cut | None:
    """What a response cut off inside its BODY[] literal leaves behind, if its UID came first."""
    if not lines or not isinstance(lines[-1], tuple) or len(lines[-1]) != 2:
        return None
    head, data = lines[-1]
    match = _CUT_HEAD.search(head) if isinstance(head, bytes) else None
    if match is None or not isinstance(data, bytes):
        return None
    return Cut(int(match.group(1)), int(match.group(2) or 0), data)


class ImapSession:
    """One logged-in IMAP connection."""

    def __init__(self, client: imapclient.IMAPClient, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.broken = False
        self.literal_limit = SMALL_LITERAL
        self._guard_literals()

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        password: str,
        *,
        ca_file: str | None = None,
        timeout: float = 120.0,
        auth: str = "password",
        admin_user: str | None = None,
    ) -> ImapSession:
        """Connect and log in; a login the server calls temporarily unavailable is tried again."""
        return retry_temporary(
            lambda: cls._connect(endpoint, password, ca_file=ca_file, timeout=timeout, auth=auth, admin_user=admin_user)
        )

    @classmethod
    def _connect(
        cls, endpoint: Endpoint, password: str, *, ca_file: str | None, timeout: float, auth: str, admin_user: str | None
    ) -> ImapSession:
        context = tls_context(ca_file) if endpoint.tls != "none" else None
        warn_cleartext(endpoint)
        with connect_errors(endpoint), greeting_errors(endpoint, imaplib.IMAP4.error):
            # One timeout for connect, TLS handshake and greeting: imapclient's connect
            # timeout is in force until the greeting is read.
            client = imapclient.IMAPClient(
                endpoint.host,
                port=endpoint.port,
                ssl=endpoint.tls == "implicit",
                ssl_context=context,
                timeout=imapclient.SocketTimeout(connect=timeout, read=timeout),
            )
            client.normalise_times = False
            # imaplib at imapclient's debug level formats every literal with %r: slow,
            # and it would put message bodies in a debug log.
            client._imap.debug = 0
            if endpoint.tls == "starttls":
                if not client.has_capability("STARTTLS"):
                    client.shutdown()
                    raise TLSError(
                        f"{endpoint.host} does not offer STARTTLS; no credentials were sent "
                        f"(use imaps://, or {setting('no_tls')} to allow cleartext)"
                    )
                client.starttls(context)
        try:
            login(client, endpoint, password, auth, admin_user)
        except imap_errors.LoginError as exc:
            client.shutdown()
            limit = limit_hit(text_of(exc), f"IMAP server {endpoint.host}")
            if limit is not None:
                raise limit from exc
            who = f"{endpoint.user} (admin {admin_user})" if admin_user else endpoint.user
            raise AuthError(f"login as {who} at {endpoint.host} failed: {text_of(exc)}") from exc
        except (imap_errors.IMAPClientAbortError, OSError) as exc:
            raise lost(exc) from exc
        return cls(client, endpoint)

    def _guard_literals(self) -> None:
        """Refuse a literal bigger than the reply can hold, before anything is allocated for it.

        imaplib reads a literal with one read(size), and a buffered read allocates
        size bytes up front: a server announcing {999999999999} must not get that far.
        """
        plain_read = self.client._imap.read

        def read(size: int) -> bytes:
            if size > self.literal_limit:
                self.broken = True
                raise HostileServer(
                    f"the server announced a {size}-byte literal where at most {self.literal_limit} "
                    "could be meant; refusing it (broken or hostile server)"
                )
            return plain_read(size)

        self.client._imap.read = read

    def has(self, capability: str) -> bool:
        return bool(self.client.has_capability(capability))

    def close(self) -> None:
        if self.broken:  # mid-literal: a LOGOUT would read garbage
            self.client.shutdown()
            return
        try:
            self.client.logout()
        except Exception:  # the connection may be gone already; nothing to save
            try:
                self.client.shutdown()
            except Exception:
                pass

    def uid_fetch(
        self, uid_set: str, items: Sequence[str], modifiers: str | None = None, *, literal_limit: int = SMALL_LITERAL
    ) -> dict[int, dict[bytes, object]]:
        """UID FETCH, parsed and keyed by UID; a literal over literal_limit is refused unread."""
        out: dict[int, dict[bytes, object]] = {}
        for part in self.uid_fetch_stream(uid_set, items, modifiers, literal_limit=literal_limit):
            if isinstance(part, Cut):
                continue
            for uid, data in part.items():
                out.setdefault(uid, {}).update(data)
        return out

    def uid_fetch_stream(
        self, uid_set: str, items: Sequence[str], modifiers: str | None = None, *, literal_limit: int = SMALL_LITERAL
    ) -> Iterator[dict[int, dict[bytes, object]] | Cut]:
        """UID FETCH, yielding each response parsed as soon as it is whole.

        When the line drops, a Cut for the message being read comes last (if any of
        its body arrived), then ConnectionLost. A malformed response does not stop
        the reading: the rest of the reply is consumed, then ServerError is raised.
        """
        # imapclient.fetch() cannot take a range like 1:*, keys unsolicited replies by
        # sequence number and returns only at the end, so UID FETCH is sent the way it
        # does and replies are read one at a time here.
        imap = self.client._imap
        self.literal_limit = literal_limit
        malformed: ServerError | None = None
        try:
            with command_errors():
                tag = imap._command("UID", "FETCH", uid_set, "(" + " ".join(items) + ")", modifiers)
                while imap.tagged_commands[tag] is None:
                    imap._check_bye()
                    try:
                        imap._get_response()
                    except (imap.abort, OSError):
                        cut = cut_body(imap.untagged_responses.pop("FETCH", []))
                        if cut is not None:
                            yield cut
                        raise
                    lines = imap.untagged_responses.pop("FETCH", None)
                    if lines:
                        try:
                            parsed = parse_fetch(lines)
                        except ServerError as exc:
                            malformed = malformed or exc
                            continue
                        yield parsed
                status, data = imap.tagged_commands.pop(tag)
        finally:
            self.literal_limit = SMALL_LITERAL
        if status != "OK":
            limit = limit_hit(text_of(data[-1] if data else status))
            if limit is not None:
                raise limit
            raise ServerError(f"UID FETCH {uid_set[:40]} refused: {text_of(data[-1] if data else status)}")
        if malformed is not None:
            raise malformed
