"""Many accounts: the job queue with 1, 2 and 4 workers against `backup --all --jobs N` and a shell loop.

    python benchmarks/queue_accounts.py [--accounts K] [--min 100] [--max 500] [--workers 1,2,4]
                                        [--jobs 1,2,4] [--no-index] [--dir /tmp] [--seed S] [--json]

Starts a private Dovecot (plain IMAP on 127.0.0.1) and a throwaway PostgreSQL for the
queue, seeds K accounts with 100-500 generated messages each (the size mix of
imap_backup.py: mostly 2-20 KB, ~3 % with a big attachment), reads every folder once
untimed so Dovecot's indexes exist, then times, in the same run, each contender
backing up every account into a fresh SQLite archive per account:

  loop        a shell loop over `mailbackup backup --account NAME` (imapsync's FAQ way)
  jobs N      `mailbackup backup --all --jobs N` (processes on one machine)
  queue N     N `mailbackup worker` processes (already started and idle, as in production)
              draining a queue that `mailbackup enqueue --all` filled; wall time from
              starting the enqueue command until every account has a finished run; "jobs s"
              is the first job's start to the last job's end in the runs table

With --profile, each queue worker runs under benchmarks/phases.py, which sums the wall
seconds its jobs spend in IMAP, S3 and PostgreSQL calls: where the time goes.

With --shared, every contender writes all accounts into one PostgreSQL archive (a fresh
database each) whose message bytes go to a bucket of `rclone serve s3` (issue 11's setup).

Each archive's message count is checked afterwards, so a broken run cannot post a fast
time. Peak RSS is per process (GNU time; for loop and jobs, the largest process).
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
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

from tests.servers.dovecot import Account, Dovecot  # noqa: E402
from tests.servers.postgres import Postgres  # noqa: E402

TIME = "/usr/bin/time"
FOLDERS = [("INBOX", 0.6), ("Sent", 0.2), ("Archive", 0.2)]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def mailbackup(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailbackup", *args]


def rss_of(report: Path) -> float:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text(errors="replace"))
    return int(match.group(1)) / 1024 if match else 0.0


def timed(cmd: list[str], report: Path) -> tuple[float, float, int]:
    """Run CMD under GNU time; (wall seconds, peak RSS MB, exit code)."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run([TIME, "-v", "-o", str(report), *cmd], check=False, capture_output=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        say(proc.stderr.decode(errors="replace")[-2000:])
    return seconds, rss_of(report), proc.returncode


def seed(dovecot: Dovecot, count: int, low: int, high: int, seed_value: int) -> dict[str, tuple[Account, int]]:
    factory = MessageFactory(seed_value)
    rng = factory.rng
    accounts = {}
    for n in range(count):
        account = dovecot.add_user()
        total = rng.randint(low, high)
        for folder, share in FOLDERS:
            many = round(total * share) if folder != "Archive" else total - sum(round(total * s) for f, s in FOLDERS[:-1])
            dovecot.seed_maildir(account, folder, (factory.make(i, folder) for i in range(many)))
        with dovecot.client(account) as imap:  # untimed: Dovecot builds its index once
            for folder, _ in FOLDERS:
                imap.select_folder(folder, readonly=True)
                uids = imap.search("ALL")
                for start in range(0, len(uids), 500):
                    imap.fetch(uids[start:start + 500], ["BODY.PEEK[]"])
        accounts[f"a{n:03d}"] = (account, total)
    return accounts


def write_config(path: Path, accounts: dict[str, tuple[Account, int]], archives: Path, index: bool,
                 shared: tuple[str, str] | None = None) -> Path:
    """shared=(database URL, s3://bucket/prefix): one archive for all, bytes in the bucket."""
    lines = ["[defaults]", "no_tls = true", f"index = {'true' if index else 'false'}"]
    if shared:
        lines += [f'archive = "{shared[0]}"', f'blobs = "{shared[1]}"']
    lines.append("")
    for name, (account, _) in accounts.items():
        secret = archives.parent / f"{name}.pw"
        secret.write_text(account.password + "\n")
        lines += [f"[accounts.{name}]", f'source = "{account.url("imap")}"', f'password_file = "{secret}"', ""]
        if not shared:
            lines.insert(-1, f'archive = "{archives / (name + ".sqlite")}"')
    path.write_text("\n".join(lines))
    return path


