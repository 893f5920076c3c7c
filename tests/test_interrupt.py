"""Ctrl-C: exit 130, one line, no traceback; what was committed stays and a rerun finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[str]:
    return [c for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()]


def test_ctrl_c_exits_130_keeps_what_was_committed_and_a_rerun_finishes(dovecot, account, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = dovecot.client(account)
    filler = b"x" * 60_000
    for number in range(300):
        client.append("INBOX", b"Subject: note %d\r\n\r\nword%d " % (number, number) + filler + b"\r\n")
    client.logout()
    archive = tmp_path / "md"
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    command = [sys.executable, "-m", "mailbackup", "backup", account.url("imap"), f"maildir:{archive}", "--no-tls",
               "--batch-messages", "10"]
    # Its own process group, as a shell gives a foreground job: Ctrl-C reaches the whole group.
    # Ctrl-C handled as a terminal's foreground job has it: a suite started in the background inherits it ignored.
    backup = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while backup.poll() is None and time.monotonic() < deadline:
        if any(archive.glob("**/cur/*")) and children(backup.pid):
            break  # a batch is committed and the indexer runs: interrupt in the middle of the run
        time.sleep(0.01)
    assert backup.poll() is None, "backup ended before it could be interrupted"
    os.killpg(backup.pid, signal.SIGINT)
    _, stderr = backup.communicate(timeout=120)
    assert backup.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr, stderr
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    verify = subprocess.run([sys.executable, "-m", "mailbackup", "verify", f"maildir:{archive}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert len(list(archive.glob("**/cur/*"))) == 300
    # A batch committed in the instant of the interrupt may not have reached the indexer: reindex catches up.
    subprocess.run([sys.executable, "-m", "mailbackup", "reindex", f"maildir:{archive}"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    found = subprocess.run([sys.executable, "-m", "mailbackup", "search", f"maildir:{archive}", "word0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "note 0" in found.stdout, found.stdout + found.stderr
