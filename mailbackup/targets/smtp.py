"""SMTP target: resend archived messages, bytes as archived, to fixed recipients (smtplib).

Every folder goes to the same `--to` addresses. 4xx replies and dropped connections
are retried with exponential backoff; a 5xx reply fails that message only.
Sending is paced to at most `rate_per_minute` messages.
"""

from __future__ import annotations

import logging
import smtplib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid

from ..credentials import oauthbearer, xoauth2
from ..errors import AuthError, TLSError, UsageError, setting
from ..net import Endpoint, connect_errors, tls_context, warn_cleartext
from . import Delivered, Destination, Outgoing

log = logging.getLogger("mailbackup")


@dataclass(frozen=True)
class SmtpOptions:
    """How to resend: to whom, as whom, how fast, and how hard to retry a message."""

    recipients: tuple[str, ...] = ()
    sender: str | None = None  # default: the login, if it is an address
    resent: bool = False
    rate_per_minute: float | None = None
    retries: int = 5
    backoff: float = 1.0
    ca_file: str | None = None
    timeout: float = 120.0
    auth: str = "password"  # or "xoauth2" / "oauthbearer" with an access token


def resent_headers(sender: str, recipients: Sequence[str], when: datetime, msgid: str) -> bytes:
    """Resent-* fields to prepend (RFC 5322 3.6.6): the message itself stays as archived."""
    lines = [
        f"Resent-Date: {format_datetime(when)}",
        f"Resent-From: <{sender}>",
        f"Resent-To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Resent-Message-ID: {msgid}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class SmtpTarget:
    """One SMTP session, reopened when the server drops it."""

    window = 1

    def __init__(
        self, endpoint: Endpoint, password: str, options: SmtpOptions, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if not options.recipients:
            raise UsageError(f"restore over SMTP needs at least one {setting('recipients')} address")
        sender = options.sender or (endpoint.user if "@" in endpoint.user else None)
        if not sender:
            raise UsageError(f"the login {endpoint.user!r} is not an address: give the envelope sender with {setting('sender')}")
        self.endpoint = endpoint
        self.password = password
        self.options = options
        self.sender = sender
        self.recipients = tuple(options.recipients)
        self.identity = f"smtp://{endpoint.user}@{endpoint.host}:{endpoint.port} to {','.join(sorted(self.recipients))}"
        self.interval = 60.0 / options.rate_per_minute if options.rate_per_minute else 0.0
        self.sleep = sleep
        self.session: smtplib.SMTP | None = None
        self._next_start = 0.0
        self._done: deque[list[Delivered]] = deque()

    def _oauth2(self, session: smtplib.SMTP) -> None:
        """AUTH XOAUTH2 or OAUTHBEARER; an error challenge is answered empty to get the final reply."""
        endpoint = self.endpoint
        if self.options.auth == "xoauth2":
            initial = xoauth2(endpoint.user, self.password)
        else:
            initial = oauthbearer(endpoint.user, self.password, endpoint.host, endpoint.port)
        session.auth(self.options.auth.upper(), lambda challenge=None: initial.decode() if challenge is None else "")

    @classmethod
    def connect(cls, endpoint: Endpoint, password: str, options: SmtpOptions, *, dry_run: bool = False) -> SmtpTarget:
        target = cls(endpoint, password, options)
        if not dry_run:
            target._open()
        return target

    def _open(self) -> smtplib.SMTP:
        if self.session is not None:
            return self.session
        endpoint = self.endpoint
        context = tls_context(self.options.ca_file) if endpoint.tls != "none" else None
        warn_cleartext(endpoint)
        with connect_errors(endpoint):
            if endpoint.tls == "implicit":
                session: smtplib.SMTP = smtplib.SMTP_SSL(
                    endpoint.host, endpoint.port, timeout=self.options.timeout, context=context
                )
            else:
                session = smtplib.SMTP(endpoint.host, endpoint.port, timeout=self.options.timeout)
            session.ehlo()
            if endpoint.tls == "starttls":
                if not session.has_extn("starttls"):
                    session.close()
                    raise TLSError(
                        f"{endpoint.host} does not offer STARTTLS; no credentials were sent "
                        f"(use smtps://, or {setting('no_tls')} to allow cleartext)"
                    )
                session.starttls(context=context)
                session.ehlo()
            if session.has_extn("auth"):
                try:
                    if self.options.auth == "password":
                        session.login(endpoint.user, self.password)
                    else:
                        self._oauth2(session)
                except smtplib.SMTPAuthenticationError as exc:
                    session.close()
                    raise AuthError(f"login as {endpoint.user} at {endpoint.host} failed: {_reply(exc)}") from exc
            else:
                log.info("%s offers no AUTH; sending without logging in", endpoint.host)
        self.session = session
        return session

    def _drop(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except Exception:  # already gone
                pass
        self.session = None

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.quit()
            except Exception:  # already gone
                pass
        self._drop()

    def destination(self, source_name: str, delimiter: str | None, attributes: frozenset[str]) -> str:
        return "to " + ", ".join(self.recipients)

    def open(self, name: str, *, create: bool = True, contents: bool = True) -> Destination:
        return Destination(name=name)

    def copies(self, destination: Destination, size: int, sha256: str) -> list[int]:
        return []  # a mail server cannot be asked what it delivered

    def settle(self, name: str, quiet: float, limit: float) -> None:
        pass  # nothing to ask: SMTP keeps one message in doubt at most

    def store_flags(self, name: str, changes: dict[tuple[str, ...], list[int]]) -> None:
        pass  # sent mail has no flags to change

    @property
    def pending(self) -> int:
        return len(self._done)

    @property
    def full(self) -> bool:
        return len(self._done) >= self.window

    def send(self, destination: Destination, batch: Sequence[Outgoing]) -> None:
        self._done.append([self._deliver(message) for message in batch])

    def collect(self) -> list[Delivered]:
        return self._done.popleft()

    def _deliver(self, message: Outgoing) -> Delivered:
        raw = message.raw
        if self.options.resent:
            raw = resent_headers(self.sender, self.recipients, datetime.now(timezone.utc), make_msgid()) + raw
        last = "no attempt"
        for attempt in range(self.options.retries + 1):
            if attempt:
                self.sleep(self.options.backoff * 2 ** (attempt - 1))
            wait = self._next_start - time.monotonic()
            if wait > 0:
                self.sleep(wait)
            self._next_start = time.monotonic() + self.interval
            try:
                session = self._open()
                refused = session.sendmail(self.sender, list(self.recipients), raw, self._mail_options(session, raw))
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [code for code, _ in exc.recipients.values()]
                last = "; ".join(f"{rcpt}: {_reply_text(code, text)}" for rcpt, (code, text) in exc.recipients.items())
                if all(400 <= code < 500 for code in codes):
                    continue
                return Delivered(message.item, ok=False, detail=last)
            except smtplib.SMTPResponseException as exc:
                last = _reply(exc)
                if 400 <= exc.smtp_code < 500:
                    continue
                return Delivered(message.item, ok=False, detail=last)
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                last = f"connection lost: {exc}"
                self._drop()
                continue
            except smtplib.SMTPException as exc:
                return Delivered(message.item, ok=False, detail=str(exc))
            if refused:
                detail = "; ".join(f"{rcpt}: {_reply_text(code, text)}" for rcpt, (code, text) in refused.items())
                return Delivered(message.item, ok=True, detail=f"delivered, but refused for {detail}")
            return Delivered(message.item, ok=True)
        return Delivered(message.item, ok=False, detail=f"gave up after {self.options.retries + 1} attempts: {last}")

    def _mail_options(self, session: smtplib.SMTP, raw: bytes) -> list[str]:
        options = []
        if not raw.isascii() and session.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (self.sender, *self.recipients)) and session.has_extn("smtputf8"):
            options.append("SMTPUTF8")
        return options


def _reply_text(code: int, text: bytes | str) -> str:
    value = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {value}".strip()


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return _reply_text(exc.smtp_code, exc.smtp_error)
