"""Restore (archive -> IMAP or SMTP) and migrate (IMAP -> IMAP): two fronts on one engine.

Restore reads the archive through `sources.archive.ArchiveSource`, migrate reads a
live account through `sources.imap.ImapSource`; `transfer.Engine` does the rest (journal,
target checks, batches, reconnects). The journal lives in a state database outside
the archive ($XDG_STATE_HOME/mailbackup/restore.sqlite or migrate.sqlite, or
`state`), so the archive is only ever read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import date, datetime
from datetime import time as day_time
from pathlib import Path

import sqlalchemy as sa

from .catalog import Selection, small_cache
from .errors import UsageError, setting
from .journal import Journal, default_state_path, state_engine
from .model import Folder, TransferReport, TransferSummary
from .net import Endpoint, parse_url
from .pipeline import Progress, wanted
from .sources import (
    Source,
)
from .sources.archive import ArchiveSource
from .sources.imap import ImapSource
from .stores import open_store
from .targets import Target
from .targets.gmail import apply_labels, label_plan, offers_labels
from .transfer import Engine, TransferOptions

IMAP_SCHEMES = ("imap", "imaps")
SMTP_SCHEMES = ("smtp", "smtps")

__all__ = ["RestoreOptions", "TransferReport", "TransferSummary", "migrate", "parse_as_of", "restore"]


@dataclass(frozen=True)
class RestoreOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    since: date | None = None  # INTERNALDATE on or after
    before: date | None = None  # INTERNALDATE before
    include_gone: bool = False
    as_of: datetime | None = None  # the mailbox as it stood then (see parse_as_of)
    into: str | None = None
    automap: bool = True
    dry_run: bool = False
    force: bool = False  # check every message on the target instead of trusting the journal
    no_tls: bool = False
    ca_file: str | None = None
    timeout: float = 120.0
    auth: str = "password"  # the target's login: or "xoauth2" / "oauthbearer" with an access token
    source_auth: str = "password"  # migrate's source login
    # migrate's source connection; None: the same as the target's
    source_no_tls: bool | None = None
    source_ca_file: str | None = None
    source_timeout: float | None = None
    admin_user: str | None = None  # the target's login is this admin's, on behalf of the URL's user
    source_admin_user: str | None = None  # the same for migrate's source
    batch_messages: int = 100
    batch_bytes: int = 4 << 20
    reconnects: int = 3  # after a dropped line: consecutive attempts without progress
    workers: int = 3  # folders transferred at once, each over connections of its own (1: one at a time)
    parallel_after: int = 500  # ... once this many messages went out: a short run needs no more logins
    reconnect_delay: float = 2.0  # then 2x, 4x...
    # After a dropped line: how long a target folder must stay unchanged before it is listed, so
    # that APPENDs the server still runs for the dead session are seen, not sent twice.
    settle_quiet: float = 1.0
    # SMTP only
    recipients: tuple[str, ...] = ()
    sender: str | None = None
    resent: bool = False
    rate_per_minute: float | None = None
    retries: int = 5  # per message, on a 4xx reply or a dropped connection
    backoff: float = 1.0

    def transfer(self) -> TransferOptions:
        return TransferOptions(
            include=self.include,
            exclude=self.exclude,
            dry_run=self.dry_run,
            force=self.force,
            batch_messages=self.batch_messages,
            batch_bytes=self.batch_bytes,
            retries=self.reconnects,
            retry_delay=self.reconnect_delay,
            settle_quiet=self.settle_quiet,
            workers=self.workers,
            parallel_after=self.parallel_after,
        )


def parse_as_of(text: str) -> datetime:
    """An ISO date (the end of that day) or date-time; local time unless it gives an offset."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        return datetime.combine(day, day_time.max).astimezone()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"as-of {text!r}: write a date (2024-05-01) or a date and time (2024-05-01T14:30)") from None
    return when if when.tzinfo is not None else when.astimezone()


def selection(options: RestoreOptions) -> Selection:
    """What the catalog should pick from the archive for these options."""
    return Selection(as_of=options.as_of, include_gone=options.include_gone, since=options.since, before=options.before)


def connect_target(endpoint: Endpoint, password: str, options: RestoreOptions) -> Target:
    if endpoint.scheme in SMTP_SCHEMES:
        from .targets.smtp import SmtpOptions, SmtpTarget

        if options.admin_user:
            raise UsageError(f"{setting('admin_user')} is for IMAP targets, not SMTP")
        smtp = SmtpOptions(
            recipients=options.recipients,
            sender=options.sender,
            resent=options.resent,
            rate_per_minute=options.rate_per_minute,
            retries=options.retries,
            backoff=options.backoff,
            ca_file=options.ca_file,
            timeout=options.timeout,
            auth=options.auth,
        )
        return SmtpTarget.connect(endpoint, password, smtp, dry_run=options.dry_run)
    from .targets.imap import ImapTarget

    return ImapTarget.connect(
        endpoint,
        password,
        ca_file=options.ca_file,
        timeout=options.timeout,
        automap=options.automap,
        into=options.into,
        auth=options.auth,
        admin_user=options.admin_user,
    )


def archive_identity(url: str) -> str:
    """The journal's name for an archive: its URL, without a password."""
    if "://" in url:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    return url


