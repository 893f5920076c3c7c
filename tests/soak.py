"""Fault soak: cut the line at random byte offsets, and kill -9 at random moments.

    python tests/soak.py --points 52 --kills 50 --seed 1

Against a private Dovecot and an aiosmtpd Controller on 127.0.0.1, each cut point
runs the real CLI through a `FaultProxy` that drops the line once, at a random
offset, during one of: IMAP FETCH (backup), POP3 RETR (backup), IMAP APPEND
(restore), SMTP DATA (restore to SMTP). The run must either reconnect and finish
(exit 0) or stop with exit 1 and a one-line message. A rerun without the cut must
then finish, and the archive or target must hold every source message exactly
once, by SHA-256 multiset. Each kill point starts a backup (each store), an IMAP
restore or a migrate, SIGKILLs it after a random delay, reruns it, compares the
same way and runs `mailbackup verify` on the archive.

Prints a table per kind; exits 1 on any lost or duplicated message or any run
that neither finished nor stopped cleanly. `run_soak()` is the same as a function.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

from aiosmtpd.controller import Controller  # noqa: E402
from proxy import FaultProxy  # noqa: E402
from servers.dovecot import Account, Dovecot, free_port  # noqa: E402

from tests.archive_view import archived  # noqa: E402

CUT_KINDS = ("imap-fetch", "pop3-retr", "imap-append", "smtp-data")
KILL_KINDS = ("backup-maildir", "backup-mbox", "backup-sqlite", "restore-imap", "migrate")
STORES = ("maildir", "mbox", "sqlite")
RUN_TIMEOUT = 120  # a run that takes longer than this is a hang


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def message(i: int, size: int, tag: str) -> bytes:
    # Every fifth message has no Message-ID, so a resumed restore must match it by hash.
    msgid = b"" if i % 5 == 0 else b"Message-ID: <%d.%s@soak>\r\n" % (i, tag.encode())
    body = (b"%s line %d of a soak message\r\n" % (tag.encode(), i)) * max(1, size // 32)
    return b"From: s%d@example.org\r\nSubject: %s %d\r\n%s\r\n%s" % (i, tag.encode(), i, msgid, body)


@dataclass
class Row:
    kind: str
    tried: int = 0
    finished: int = 0  # the faulted run itself exited 0 (it retried, or finished before the kill)
    stopped: int = 0  # the faulted run exited 1 with a one-line message (or was killed)
    lost: int = 0
    duplicated: int = 0
    bad: list[str] = field(default_factory=list)  # hangs, tracebacks, wrong exit codes, verify failures


@dataclass
class Smtp:
    received: dict[str, list[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.setdefault(rcpt, []).append(envelope.original_content)
        return "250 2.0.0 queued"


def compare(want: list[bytes], got: list[bytes]) -> tuple[int, int]:
    """(lost, duplicated) between two SHA-256 multisets."""
    want_c, got_c = Counter(map(sha, want)), Counter(map(sha, got))
    return sum((want_c - got_c).values()), sum((got_c - want_c).values())


def archive_bodies(url: str) -> list[bytes]:
    return [m.raw for messages in archived(url).values() for m in messages]


class Soak:
    def __init__(self, work: Path, seed: int, log: Callable[[str], None]) -> None:
        self.work = work
        self.random = random.Random(seed)
        self.log = log
        self.dovecot = Dovecot().start(work / "dc", tls=False)
        self.smtp = Smtp()
        self.smtp_port = free_port()
        self.controller = Controller(self.smtp, hostname="127.0.0.1", port=self.smtp_port)
        self.controller.start()
        self.counter = 0

    def close(self) -> None:
        self.controller.stop()
        self.dovecot.stop()

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{name}{self.counter}"

    def archive_url(self, store: str) -> str:
        path = self.fresh(store)
        return {"maildir": f"maildir:{path}", "mbox": f"mbox:{path}", "sqlite": f"{path}.sqlite"}[store]

    # -- the CLI -----------------------------------------------------------
    def cli(self, *args: str, password: str = "", target_password: str = "") -> subprocess.Popen[str]:
        env = {**os.environ, "MAILBACKUP_PASSWORD": password, "MAILBACKUP_TARGET_PASSWORD": target_password}
        return subprocess.Popen(
            [sys.executable, "-m", "mailbackup", *args], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def run(self, *args: str, **passwords: str) -> tuple[int | None, str]:
        """(exit code or None on a hang, stderr)."""
        process = self.cli(*args, **passwords)
        try:
            _, err = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            return None, err
        return process.returncode, err

    # -- sources -------------------------------------------------------------
    def seed_imap(self, count: int, folders: tuple[str, ...], tag: str, sizes: tuple[int, int]) -> Account:
        account = self.dovecot.add_user()
        for f, folder in enumerate(folders):
            raws = [message(i, self.random.randint(*sizes), f"{tag}{f}") for i in range(count)]
            raws.append(raws[1])  # the same bytes twice in one folder: both copies count
            self.dovecot.seed_maildir(account, folder, ((raw, "S" if i % 2 else "", 1.6e9 + i) for i, raw in enumerate(raws)))
        return account

    def server_bodies(self, account: Account) -> list[bytes]:
        return [raw for bodies in self.dovecot.folder_bodies(account).values() for raw in bodies]

    def backup_args(self, account: Account, scheme: str, port: int, url: str) -> list[str]:
        return ["backup", f"{scheme}://{account.user}@127.0.0.1:{port}", url, "--no-tls", "-q", "--batch-messages", "5"]

    # -- cut points --------------------------------------------------------
    def cut_setup(self) -> dict[str, Callable[[int, int | None], tuple[str, int | None, str, list[bytes], list[bytes]]]]:
        """Per kind: a function (point, cut_at) -> (outcome, exit code, stderr, wanted, got)."""
        imap_source = self.seed_imap(24, ("INBOX", "Archive"), "cut", (800, 12000))
        pop_source = self.seed_imap(30, ("INBOX",), "pop", (800, 12000))
        want_imap = self.server_bodies(imap_source)
        want_pop = self.server_bodies(pop_source)
        base = self.archive_url("sqlite")
        code, err = self.run(*self.backup_args(imap_source, "imap", self.dovecot.imap_port, base), password=imap_source.password)
        assert code == 0, err
        want_archive = archive_bodies(base)

        def backup(source: Account, scheme: str, want: list[bytes]) -> Callable[[int, int | None], tuple]:  # type: ignore[type-arg]
            port = self.dovecot.imap_port if scheme == "imap" else self.dovecot.pop3_port

            def point(n: int, cut_at: int | None) -> tuple:  # type: ignore[type-arg]
                url = self.archive_url(STORES[n % 3])
                retries = self.random.choice(("0", "2"))
                with FaultProxy(port, cut_at, "down") as proxy:
                    args = self.backup_args(source, scheme, proxy.port, url)
                    code, err = self.run(*args, "--retries", retries, password=source.password)
                    again, err2 = self.run(*args, password=source.password)
                return proxy, code, err, again, err2, want, archive_bodies(url)

            return point

        def restore_imap(n: int, cut_at: int | None) -> tuple:  # type: ignore[type-arg]
            target = self.dovecot.add_user()
            with FaultProxy(self.dovecot.imap_port, cut_at, "up") as proxy:
                args = ["restore", base, f"imap://{target.user}@127.0.0.1:{proxy.port}", "--no-tls", "-q", "--batch-messages", "5"]
                code, err = self.run(*args, password=target.password)
                again, err2 = self.run(*args, password=target.password)
            return proxy, code, err, again, err2, want_archive, self.server_bodies(target)

        def restore_smtp(n: int, cut_at: int | None) -> tuple:  # type: ignore[type-arg]
            rcpt = f"r{self.fresh('r').name}@example.net"
            with FaultProxy(self.smtp_port, cut_at, "up") as proxy:
                args = ["restore", base, f"smtp://soak@example.org@127.0.0.1:{proxy.port}", "--no-tls", "-q", "--to", rcpt]
                code, err = self.run(*args, password="unused")
                again, err2 = self.run(*args, password="unused")
            with self.smtp.lock:
                got = list(self.smtp.received.get(rcpt, []))
            return proxy, code, err, again, err2, want_archive, got

        return {
            "imap-fetch": backup(imap_source, "imap", want_imap),
            "pop3-retr": backup(pop_source, "pop3", want_pop),
            "imap-append": restore_imap,
            "smtp-data": restore_smtp,
        }

    def cut_points(self, points: int) -> list[Row]:
        kinds = self.cut_setup()
        rows = {kind: Row(kind) for kind in CUT_KINDS}
        # A clean run through the proxy measures the first connection's bytes in the cut direction.
        lengths = {}
        for kind, point in kinds.items():
            proxy = point(0, None)[0]
            lengths[kind] = proxy.connections[0].up if kind in ("imap-append", "smtp-data") else proxy.connections[0].down
        for n in range(points):
            kind = CUT_KINDS[n % len(CUT_KINDS)]
            row = rows[kind]
            cut_at = self.random.randint(1, lengths[kind] - 1)
            proxy, code, err, again, err2, want, got = kinds[kind](n, cut_at)
            row.tried += 1
            note = f"{kind} cut at {cut_at}/{lengths[kind]}"
            if proxy.cuts != 1:
                row.bad.append(f"{note}: the proxy cut {proxy.cuts} times")
            self.judge(row, note, code, err)
            if again != 0:
                row.bad.append(f"{note}: the rerun exited {again}: {err2.strip()[-300:]}")
            lost, duplicated = compare(want, got)
            row.lost += lost
            row.duplicated += duplicated
            self.log(f"{note}: exit {code}, rerun {again}, lost {lost}, duplicated {duplicated}")
        return list(rows.values())

    @staticmethod
    def judge(row: Row, note: str, code: int | None, err: str) -> None:
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 0:
            row.finished += 1
        elif code == 1 and len(lines) == 1 and lines[0].startswith("mailbackup: error:") and "Traceback" not in err:
            row.stopped += 1
        else:
            row.bad.append(f"{note}: exit {code}, stderr {err.strip()[-400:]!r}")

    # -- kill points ---------------------------------------------------------
    def kill_points(self, points: int) -> list[Row]:
        source = self.seed_imap(150, ("INBOX", "Lists"), "kill", (1500, 6000))
        want = self.server_bodies(source)
        archive = self.archive_url("maildir")
        code, err = self.run(*self.backup_args(source, "imap", self.dovecot.imap_port, archive), password=source.password)
        assert code == 0, err
        want_archive = archive_bodies(archive)
        assert compare(want, want_archive) == (0, 0)

        def plan(kind: str) -> tuple[list[str], dict[str, str], Callable[[], list[bytes]], list[bytes], str | None]:
            """(CLI args, passwords, what ended up there, what should be there, archive to verify)."""
            if kind.startswith("backup-"):
                url = self.archive_url(kind.partition("-")[2])
                args = self.backup_args(source, "imap", self.dovecot.imap_port, url)
                return args, {"password": source.password}, lambda: archive_bodies(url), want, url
            target = self.dovecot.add_user()
            if kind == "restore-imap":
                args = ["restore", archive, target.url("imap"), "--no-tls", "-q", "--batch-messages", "10"]
                return args, {"password": target.password}, lambda: self.server_bodies(target), want_archive, archive
            state = self.fresh("state")
            args = ["migrate", source.url("imap"), target.url("imap"), "--no-tls", "--target-no-tls", "-q", "--state", f"{state}.sqlite"]
            passwords = {"password": source.password, "target_password": target.password}
            return args, passwords, lambda: self.server_bodies(target), want, None

        # How long a clean run of each kind takes bounds the random kill moment.
        durations = {}
        for kind in KILL_KINDS:
            args, passwords, _, _, _ = plan(kind)
            started = time.monotonic()
            code, err = self.run(*args, **passwords)
            assert code == 0, err
            durations[kind] = time.monotonic() - started
        rows = {kind: Row(kind) for kind in KILL_KINDS}
        for n in range(points):
            kind = KILL_KINDS[n % len(KILL_KINDS)]
            row = rows[kind]
            args, passwords, landed, expected, verify = plan(kind)
            delay = self.random.uniform(0.05, durations[kind])
            process = self.cli(*args, **passwords)
            time.sleep(delay)
            killed = process.poll() is None
            process.send_signal(signal.SIGKILL)
            _, err = process.communicate()
            row.tried += 1
            note = f"{kind} kill at {delay:.2f}/{durations[kind]:.2f} s"
            if killed:
                row.stopped += 1
            else:
                self.judge(row, note, process.returncode, err)
            again, err2 = self.run(*args, **passwords)
            if again != 0:
                row.bad.append(f"{note}: the rerun exited {again}: {err2.strip()[-300:]}")
            lost, duplicated = compare(expected, landed())
            row.lost += lost
            row.duplicated += duplicated
            if verify is not None:
                checked, err3 = self.run("verify", verify, "-q")
                if checked != 0:
                    row.bad.append(f"{note}: verify exited {checked}: {err3.strip()[-300:]}")
            self.log(f"{note}: {'killed' if killed else 'done first'}, rerun {again}, lost {lost}, duplicated {duplicated}")
        return list(rows.values())


def table(title: str, rows: list[Row], finished: str, stopped: str) -> str:
    head = f"{title:<16}{'points':>7}{finished:>18}{stopped:>16}{'lost':>6}{'dup':>5}{'bad':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kind:<16}{r.tried:>7}{r.finished:>18}{r.stopped:>16}{r.lost:>6}{r.duplicated:>5}{len(r.bad):>5}")
    total = Row("total", *(sum(getattr(r, k) for r in rows) for k in ("tried", "finished", "stopped", "lost", "duplicated")))
    lines.append(f"{total.kind:<16}{total.tried:>7}{total.finished:>18}{total.stopped:>16}{total.lost:>6}{total.duplicated:>5}"
                 f"{sum(len(r.bad) for r in rows):>5}")
    return "\n".join(lines)


def run_soak(points: int, kills: int, seed: int, log: Callable[[str], None] = lambda line: None) -> tuple[list[Row], list[Row]]:
    """(cut rows, kill rows); servers live in a temp dir that is removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="mbsk", dir="/tmp"))  # short: Dovecot's socket paths
    work.chmod(0o755)  # Dovecot's unprivileged auth process must traverse it
    soak = Soak(work, seed, log)
    try:
        cuts = soak.cut_points(points) if points else []
        killed = soak.kill_points(kills) if kills else []
        return cuts, killed
    finally:
        soak.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=52, help="random cut points, spread over the four kinds")
    parser.add_argument("--kills", type=int, default=0, help="random kill -9 points, spread over backup/restore/migrate")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per point")
    parser.add_argument("--json", action="store_true", help="the rows as JSON on stdout")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    started = time.monotonic()
    cuts, kills = run_soak(args.points, args.kills, seed, log=(lambda line: print(line, flush=True)) if args.verbose else (lambda line: None))
    rows = cuts + kills
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
    else:
        print(f"seed {seed}, {time.monotonic() - started:.0f} s")
        if cuts:
            print(table("cut point", cuts, "retried+finished", "exit-1 stops"))
        if kills:
            print(table("kill -9", kills, "finished first", "killed/exit 1"))
        for row in rows:
            for problem in row.bad:
                print(f"PROBLEM {problem}")
    failed = any(r.lost or r.duplicated or r.bad for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
