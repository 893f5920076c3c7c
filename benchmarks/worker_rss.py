"""A queue worker's memory as the accounts it has backed up grow (issue 11: under 100 MB whatever their number).

    python benchmarks/worker_rss.py [--accounts 100] [--messages 60] [--at 1,10,25,50,100] [--dir /tmp] [--json]

A private Dovecot, PostgreSQL (queue and archive) and `rclone serve s3` (the archive's
message bytes), K accounts of M messages each (the size mix of imap_backup.py), and
one `mailbackup worker`. Accounts are queued in slices; after each slice drains, the
worker's VmHWM (peak RSS so far) and VmRSS are read from /proc. Flat means the peak
after 100 accounts is the peak after 10, within a few MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from imap_backup import MessageFactory  # noqa: E402  found through the sys.path lines above

from tests.servers.dovecot import Dovecot  # noqa: E402
from tests.servers.postgres import Postgres  # noqa: E402
from tests.servers.s3 import S3Server  # noqa: E402


def memory(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--at", default="1,10,25,50,100")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    marks = sorted({min(int(n), args.accounts) for n in args.at.split(",")} | {args.accounts})
    root = Path(tempfile.mkdtemp(prefix="mbrss-", dir=args.dir))
    root.chmod(0o755)
    dovecot, postgres, s3 = Dovecot(), Postgres(), S3Server(root / "s3")
    worker = None
    rows = []
    try:
        dovecot.start(root / "dc", tls=False)
        postgres.start()
        s3.directory.mkdir()
        s3.start()
        s3.bucket("mbrss")
        env = {**os.environ, **s3.env}
        archive, queue = postgres.create_database("mbrss_archive"), postgres.create_database("mbrss_queue")
        factory = MessageFactory(1)
        lines = ["[defaults]", "no_tls = true", "index = false", f'archive = "{archive}"', 'blobs = "s3://mbrss/mail"', ""]
        for n in range(args.accounts):
            account = dovecot.add_user()
            dovecot.seed_maildir(account, "INBOX", (factory.make(i, "INBOX") for i in range(args.messages)))
            (root / f"a{n:03d}.pw").write_text(account.password + "\n")
            lines += [f"[accounts.a{n:03d}]", f'source = "{account.url("imap")}"', f'password_file = "{root / f"a{n:03d}.pw"}"', ""]
        config = root / "config.toml"
        config.write_text("\n".join(lines))
        command = [sys.executable, "-m", "mailbackup"]
        worker = subprocess.Popen([*command, "worker", "--queue", queue, "--config", str(config), "-q"], cwd=REPO, env=env)
        done = 0
        for mark in marks:
            names = [a for n in range(done, mark) for a in ("--account", f"a{n:03d}")]
            started = time.monotonic()
            subprocess.run([*command, "enqueue", "--queue", queue, "--config", str(config), *names, "-q"],
                           cwd=REPO, env=env, check=True)
            subprocess.run([*command, "jobs", "--queue", queue, "--wait"], cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            peak, now = memory(worker.pid)
            rows.append({"accounts": mark, "peak_rss_mb": round(peak, 1), "rss_mb": round(now, 1),
                         "seconds": round(time.monotonic() - started, 1)})
            done = mark
            if not args.json:
                print(f"after {mark:>4} accounts: peak RSS {peak:.1f} MB, RSS now {now:.1f} MB", flush=True)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        dovecot.stop()
        postgres.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"messages_per_account": args.messages, "marks": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
