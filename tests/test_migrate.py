"""Migrate IMAP -> IMAP between Dovecot instances with different delimiters: exact, incremental, flags."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mailbackup.restore import RestoreOptions, migrate
from tests.test_backup_imap import server_view

ROOT = Path(__file__).parent.parent


def run_migrate(source, target, state: Path, **options) -> object:  # type: ignore[no-untyped-def]
    return migrate(
        source.url("imap"), target.url("imap"), password=source.password, target_password=target.password,
        state=state, options=RestoreOptions(no_tls=True, **options),
    )


def seed(dovecot, account) -> int:  # type: ignore[no-untyped-def]
    zone = timezone(timedelta(hours=2))
    folders = ["INBOX", "Archive/2024", "Entwürfe/Ökonomie", "Sent"]
    count = 0
    for i in range(40):
        folder = folders[i % 4]
        raw = b"Subject: %d\r\nMessage-ID: <%d@m>\r\n\r\n%s\r\n" % (i, i, "äöü".encode() * i)
        if i % 5 == 0:
            raw = b"Subject: no id %d\r\n\r\nbody\r\n" % i
        flags = [("\\Seen",), ("\\Flagged", "Projekt"), ()][i % 3]
        dovecot.append(account, folder, raw, flags, datetime(2021, 1 + i % 12, 3, 4, 5, i % 60, tzinfo=zone))
        count += 1
    return count


def normalised(view, separator: str) -> dict[str, list[tuple[str, frozenset[str], datetime]]]:  # type: ignore[no-untyped-def]
    return {
        name.replace(separator, "/"): [(hashlib.sha256(raw).hexdigest(), flags, when) for raw, flags, when in messages]
        for name, messages in view.items()
    }


def test_migrate_across_delimiters_then_rerun_copies_nothing(dovecot, account, dovecot_dot, account_dot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed(dovecot, account)
    state = tmp_path / "state.sqlite"
    summary = run_migrate(account, account_dot, state)
    assert summary.ok and summary.sent == count
    want = normalised(server_view(dovecot, account), "/")
    got = normalised(server_view(dovecot_dot, account_dot), ".")
    assert got == want
    assert "Entwürfe.Ökonomie" in dovecot_dot.folders(account_dot)
    again = run_migrate(account, account_dot, state)
    assert (again.sent, again.as_dict()["done_before"]) == (0, count)
    # And back the other way, '.' -> '/', into a fresh account.
    back = dovecot.add_user()
    assert run_migrate(account_dot, back, tmp_path / "back.sqlite").sent == count
    assert normalised(server_view(dovecot, back), "/") == want


def test_new_mail_and_flag_changes_reach_the_target(dovecot, account, dovecot_dot, account_dot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(dovecot, account)
    state = tmp_path / "state.sqlite"
    run_migrate(account, account_dot, state)
    uid = dovecot.append(account, "INBOX", b"Subject: later\r\nMessage-ID: <later@m>\r\n\r\nnew\r\n")
    with dovecot.client(account) as imap:
        imap.select_folder("INBOX")
        first = sorted(imap.search("ALL"))[0]
        imap.set_flags([first], [b"\\Answered", b"Later"])
    summary = run_migrate(account, account_dot, state)
    assert summary.sent == 1 and summary.as_dict()["flags_updated"] == 1
    assert normalised(server_view(dovecot_dot, account_dot), ".") == normalised(server_view(dovecot, account), "/")
    assert uid is not None


def test_dry_run_leaves_target_untouched(dovecot, account, dovecot_dot, account_dot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    count = seed(dovecot, account)
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password, "MAILBACKUP_TARGET_PASSWORD": account_dot.password}
    state = tmp_path / "state.sqlite"
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "migrate", account.url("imap"), account_dot.url("imap"), "--no-tls", "--target-no-tls",
         "--dry-run", "--state", str(state)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Entwürfe/Ökonomie -> Entwürfe.Ökonomie: 10 messages" in done.stdout
    assert f"total: {count} messages" in done.stdout
    assert dovecot_dot.folders(account_dot) == ["INBOX"] and dovecot_dot.fetch(account_dot, "INBOX") == []
    assert not state.exists()
    # The CLI with both credential sets does the real thing.
    done = subprocess.run(
        [sys.executable, "-m", "mailbackup", "migrate", account.url("imap"), account_dot.url("imap"), "--no-tls", "--target-no-tls",
         "--state", str(state), "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert '"sent": %d' % count in done.stdout