def stored(archives: Path, accounts: dict[str, tuple[Account, int]], shared: str | None = None) -> bool:
    """Every archive holds exactly its account's messages."""
    if shared:
        import sqlalchemy as sa

        engine = sa.create_engine(shared)
        with engine.connect() as conn:
            counts = dict(conn.execute(sa.text(
                "SELECT a.name, count(*) FROM messages m JOIN folders f ON f.id = m.folder_id "
                "JOIN accounts a ON a.id = f.account_id GROUP BY a.name")).all())
        engine.dispose()
        return all(counts.get(f"{account.user}@{account.host}") == total for account, total in accounts.values())
    for name, (_, total) in accounts.items():
        with sqlite3.connect(archives / f"{name}.sqlite") as conn:
            if conn.execute("SELECT count(*) FROM messages").fetchone()[0] != total:
                return False
    return True


def run_queue(workers: int, config: Path, queue_url: str, work: Path, accounts: int,
              profile: Path | None = None) -> tuple[float, float, list[float], bool]:
    """Start N idle workers, enqueue every account, time until every account has a finished run."""
    import psycopg

    info = queue_url.replace("postgresql+psycopg://", "postgresql://")
    procs = []
    for n in range(workers):
        report = work / f"worker{n}.time"
        launch = [sys.executable, str(HERE / "phases.py"), str(profile)] if profile else mailbackup()
        procs.append((subprocess.Popen([TIME, "-v", "-o", str(report), *launch,
                                        "worker", "--queue", queue_url, "--config", str(config), "-q"], cwd=REPO), report))
    time.sleep(3)  # the workers are up and idle, as in production
    os.sync()
    start = time.perf_counter()
    subprocess.run(mailbackup("enqueue", "--queue", queue_url, "--config", str(config), "--all", "-q"), check=True, cwd=REPO)
    ok = False
    with psycopg.connect(info, autocommit=True) as conn:
        while True:
            done = conn.execute("SELECT count(*), count(*) FILTER (WHERE status = 'ok') FROM mailbackup_runs"
                                " WHERE status <> 'running'").fetchone()
            if done and done[0] >= accounts:
                ok = done[1] == accounts
                break
            time.sleep(0.05)
        row = conn.execute("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM mailbackup_runs").fetchone()
    seconds = time.perf_counter() - start
    for proc, _ in procs:  # SIGTERM the worker, not GNU time: time then writes its report
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
    for proc, _ in procs:
        proc.wait(timeout=60)
    span = float(row[0]) if row and row[0] is not None else seconds
    return seconds, span, [rss_of(report) for _, report in procs], ok


