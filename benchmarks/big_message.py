"""Peak RSS of backing up one huge message, over IMAP and POP3, into each store.

    python benchmarks/big_message.py [--mb 50]

Starts a private Dovecot (plain listeners), seeds one message with a base64
attachment of about --mb MB, and runs `mailbackup backup` under /usr/bin/time -v.
The baseline is the same run on an account holding one small message; the
message's cost is (peak - baseline) / message size.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from imap_backup import timed  # noqa: E402

from tests.servers.dovecot import Dovecot  # noqa: E402


def big_message(megabytes: int) -> bytes:
    payload = base64.encodebytes(random.Random(7).randbytes(megabytes * 3 // 4 << 20)).replace(b"\n", b"\r\n")
    head = (
        b"From: big@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n'
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    return head + payload + b"\r\n--b--\r\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mbbig", dir="/tmp"))
    work.chmod(0o755)  # Dovecot's unprivileged auth process must traverse it
    server = Dovecot().start(work / "dc", tls=False)
    try:
        raw = big_message(args.mb)
        big, small = server.add_user(), server.add_user()
        server.seed_maildir(big, "INBOX", [(raw, "S", 1.6e9)])
        server.seed_maildir(small, "INBOX", [(b"Subject: small\r\n\r\nbody\r\n", "S", 1.6e9)])
        for account in (big, small):
            server.fetch(account, "INBOX")  # let Dovecot index before timing
        size = len(raw)
        rows = []
        for scheme, port in (("imap", server.imap_port), ("pop3", server.pop3_port)):
            for store in ("maildir", "mbox", "sqlite"):
                peaks = {}
                for label, account in (("baseline", small), ("big", big)):
                    out = work / f"{scheme}-{store}-{label}"
                    archive = {"maildir": f"maildir:{out}", "mbox": f"mbox:{out}", "sqlite": f"{out}.sqlite"}[store]
                    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
                    cmd = [sys.executable, "-m", "mailbackup", "backup", f"{scheme}://{account.user}@127.0.0.1:{port}",
                           archive, "--no-tls", "-q", "--json"]
                    seconds, rss, proc = timed(cmd, env)
                    if proc.returncode != 0 or json.loads(proc.stdout.decode().splitlines()[-1])["new"] != 1:
                        print(proc.stdout.decode(), proc.stderr.decode(), file=sys.stderr)
                        return 1
                    peaks[label] = rss
                cost = (peaks["big"] - peaks["baseline"]) * (1 << 20) / size
                rows.append({"source": scheme, "store": store, "message_mb": round(size / 2**20, 1),
                             "baseline_rss_mb": round(peaks["baseline"], 1), "peak_rss_mb": round(peaks["big"], 1),
                             "cost_x_message": round(cost, 2)})
        print(f"one {size / 2**20:.1f} MB message; cost = (peak RSS - baseline RSS) / message size; target about 1.5x")
        print(f"{'source':<7}{'store':<9}{'baseline MB':>12}{'peak MB':>9}{'cost':>7}")
        for r in rows:
            print(f"{r['source']:<7}{r['store']:<9}{r['baseline_rss_mb']:>12}{r['peak_rss_mb']:>9}{r['cost_x_message']:>6}x")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
