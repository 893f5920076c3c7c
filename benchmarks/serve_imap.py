"""Fetch a whole archive through `mailbackup serve --imap` and the same mail from Dovecot, in one run.

    python benchmarks/serve_imap.py                    # 20,000 messages (~570 MB), table
    python benchmarks/serve_imap.py --messages 2000    # quick run
    python benchmarks/serve_imap.py --store sqlite --json

1. Starts a private Dovecot (tests/servers/dovecot.py), seeds N messages with the generator of
   imap_backup.py (same folders and sizes), warms its index and the page cache.
2. Untimed: `mailbackup backup` of that account into an archive (--store maildir|mbox|sqlite).
3. Starts `mailbackup serve ARCHIVE --imap 127.0.0.1:PORT` as a subprocess.
4. Times the same client against both servers, each after one warm-up pass, alternating, best of
   --repeat (3) runs each, since the machine may be shared: imap_fetch_files.py
   --discard, i.e. imaplib, per folder one `UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE
   BODY.PEEK[])`, read literal by literal. Both must deliver N messages and the same bytes.
5. Prints msgs/s, MB/s (bytes as served / wall time), the client's peak RSS, and the serve
   process's RSS after its warm-up and its peak (VmHWM) after the timed fetch: flat memory means
   the peak does not grow with N. Target: serve >= 0.5x Dovecot's msgs/s.
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

from imap_backup import seed, timed  # noqa: E402  found through the sys.path lines above

from tests.servers.dovecot import Dovecot, free_port  # noqa: E402

ITEMS = "UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]"
TARGET = 0.5


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def fetch(port: int, user: str, password: str, timed_run: bool) -> dict:
    cmd = [sys.executable, str(HERE / "imap_fetch_files.py"), "127.0.0.1", str(port), user, "--discard", ITEMS]
    env = {**os.environ, "IMAP_PASSWORD": password}
    if not timed_run:
        return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    seconds, rss, proc = timed(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
    return {**json.loads(proc.stdout), "seconds": seconds, "client_rss_mb": rss}


def row(name: str, result: dict, extra: dict | None = None) -> dict:
    seconds = result["seconds"]
    return {"contender": name, "messages": result["messages"], "seconds": round(seconds, 2),
            "msgs_per_s": round(result["messages"] / seconds, 1), "mb_per_s": round(result["bytes"] / 1e6 / seconds, 1),
            "client_peak_rss_mb": round(result["client_rss_mb"], 1), **(extra or {})}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--store", choices=["maildir", "mbox", "sqlite"], default="maildir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per server; the best counts")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="mbs", dir="/tmp"))  # short: Dovecot's sockets live under it
    work = Path(tempfile.mkdtemp(prefix="mbserve-", dir=args.dir))
    server = Dovecot()
    serve: subprocess.Popen | None = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        server.start(root, tls=False)
        account = server.add_user("bench")
        seed(server, account, args.messages, args.seed)
        server.doveadm("force-resync", "-u", account.user, "*")
        warm = fetch(server.imap_port, account.user, account.password, False)
        log(f"seeded and warmed Dovecot: {warm['messages']} messages, {warm['bytes'] / 1e6:.0f} MB", args.quiet)

        archive = {"maildir": f"maildir:{work}/archive", "mbox": f"mbox:{work}/archive",
                   "sqlite": f"{work}/archive.sqlite"}[args.store]
        env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mailbackup", "backup", f"imap://bench@127.0.0.1:{server.imap_port}",
                        archive, "--no-tls", "-q", "--no-index"], env=env, check=True)
        log(f"backed up into {archive} in {time.perf_counter() - t0:.0f} s", args.quiet)

        port = free_port()
        password_file = work / "pw"
        password_file.write_text("serve-bench\n")
        serve = subprocess.Popen([sys.executable, "-m", "mailbackup", "serve", archive, "--imap", f"127.0.0.1:{port}",
                                  "--user", "bench", "--password-file", str(password_file)],
                                 stderr=subprocess.PIPE, text=True)
        assert serve.stderr is not None
        if "serving" not in serve.stderr.readline():
            raise RuntimeError("mailbackup serve did not start")

        fetch(port, "bench", "serve-bench", False)  # warm: page cache and catalog, as Dovecot had
        serve_rss_warm = rss_mb(serve.pid, "VmRSS")
        # Alternating runs, best of --repeat each: the machine is shared, and a burst of someone
        # else's work should not decide the ratio.
        dovecot_runs, served_runs = [], []
        for _ in range(args.repeat):
            dovecot_runs.append(fetch(server.imap_port, account.user, account.password, True))
            served_runs.append(fetch(port, "bench", "serve-bench", True))
        dovecot = min(dovecot_runs, key=lambda r: r["seconds"])
        served = min(served_runs, key=lambda r: r["seconds"])
        log("runs (s): dovecot " + " ".join(f"{r['seconds']:.2f}" for r in dovecot_runs)
            + ", serve " + " ".join(f"{r['seconds']:.2f}" for r in served_runs), args.quiet)
        serve_peak = rss_mb(serve.pid, "VmHWM")
        for name, result in (("dovecot", dovecot), ("serve", served)):
            if result["messages"] != args.messages:
                raise RuntimeError(f"{name} delivered {result['messages']} messages, expected {args.messages}")
        if served["bytes"] != dovecot["bytes"]:
            raise RuntimeError(f"serve delivered {served['bytes']} bytes, Dovecot {dovecot['bytes']}")
        rows = [row("dovecot", dovecot),
                row(f"serve ({args.store})", served, {"serve_rss_after_warmup_mb": round(serve_rss_warm, 1),
                                                      "serve_peak_rss_mb": round(serve_peak, 1)})]
        ratio = rows[1]["msgs_per_s"] / rows[0]["msgs_per_s"]
        report = {"messages": args.messages, "bytes": served["bytes"], "store": args.store, "results": rows,
                  "serve_vs_dovecot": round(ratio, 2), "target": TARGET, "met": ratio >= TARGET}
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{'contender':<18} {'msgs':>7} {'s':>7} {'msgs/s':>8} {'MB/s':>7} {'client RSS':>10}")
            for r in rows:
                print(f"{r['contender']:<18} {r['messages']:>7} {r['seconds']:>7} {r['msgs_per_s']:>8} {r['mb_per_s']:>7} "
                      f"{r['client_peak_rss_mb']:>9}M")
            print(f"serve process RSS: {serve_rss_warm:.0f} MB after the warm-up pass, peak {serve_peak:.0f} MB")
            print(f"serve vs Dovecot: {ratio:.2f}x msgs/s (target >= {TARGET}x): {'met' if ratio >= TARGET else 'NOT met'}")
        return 0 if ratio >= TARGET else 1
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(20)
            except subprocess.TimeoutExpired:
                serve.kill()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
