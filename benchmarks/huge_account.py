"""One huge account: msgs/s and peak RSS of a backup as N grows (issue 11, item 5).

    python benchmarks/huge_account.py [--messages 100000 1000000] [--folders 20] [--dir /tmp] [--json]

For each N: a private Dovecot, one user whose N small messages (about 600 bytes,
spread evenly over --folders folders) are written straight into its Maildir++
(far faster than APPEND), one SELECT and SEARCH per folder so the clock measures the
backup and not Dovecot's first look, then ``mailbackup backup`` into a fresh
SQLite archive under ``/usr/bin/time -v`` (elapsed, peak RSS), then a second run
that finds nothing new. Linear time shows as a flat msgs/s column; bounded
memory as a peak RSS that does not grow with N beyond the UID arrays (8 bytes a
UID per folder open at once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.servers.dovecot import Dovecot  # noqa: E402  found through the sys.path line above

TIME = "/usr/bin/time"


def message(i: int) -> bytes:
    return (
        b"From: sender%d@example.org\r\nTo: huge@example.org\r\nSubject: message %d\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <%d@huge.example>\r\n\r\n" % (i % 97, i, i)
        + b"line of body text for message %d, short on purpose.\r\n" % i * 8
    )


def seed(dovecot: Dovecot, user, total: int, folders: int) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    names = ["INBOX"] + [f"Archive/{year}" for year in range(2000, 2000 + folders - 1)]
    per = -(-total // len(names))
    for index, name in enumerate(names):
        first = index * per
        count = min(per, total - first)
        if count > 0:
            dovecot.seed_maildir(user, name, ((message(i), "S", 1.6e9 + i) for i in range(first, first + count)))
    # Dovecot's first look at a new Maildir (UIDs, index) is not the backup's cost.
    client = dovecot.client(user)
    for name in names:
        client.select_folder(name, readonly=True)
        client.search("ALL")
    client.logout()
    return time.monotonic() - started


def timed(command: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([TIME, "-v", *command], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)  # type: ignore[union-attr]
    seconds = sum(float(part) * 60**power for power, part in enumerate(reversed(clock.split(":"))))
    return {"seconds": seconds, "peak_rss_mb": rss / 1024}


def run(total: int, folders: int, base: Path) -> dict[str, object]:
    directory = Path(tempfile.mkdtemp(prefix="mbhuge", dir=base))
    directory.chmod(0o755)  # Dovecot's auth process must traverse it
    dovecot = Dovecot()
    dovecot.start(directory / "dc", tls=False)
    try:
        user = dovecot.add_user()
        seeding = seed(dovecot, user, total, folders)
        archive = str(directory / "huge.sqlite")
        env = {**os.environ, "MAILBACKUP_PASSWORD": user.password}
        command = [sys.executable, "-m", "mailbackup", "backup", user.url("imap"), archive, "--no-tls", "-q", "--no-index"]
        first = timed(command, env)
        again = timed(command, env)
        import sqlite3

        with sqlite3.connect(archive) as db:
            archived = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        if archived != total:
            raise RuntimeError(f"archive holds {archived} messages, not {total}")
        return {
            "messages": total,
            "folders": folders,
            "seed_seconds": round(seeding, 1),
            "backup_seconds": round(first["seconds"], 1),
            "msgs_per_s": round(total / first["seconds"]),
            "peak_rss_mb": round(first["peak_rss_mb"], 1),
            "rerun_seconds": round(again["seconds"], 1),
            "rerun_peak_rss_mb": round(again["peak_rss_mb"], 1),
            "archive_mb": round(os.path.getsize(archive) / 2**20, 1),
        }
    finally:
        dovecot.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--folders", type=int, default=20)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for total in args.messages:
        row = run(total, args.folders, Path(args.dir))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{row['messages']:>9} msgs in {row['folders']} folders: backup {row['backup_seconds']} s "
                f"({row['msgs_per_s']} msgs/s, peak RSS {row['peak_rss_mb']} MB); rerun {row['rerun_seconds']} s "
                f"(peak RSS {row['rerun_peak_rss_mb']} MB); seeding {row['seed_seconds']} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