def phases(path: Path) -> dict[str, float]:
    """The per-phase seconds phases.py wrote, summed over the workers (one line each)."""
    sums = {"imap": 0.0, "s3": 0.0, "pg": 0.0, "jobs": 0.0}
    if path.exists():
        for line in path.read_text().splitlines():
            for key, value in json.loads(line)["seconds"].items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: round(value, 2) for key, value in sums.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--min", type=int, default=100)
    parser.add_argument("--max", type=int, default=500)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--jobs", default="1,2,4")
    parser.add_argument("--no-index", action="store_true", help="index = false in the config (no search index)")
    parser.add_argument("--no-loop", action="store_true", help="skip the shell loop")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shared", action="store_true", help="one PostgreSQL archive, blobs in rclone's S3")
    parser.add_argument("--profile", action="store_true", help="time the queue workers' IMAP, S3 and PostgreSQL calls")
    args = parser.parse_args()
    s3 = None

    root = Path(tempfile.mkdtemp(prefix="mbq-", dir=args.dir))
    dovecot, postgres = Dovecot(), Postgres()
    results = []
    try:
        dovecot.start(tempfile.mkdtemp(prefix="mbqd", dir="/tmp"), tls=False)
        postgres.start()
        if args.shared:
            from tests.servers.s3 import S3Server

            (root / "s3").mkdir()
            s3 = S3Server(root / "s3").start()
            os.environ.update(s3.env)  # the contenders find the bucket the AWS way
        say(f"seeding {args.accounts} accounts of {args.min}-{args.max} messages ...")
        accounts = seed(dovecot, args.accounts, args.min, args.max, args.seed)
        total = sum(n for _, n in accounts.values())
        size = sum(p.stat().st_size for p in dovecot.mail_root.rglob("*") if p.is_file() and "/cur/" in str(p))
        say(f"{total} messages, {size / 1e6:.0f} MB")

        contenders: list[tuple[str, int]] = []
        if not args.no_loop:
            contenders.append(("loop", 1))
        contenders += [("jobs", int(n)) for n in args.jobs.split(",") if n]
        contenders += [("queue", int(n)) for n in args.workers.split(",") if n]
        for number, (kind, n) in enumerate(contenders):
            label = kind if kind == "loop" else f"{kind} {n}"
            work = root / f"c{number}"
            archives = work / "archives"
            archives.mkdir(parents=True)
            shared = None
            if s3 is not None:
                database = postgres.create_database(f"mbqa{number}")
                s3.bucket(f"mbq{number}")
                shared = (database, f"s3://mbq{number}/mail")
            config = write_config(work / "config.toml", accounts, archives, not args.no_index, shared)
            say(f"{label} ...")
            if kind == "loop":
                loop = " ".join(f"{sys.executable} -m mailbackup backup --config {config} --account {a} -q || exit 1;"
                                for a in accounts)
                seconds, rss, code = timed(["bash", "-c", loop], work / "time")
                rss_each, ok = [rss], code == 0
            elif kind == "jobs":
                seconds, rss, code = timed(mailbackup("backup", "--config", str(config), "--all", "--jobs", str(n), "-q"),
                                           work / "time")
                rss_each, ok = [rss], code == 0
            else:
                queue_url = postgres.create_database(f"mbq{number}")
                profile = work / "phases.json" if args.profile else None
                seconds, span, rss_each, ok = run_queue(n, config, queue_url, work, len(accounts), profile)
            ok = ok and stored(archives, accounts, shared[0] if shared else None)
            if kind != "queue":
                span = seconds
            results.append({"contender": label, "processes": n, "seconds": round(seconds, 2), "jobs_span": round(span, 2),
                            "msgs_per_s": round(total / seconds), "msgs_per_s_per_process": round(total / seconds / n),
                            "peak_rss_mb": [round(r, 1) for r in rss_each], "ok": ok})
            if kind == "queue" and args.profile:
                results[-1]["phases"] = phases(work / "phases.json")
            say(f"  {seconds:.1f} s ({span:.1f} s first job start to last end), {total / seconds:.0f} msgs/s, "
                f"peak RSS {max(rss_each):.0f} MB, {'ok' if ok else 'WRONG'}")
    finally:
        dovecot.stop()
        postgres.stop()
        if s3 is not None:
            s3.stop()
        subprocess.run(["rm", "-rf", str(root), str(dovecot.directory or "")], check=False)

    if args.json:
        print(json.dumps({"accounts": args.accounts, "messages": total, "bytes": size, "results": results}))
    else:
        print(f"{args.accounts} accounts, {total} messages, {size / 1e6:.0f} MB, {os.cpu_count()} CPUs")
        print(f"{'contender':<10} {'wall s':>7} {'jobs s':>7} {'msgs/s':>7} {'per proc':>8}  peak RSS MB (per process)  ok")
        for r in results:
            rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"])
            print(f"{r['contender']:<10} {r['seconds']:>7.1f} {r['jobs_span']:>7.1f} {r['msgs_per_s']:>7} "
                  f"{r['msgs_per_s_per_process']:>8}  "
                  f"{rss:<25} {'yes' if r['ok'] else 'NO'}")
        profiled = [r for r in results if "phases" in r]
        if profiled:
            print("\nwhere a worker's time goes (seconds summed over the workers; IMAP overlaps the rest: the next batch is "
                  "fetched while this one is stored)")
            print(f"{'contender':<10} {'jobs s':>7} {'IMAP s':>7} {'S3 s':>7} {'PG s':>7} {'rest s':>7}  "
                  f"ms/msg: IMAP  S3   PG   rest")
            for r in profiled:
                p = r["phases"]
                rest = max(0.0, p["jobs"] - p["s3"] - p["pg"])
                each = [1000 * x / total for x in (p["imap"], p["s3"], p["pg"], rest)]
                print(f"{r['contender']:<10} {p['jobs']:>7.1f} {p['imap']:>7.1f} {p['s3']:>7.1f} {p['pg']:>7.1f} {rest:>7.1f}  "
                      f"        {each[0]:.2f} {each[1]:.2f} {each[2]:.2f} {each[3]:.2f}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