def restore(
    archive: str,
    target_url: str,
    *,
    password: str,
    options: RestoreOptions = RestoreOptions(),
    state: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    mailbox: str | None = None,
) -> TransferSummary:
    """Put the archive's messages back on an IMAP account, or resend them over SMTP.

    `mailbox` picks the account (USER@HOST) in an archive that holds several.
    """
    progress = progress or Progress()
    started = time.monotonic()
    endpoint = parse_url(target_url, no_tls=options.no_tls, schemes=IMAP_SCHEMES + SMTP_SCHEMES, role="target")
    smtp = endpoint.scheme in SMTP_SCHEMES
    if smtp and not options.recipients:
        raise UsageError(f"restore over SMTP needs at least one {setting('recipients')} address")
    if not smtp and (options.recipients or options.sender or options.resent or options.rate_per_minute):
        raise UsageError(
            f"{setting('recipients')}, {setting('sender')}, {setting('resent')} and {setting('rate_per_minute')} "
            "apply to SMTP targets only"
        )
    if smtp and options.force:
        raise UsageError(f"{setting('force')} checks the target folder's messages: an SMTP server cannot be asked what it holds")
    if options.as_of is not None and options.include_gone:
        raise UsageError(f"{setting('as_of')} picks what was there at that time; {setting('include_gone')} does not go with it")
    store = open_store(archive, mode="read", account=mailbox)
    small_cache(store.catalog.engine, kib=64)  # read by every worker and its prefetch thread, in id order
    # Opening the store left connections in the pool with SQLite's 2 MB cache; the workers
    # would take those up and fill them (5 MB of peak memory at 20,000 messages).
    store.catalog.engine.dispose()
    try:
        picked = selection(options)
        labels = None if smtp else label_plan(store)  # a Gmail archive: label folders are views of All Mail
        hidden: frozenset[str] = frozenset()
        engine = state_engine(Path(state) if state else default_state_path("restore"), dry_run=options.dry_run)
        try:

            def connect() -> tuple[Source, Target]:
                nonlocal hidden
                source = ArchiveSource(store, picked)  # one per worker: it remembers the folder it has open
                target = connect_target(endpoint, password, options)
                if labels is not None:  # to Gmail, each message once: labels are set afterwards
                    chosen = lambda name: wanted(Folder(name), options.include, options.exclude)  # noqa: E731
                    hidden = source.hidden = labels.hidden(chosen) if offers_labels(target) else frozenset()
                return source, target

            def journal(target: Target) -> Journal:
                return Journal(engine, archive_identity(store.url), target.identity, create=not options.dry_run)

            # An archive reads a batch in a few milliseconds: read ahead, it would only be one more held per worker.
            reports = Engine(connect, journal, replace(options.transfer(), read_ahead=0), progress).run()
            if labels is not None and hidden and not options.dry_run:
                target = connect_target(endpoint, password, options)
                try:
                    apply_labels(target, store, journal(target), labels, picked)  # type: ignore[arg-type]  # offers_labels: an ImapTarget
                finally:
                    target.close()
        finally:
            engine.dispose()
    finally:
        store.close()
    return TransferSummary(archive, str(endpoint), tuple(reports), time.monotonic() - started, options.dry_run)


# migrate


def without_prefix(name: str, prefix: str) -> str:
    """A source folder's name relative to its personal namespace ("INBOX.Work" -> "Work")."""
    if prefix and len(name) > len(prefix) and name.upper().startswith(prefix.upper()):
        return name[len(prefix):]
    return name


def migrate(
    source_url: str,
    target_url: str,
    *,
    password: str,
    target_password: str,
    state: str | os.PathLike[str] | None = None,
    options: RestoreOptions = RestoreOptions(),
    progress: Progress | None = None,
) -> TransferSummary:
    """Copy an IMAP account to another, folder by folder, without a local archive; incremental."""
    from .targets.imap import ImapTarget

    progress = progress or Progress()
    started = time.monotonic()
    source_no_tls = options.no_tls if options.source_no_tls is None else options.source_no_tls
    source_ca_file = options.source_ca_file or options.ca_file
    source_timeout = options.source_timeout or options.timeout
    source_endpoint = parse_url(source_url, no_tls=source_no_tls, schemes=IMAP_SCHEMES)
    target_endpoint = parse_url(target_url, no_tls=options.no_tls, schemes=IMAP_SCHEMES, role="target")

    prefix = ""

    def connect() -> tuple[Source, Target]:
        nonlocal prefix
        source = ImapSource.connect(
            source_endpoint,
            password,
            ca_file=source_ca_file,
            timeout=source_timeout,
            auth=options.source_auth,
            admin_user=options.source_admin_user,
        )
        try:
            # Cyrus keeps every personal folder under "INBOX.": that is the namespace, not a parent.
            prefix = source.personal_prefix()
            target = ImapTarget.connect(
                target_endpoint,
                target_password,
                ca_file=options.ca_file,
                timeout=options.timeout,
                automap=options.automap,
                into=options.into,
                auth=options.auth,
                admin_user=options.admin_user,
            )
        except BaseException:
            source.close(commit=False)
            raise
        return source, target

    def relative(folder: Folder) -> Folder:
        return replace(folder, name=without_prefix(folder.name, prefix))

    def journal(target: Target) -> Journal:
        source = f"imap://{source_endpoint.user}@{source_endpoint.host}:{source_endpoint.port}"
        return Journal(engine, source, target.identity, create=not options.dry_run)

    engine = state_engine(Path(state) if state else default_state_path("migrate"), dry_run=options.dry_run)
    try:
        reports = Engine(connect, journal, options.transfer(), progress, relative=relative).run()
    finally:
        engine.dispose()
    return TransferSummary(
        str(source_endpoint), str(target_endpoint), tuple(reports), time.monotonic() - started, options.dry_run
    )
