"""Run the backups of several configured accounts, one after another or in parallel processes."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from . import keys
from .config import Account
from .errors import MailbackupError
from .malloc import after_job
from .model import Summary
from .pipeline import BackupOptions, Progress, backup
from .stores.blobs import Bucket

Outcome = Summary | MailbackupError
BLOB_BATCH_BYTES = 4 << 20


def options_for(account: Account) -> BackupOptions:
    return BackupOptions(
        include=account.folders,
        exclude=account.exclude,
        no_tls=account.no_tls,
        ca_file=account.ca_file,
        timeout=account.timeout,
        auth=account.auth,
        into=account.into,
        delete=account.delete,
        delete_older_than=account.delete_older_than,
        index=account.index,
        admin_user=account.login.admin_user,
        blobs=Bucket(account.blobs, account.s3_endpoint) if account.blobs else None,
        # Bytes bound for a bucket go up one message at a time anyway: smaller batches keep a
        # worker's memory (up to three batches at once) well under 100 MB at no cost in speed.
        batch_bytes=BLOB_BATCH_BYTES if account.blobs else BackupOptions.batch_bytes,
        max_rate=account.max_rate,
        max_bytes_per_day=account.max_bytes_per_day,
        max_connections=account.max_connections,
        gmail_trash_and_spam=account.gmail_include_trash_spam,
    )


def backup_account(account: Account, progress: Progress | None = None) -> Summary:
    with keys.using(account.keys or keys.current()):
        return backup(
            account.source, account.archive, password=account.credential(), options=options_for(account), progress=progress
        )


def _outcome(account: Account) -> Outcome:
    try:
        return backup_account(account)
    except MailbackupError as exc:
        return exc
    finally:
        after_job()  # one process backs up many accounts: what one left behind must not pile up


def backup_accounts(accounts: Sequence[Account], jobs: int = 1) -> dict[str, Outcome]:
    """Each account's summary, or the error that stopped it; one failure never stops the others."""
    if jobs <= 1 or len(accounts) <= 1:
        return {a.name: _outcome(a) for a in accounts}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(_outcome, accounts))
    return {a.name: o for a, o in zip(accounts, outcomes)}
