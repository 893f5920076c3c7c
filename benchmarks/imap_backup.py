"""IMAP backup benchmark: mailbackup against a minimal imaplib client and mbsync.

    python benchmarks/imap_backup.py [--messages N] [--seed S] [--stores maildir,mbox,sqlite]
                                     [--dir /tmp] [--scale] [--json]

Starts a private Dovecot (plain IMAP on 127.0.0.1, no TLS, so TLS cost is out of
the picture), seeds one user with N generated messages straight into Maildir,
lets Dovecot index them once, then times in the same run, against the same
account, each contender writing into a fresh directory under --dir:

  ref-A     imaplib, per folder one UID FETCH 1:* BODY.PEEK[], one file per message
  ref-A2    the same, streamed literal by literal (informational)
  mbsync    isync pulling into a Maildir (its default: fsync per message)
  maildir / mbox / sqlite   ``mailbackup backup`` into that store
  maildir-incr              a second ``mailbackup backup`` into the maildir (nothing new)

Each contender runs as a subprocess under ``/usr/bin/time -v`` (peak RSS).
Outputs are counted afterwards (N files / N messages) so a broken run cannot
post a fast time.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.header import Header
from email.utils import format_datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from tests.servers.dovecot import Account, Dovecot  # noqa: E402

TIME = "/usr/bin/time"
REF_A = "ref-A imaplib files"
FOLDERS = [  # (name, share of the messages)
    ("INBOX", 0.45),
    ("Sent", 0.15),
    ("Archive/2023", 0.17),
    ("Archive/2024", 0.17),
    ("Entwürfe", 0.06),
]
TARGETS = {  # issue 9: "Faster and leaner, measured in the same run"
    "maildir_vs_mbsync": 1.6,
    "maildir_vs_ref_a": 0.7,
    "sqlite_vs_mbsync": 3.0,  # with the search index on
    "peak_rss_mb_max": 80.0,
}


# -- message generation -------------------------------------------------------

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no will more can out other into only some could time these two may then do first "
         "any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those "
         "meeting report budget invoice quarterly deadline project review attached please "
         "thanks regards schedule update proposal contract server backup archive folder "
         "Grüße Straße Änderung für über Büro naïve café résumé").split()


class MessageFactory:
    """Seeded, reproducible messages with a realistic size mix.

    ~97 %: 2-20 KB text/plain or multipart/alternative (text + html).
    ~3 %: plus one base64 attachment of 100 KB - 2 MB (log-uniform, encoded size).
    The mean is ~29 KB per message: 20,000 messages are about 590 MB.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        words = [self.rng.choice(WORDS) for _ in range(200_000)]
        lines, line = [], []
        for word in words:
            line.append(word)
            if sum(map(len, line)) + len(line) > 66 + self.rng.randrange(10):
                lines.append(" ".join(line))
                line = []
        self.lines = lines
        self.people = [f"{a}.{b}" for a in ("anna", "bob", "chen", "dora", "emil", "fatima", "gus",
                                            "hana", "ivo", "jörg", "kim", "lea")
                       for b in ("smith", "meier", "ng", "rossi", "kowalski", "dupont")]
        self.start = datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()
        self.span = 2 * 365 * 86400

    def _text(self, size: int) -> str:
        out, total = [], 0
        i = self.rng.randrange(len(self.lines))
        while total < size:
            line = self.lines[i % len(self.lines)]
            out.append(line)
            total += len(line) + 1
            i += 1
            if self.rng.random() < 0.08:
                out.append("")
        return "\n".join(out) + "\n"

    def make(self, index: int, folder: str) -> tuple[bytes, str, float]:
        rng = self.rng
        mtime = self.start + rng.random() * self.span
        date = format_datetime(datetime.fromtimestamp(mtime, timezone.utc))
        sender, rcpt = rng.sample(self.people, 2)
        subject = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))
        if not subject.isascii():
            subject = Header(subject, "utf-8").encode()
        body_size = int(2048 * (10 ** rng.random()))  # 2-20 KB, log-uniform
        boundary = f"=_b{index}_{rng.getrandbits(48):x}"
        head = (f"Return-Path: <{sender}@example.org>\n"
                f"Received: from mx.example.org by mail.example.net with ESMTPS id {rng.getrandbits(64):x};\n"
                f"\t{date}\n"
                f"Message-ID: <{index}.{rng.getrandbits(64):x}@bench.mailbackup>\n"
                f"Date: {date}\n"
                f"From: {sender.title()} <{sender}@example.org>\n"
                f"To: {rcpt.title()} <{rcpt}@example.net>\n"
                f"Subject: {subject}\n"
                f"MIME-Version: 1.0\n")
        attach = rng.random() < 0.03
        alternative = rng.random() < 0.5
        text = self._text(body_size if not alternative else body_size * 2 // 5)
        if alternative:
            html = "<html><body>\n" + "".join(
                f"<p>{para}</p>\n" for para in self._text(body_size * 3 // 5 - 40).split("\n\n")) \
                + "</body></html>\n"
            inner = (f"Content-Type: multipart/alternative; boundary=\"{boundary}a\"\n\n"
                     f"--{boundary}a\nContent-Type: text/plain; charset=utf-8\n"
                     f"Content-Transfer-Encoding: 8bit\n\n{text}\n"
                     f"--{boundary}a\nContent-Type: text/html; charset=utf-8\n"
                     f"Content-Transfer-Encoding: 8bit\n\n{html}\n--{boundary}a--\n")
        else:
            inner = ("Content-Type: text/plain; charset=utf-8\n"
                     f"Content-Transfer-Encoding: 8bit\n\n{text}")
        if attach:
            encoded = int(100_000 * (20 ** rng.random()))  # 100 KB - 2 MB, log-uniform
            payload = base64.encodebytes(rng.randbytes(encoded * 3 // 4)).decode("ascii")
            message = (head + f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\n"
                       f"This is a multi-part message in MIME format.\n\n--{boundary}\n{inner}\n"
                       f"--{boundary}\nContent-Type: application/octet-stream; name=\"file{index}.bin\"\n"
                       f"Content-Disposition: attachment; filename=\"file{index}.bin\"\n"
                       f"Content-Transfer-Encoding: base64\n\n{payload}--{boundary}--\n")
        else:
            message = head + inner
        roll = rng.random()
        flags = "S" if roll < 0.7 else ("FS" if roll < 0.8 else ("RS" if roll < 0.9 else ""))
        if folder == "Sent":
            flags = "S"
        return message.encode("utf-8"), flags, mtime


def seed(server: Dovecot, account: Account, n: int, seed_value: int) -> dict[str, int]:
    """Write N messages into the account's Maildir; returns folder -> count."""
    factory = MessageFactory(seed_value)
    counts, left = {}, n
    for i, (folder, share) in enumerate(FOLDERS):
        counts[folder] = left if i == len(FOLDERS) - 1 else min(left, round(n * share))
        left -= counts[folder]
    index = 0
    for folder, count in counts.items():
        def messages(start: int = index, count: int = count, folder: str = folder):
            for k in range(start, start + count):
                yield factory.make(k, folder)
        server.seed_maildir(account, folder, messages())
        index += count
    return counts


# -- running contenders ---------------------------------------------------------

@dataclass
class Result:
    name: str
    seconds: float = 0.0
    messages: int = 0
    bytes: int = 0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0  # Dovecot's processes, while this contender ran
    ok: bool = True
    error: str = ""
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        mps = self.messages / self.seconds if self.seconds and self.ok else 0.0
        mbps = self.bytes / 1e6 / self.seconds if self.seconds and self.ok else 0.0
        return {"contender": self.name, "ok": self.ok, "messages": self.messages,
                "seconds": round(self.seconds, 3), "msgs_per_s": round(mps, 1),
                "mb_per_s": round(mbps, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "cpu_s": round(self.cpu_seconds, 2), "server_cpu_s": round(self.server_cpu_seconds, 2),
                # No run on this machine can be shorter: all the CPU both sides spent, on every core.
                "floor_s": round((self.cpu_seconds + self.server_cpu_seconds) / (os.cpu_count() or 1), 2),
                **({"error": self.error} if self.error else {}), **self.extra}


_COMPILED: set[str] = set()


def compiled(env: dict[str, str] | None) -> None:
    """Byte-compile the mailbackup package a contender will import, once per run.

    An installed package comes compiled; an editable checkout under PYTHONDONTWRITEBYTECODE=1
    (this machine's environment) never is, and every start would compile each module it
    loads again (35-55 ms a rerun), which users do not pay.
    """
    for where in [str(REPO), *((env or {}).get("PYTHONPATH", "").split(os.pathsep))]:
        package = Path(where) / "mailbackup"
        if where and where not in _COMPILED and package.is_dir():
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
            _COMPILED.add(where)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run CMD under /usr/bin/time -v; returns (wall seconds, peak RSS MB, process)."""
    compiled(env)
    os.sync()  # don't let the previous contender's dirty pages bill this one
    fd, report = tempfile.mkstemp(prefix="time-", suffix=".txt")
    os.close(fd)
    try:
        start = time.perf_counter()
        # Not in the checkout: `python -m` puts its working directory first on sys.path, where
        # a checkout's own package would shadow --baseline's PYTHONPATH.
        proc = subprocess.run([TIME, "-v", "-o", report, *cmd], env=env, capture_output=True, cwd=tempfile.gettempdir())
        seconds = time.perf_counter() - start
        text = Path(report).read_text(errors="replace")
    finally:
        os.unlink(report)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(match.group(1)) / 1024 if match else 0.0
    # User + system CPU of the command and the children it waited for (the indexer process):
    # steadier than wall time on a shared machine.
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    proc.cpu_seconds = cpu  # type: ignore[attr-defined]
    return seconds, rss, proc


def process_cpu(pid: int) -> float:
    """CPU seconds of pid, of its children alive now and of those it has reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry.name))
    for each in pids:
        try:
            fields = (Path("/proc") / str(each) / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # utime, stime; and for the master cutime, cstime: its imap processes end with their client.
        total += sum(int(v) for v in fields[11:13] + (fields[13:15] if each == pid else []))
    return total / tick


def imap_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "imap" and \
                    int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def count_files(root: Path, maildir: bool) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        if maildir and os.path.basename(dirpath) not in ("cur", "new"):
            continue
        total += sum(1 for f in files if not f.startswith("."))
    return total


def mailbackup_count(archive: str) -> int:
    proc = subprocess.run([sys.executable, "-m", "mailbackup", "ls", archive, "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mailbackup ls failed ({proc.returncode}): {proc.stderr.strip()}")
    return sum(json.loads(line)["messages"] for line in proc.stdout.splitlines() if line.strip())


def mbsync_tls_keyword() -> str:
    out = subprocess.run(["mbsync", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(\d+)\.(\d+)", out)
    version = (int(match.group(1)), int(match.group(2))) if match else (1, 4)
    return "TLSType" if version >= (1, 5) else "SSLType"  # renamed in isync 1.5


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="mbb-", dir="/tmp"))  # short: Unix sockets
        self.work = Path(tempfile.mkdtemp(prefix="mailbackup-bench-", dir=args.dir))
        self.server = Dovecot()
        self.mailbackup = [sys.executable, "-m", "mailbackup"]
        self.results: list[Result] = []
        self.total_bytes = 0
        self.sizes: dict[str, int] = {}  # user -> bytes as served (CRLF)
        self.runs = 0
        self.trash: list[Path] = []

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cleanup(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            for path in self.trash:
                shutil.rmtree(path, ignore_errors=True)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def setup(self, user: str, n: int) -> Account:
        account = self.server.add_user(user)
        t0 = time.perf_counter()
        counts = seed(self.server, account, n, self.args.seed)
        size = sum(p.stat().st_size for p in self.server.maildir(account).rglob("*")
                   if p.is_file() and p.parent.name == "cur")
        self.log(f"seeded {user}: {n} messages, {size / 1e6:.0f} MB on disk (LF), "
                 f"{counts} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.server.doveadm("force-resync", "-u", account.user, "*")
        # One discarding pass with the items the contenders ask for: builds the
        # index/cache and warms the page cache, so nobody pays for it in the timings.
        env = {**os.environ, "IMAP_PASSWORD": account.password}
        warm = json.loads(subprocess.run(
            [sys.executable, str(HERE / "imap_fetch_files.py"), "127.0.0.1", str(self.server.imap_port),
             account.user, "--discard", "UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]"],
            env=env, check=True, capture_output=True, text=True).stdout)
        if warm["messages"] != n:
            raise RuntimeError(f"warm-up fetched {warm['messages']} messages, expected {n}")
        self.sizes[user] = warm["bytes"]
        if user == "bench":
            self.total_bytes = warm["bytes"]
        self.log(f"indexed + warm-up fetch of {warm['bytes'] / 1e6:.0f} MB (CRLF) in "
                 f"{time.perf_counter() - t0:.1f} s")
        return account

    def fresh(self, name: str) -> Path:
        # A new name every time: nothing is deleted while contenders run (see discard_later).
        self.runs += 1
        path = self.work / f"{name}-{self.runs}"
        path.mkdir()
        return path

    def discard_later(self, path: Path) -> None:
        """Outputs go when the benchmark ends, not between contenders. On ext4 without a journal
        (this machine's root) creating a file within about a minute of thousands being deleted
        makes the kernel walk past each freed inode (ext4's recently_deleted): deleting one
        contender's 20,000 files billed the next one about 0.3 ms of system CPU per file."""
        self.trash.append(path)

    def timed(self, cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
        """timed(), and what Dovecot's processes spent meanwhile (for record)."""
        before = process_cpu(self.server.pid)
        measured = timed(cmd, env)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and imap_children(self.server.pid):
            time.sleep(0.05)  # the master reaps the contender's imap process, then its CPU counts
        self.server_cpu = process_cpu(self.server.pid) - before
        return measured

    def record(self, result: Result, expected: int) -> Result:
        result.server_cpu_seconds = getattr(self, "server_cpu", 0.0)
        if result.ok and result.messages != expected:
            result.ok = False
            result.error = (result.error + " " if result.error else "") + \
                f"output holds {result.messages} messages, expected {expected}"
        self.results.append(result)
        state = f"{result.seconds:.1f} s, {result.peak_rss_mb:.0f} MB RSS" if result.ok else f"FAILED: {result.error}"
        self.log(f"{result.name}: {state}")
        return result

    # -- contenders --
    def discard(self, account: Account, n: int) -> Result:
        env = {**os.environ, "IMAP_PASSWORD": account.password}
        seconds, rss, proc = self.timed([sys.executable, str(HERE / "imap_fetch_files.py"), "127.0.0.1",
                                    str(self.server.imap_port), account.user, "--discard"], env)
        r = Result("ref-0 discard", seconds, peak_rss_mb=rss, bytes=self.total_bytes, cpu_seconds=proc.cpu_seconds)
        if proc.returncode != 0:
            r.ok, r.error = False, proc.stderr.decode(errors="replace").strip()[-2000:]
        else:
            r.messages = json.loads(proc.stdout)["messages"]
        return self.record(r, n)

    def ref_a(self, account: Account, n: int, stock: bool = True) -> Result:
        out = self.fresh("ref-a")
        env = {**os.environ, "IMAP_PASSWORD": account.password}
        seconds, rss, proc = self.timed([sys.executable, str(HERE / "imap_fetch_files.py"), "127.0.0.1",
                                    str(self.server.imap_port), account.user, str(out),
                                    *(["--stock"] if stock else [])], env)
        r = Result(REF_A if stock else "ref-A2 imaplib streamed", seconds, peak_rss_mb=rss, cpu_seconds=proc.cpu_seconds)
        if proc.returncode != 0:
            r.ok, r.error = False, proc.stderr.decode(errors="replace").strip()[-2000:]
        else:
            r.bytes = json.loads(proc.stdout)["bytes"]
            r.messages = count_files(out, maildir=False)
        self.record(r, n)
        self.discard_later(out)
        return r

    def mbsync(self, account: Account, n: int) -> Result:
        out = self.fresh("mbsync")
        (out / "mail").mkdir()
        rc = out / "mbsyncrc"
        rc.write_text(
            f"IMAPAccount bench\nHost 127.0.0.1\nPort {self.server.imap_port}\n"
            f"User {account.user}\nPass {account.password}\n{mbsync_tls_keyword()} None\n"
            "AuthMechs LOGIN\n\n"
            f"IMAPStore remote\nAccount bench\n\n"
            f"MaildirStore local\nPath {out}/mail/\nInbox {out}/mail/INBOX\nSubFolders Verbatim\n\n"
            "Channel bench\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\n"
            f"SyncState *\n")
        seconds, rss, proc = self.timed(["mbsync", "-q", "-c", str(rc), "bench"])
        r = Result("ref-B mbsync (fsync)", seconds, peak_rss_mb=rss, bytes=self.total_bytes, cpu_seconds=proc.cpu_seconds)
        if proc.returncode != 0:
            r.ok, r.error = False, (proc.stdout + proc.stderr).decode(errors="replace").strip()[-2000:]
        r.messages = count_files(out / "mail", maildir=True)
        self.record(r, n)
        self.discard_later(out)
        return r

    def archive_spec(self, store: str, out: Path) -> str:
        return {"maildir": f"maildir:{out}", "mbox": f"mbox:{out}",
                "sqlite": str(out / "archive.sqlite")}[store]

    def run_mailbackup(self, name: str, account: Account, archive: str, expected_new: int,
                       expected_total: int, extra: tuple[str, ...] = (), baseline: bool = False) -> Result:
        env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
        if baseline:  # another checkout of mailbackup, e.g. `git worktree add /tmp/base main`
            env["PYTHONPATH"] = self.args.baseline
            name += " (baseline)"
        cmd = [*self.mailbackup, "backup", f"imap://{account.user}@127.0.0.1:{self.server.imap_port}",
               "--no-tls", archive, "--json", "-q", *extra]
        seconds, rss, proc = self.timed(cmd, env)
        r = Result(name, seconds, peak_rss_mb=rss, bytes=self.sizes[account.user] if expected_new else 0,
                   cpu_seconds=proc.cpu_seconds)
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            r.ok = False
            r.error = f"exit {proc.returncode}: {(out + err).strip()[-2000:]}"
        else:
            try:
                summary = json.loads(out.strip().splitlines()[-1])
                r.extra["new"] = summary.get("new")
                if summary.get("new") != expected_new:
                    r.ok, r.error = False, f"summary says {summary.get('new')} new, expected {expected_new}"
            except (ValueError, IndexError):
                r.extra["summary"] = out[-300:]
        try:
            r.messages = mailbackup_count(archive)
        except RuntimeError as exc:
            r.ok, r.error = False, (r.error + " " if r.error else "") + str(exc)
        if expected_new == 0:  # incremental: no bytes moved; report message throughput of the check
            r.extra["archive_messages"] = r.messages
        return self.record(r, expected_total)

    def contenders(self, account: Account, n: int) -> None:
        self.discard(account, n)
        self.ref_a(account, n, stock=True)
        self.ref_a(account, n, stock=False)
        self.mbsync(account, n)
        # With --baseline, each mailbackup contender runs twice, baseline first, back to back.
        for store in self.args.stores:
            for baseline in (True, False) if self.args.baseline else (False,):
                out = self.fresh(store)
                archive = self.archive_spec(store, out)
                self.run_mailbackup(store, account, archive, n, n, baseline=baseline)
                if store == "maildir":
                    self.run_mailbackup("maildir-incr", account, archive, 0, n, baseline=baseline)
                if not self.args.keep:
                    self.discard_later(out)
            for baseline in (True, False) if self.args.baseline else (False,):
                if store in ("maildir", "sqlite"):  # the same without the search index
                    out = self.fresh(store + "-noindex")
                    self.run_mailbackup(f"{store} --no-index", account, self.archive_spec(store, out), n, n,
                                        ("--no-index",), baseline=baseline)
                    self.discard_later(out)

    def scale(self, n: int) -> dict:
        """Peak RSS of mailbackup at N/10 and N messages (second user, same server)."""
        small_n = max(1, n // 10)
        account = self.setup("small", small_n)
        rows = {}
        for store in self.args.stores:
            out = self.fresh(f"{store}-small")
            r = self.run_mailbackup(f"{store} (N={small_n})", account,
                                    self.archive_spec(store, out), small_n, small_n)
            big = next((x for x in self.results if x.name == store), None)
            rows[store] = {"small_n": small_n, "small_rss_mb": round(r.peak_rss_mb, 1),
                           "n": n, "rss_mb": round(big.peak_rss_mb, 1) if big else None,
                           "growth": round(big.peak_rss_mb / r.peak_rss_mb, 2)
                           if big and r.peak_rss_mb else None}
            self.discard_later(out)
        return rows

    def main(self) -> dict:
        n = self.args.messages
        self.server.start(self.root, tls=False)  # the helper chmods it 755
        self.log(f"dovecot pid {self.server.pid} imap=127.0.0.1:{self.server.imap_port} (plain, ssl=no)")
        account = self.setup("bench", n)
        self.contenders(account, n)
        scale = self.scale(n) if self.args.scale else None
        return self.report(n, scale)

    def report(self, n: int, scale: dict | None) -> dict:
        by = {r.name: r for r in self.results}

        def rate(name: str) -> float | None:
            r = by.get(name)
            return r.messages / r.seconds if r and r.ok and r.seconds else None

        def ratio(a: str, b: str) -> float | None:
            x, y = rate(a), rate(b)
            return round(x / y, 2) if x and y else None

        peak = max((r.peak_rss_mb for r in self.results if "(baseline)" not in r.name
                    and (r.name.split()[0] in self.args.stores or r.name == "maildir-incr")), default=None)
        ratios = {
            "maildir_vs_mbsync": ratio("maildir", "ref-B mbsync (fsync)"),
            "maildir_vs_ref_a": ratio("maildir", REF_A),
            "sqlite_vs_mbsync": ratio("sqlite", "ref-B mbsync (fsync)"),
            "maildir_no_index_vs_mbsync": ratio("maildir --no-index", "ref-B mbsync (fsync)"),
            "maildir_no_index_vs_ref_a": ratio("maildir --no-index", REF_A),
            "sqlite_no_index_vs_mbsync": ratio("sqlite --no-index", "ref-B mbsync (fsync)"),
            "mailbackup_peak_rss_mb": round(peak, 1) if peak is not None else None,
        }
        checks = {
            "maildir_vs_mbsync": _ge(ratios["maildir_vs_mbsync"], TARGETS["maildir_vs_mbsync"]),
            "maildir_vs_ref_a": _ge(ratios["maildir_vs_ref_a"], TARGETS["maildir_vs_ref_a"]),
            "sqlite_vs_mbsync": _ge(ratios["sqlite_vs_mbsync"], TARGETS["sqlite_vs_mbsync"]),
            "peak_rss_under_max": None if peak is None else peak < TARGETS["peak_rss_mb_max"],
        }
        return {
            "messages": n, "seed": self.args.seed, "bytes_fetched": self.total_bytes,
            "transport": "plain IMAP on 127.0.0.1 (dovecot ssl=no): TLS cost excluded",
            "filesystem_dir": str(self.work.parent),
            "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip(),
            "mbsync": subprocess.run(["mbsync", "--version"], capture_output=True, text=True).stdout.strip(),
            "results": [r.row() for r in self.results],
            "ratios": ratios, "targets": TARGETS, "meets_targets": checks,
            **({"scale": scale} if scale is not None else {}),
        }


def _ge(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def print_table(report: dict) -> None:
    print(f"\nmailbackup IMAP backup benchmark: {report['messages']} messages, "
          f"{report['bytes_fetched'] / 1e6:.0f} MB as served (CRLF), seed {report['seed']}")
    print(f"transport: {report['transport']}; output under {report['filesystem_dir']}")
    print(f"{report['dovecot']=}, {report['mbsync']=}".replace("report[", "").replace("]=", "=")
          .replace("'", ""))
    head = (f"{'contender':<24} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'MB/s':>7} {'RSS MB':>7} {'CPU s':>7}"
            f" {'srv CPU':>7} {'floor s':>7}")
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        if row["ok"]:
            print(f"{row['contender']:<24} {row['messages']:>8} {row['seconds']:>8.2f} "
                  f"{row['msgs_per_s']:>8.0f} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>7.1f} {row.get('cpu_s', 0):>7.1f}"
                  f" {row.get('server_cpu_s', 0):>7.1f} {row.get('floor_s', 0):>7.2f}")
        else:
            print(f"{row['contender']:<24} {row['messages']:>8} {row['seconds']:>8.2f} "
                  f"{'FAILED':>8} {'':>7} {row['peak_rss_mb']:>7.1f}")
            for line in row["error"].splitlines()[-15:]:
                print(f"    {line}")
    print()
    r, t, ok = report["ratios"], report["targets"], report["meets_targets"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    def mark(v: bool | None) -> str:
        return {True: "ok", False: "MISSED", None: "n/a"}[v]

    print(f"Maildir vs mbsync : {fmt(r['maildir_vs_mbsync']):>7}  (target >= {t['maildir_vs_mbsync']}x)  {mark(ok['maildir_vs_mbsync'])}")
    print(f"Maildir vs ref-A  : {fmt(r['maildir_vs_ref_a']):>7}  (target >= {t['maildir_vs_ref_a']}x)  {mark(ok['maildir_vs_ref_a'])}")
    print(f"SQLite vs mbsync  : {fmt(r['sqlite_vs_mbsync']):>7}  (target >= {t['sqlite_vs_mbsync']}x)  {mark(ok['sqlite_vs_mbsync'])}")
    for key, label in (("maildir_no_index_vs_mbsync", "Maildir --no-index vs mbsync"),
                       ("maildir_no_index_vs_ref_a", "Maildir --no-index vs ref-A"),
                       ("sqlite_no_index_vs_mbsync", "SQLite --no-index vs mbsync")):
        if r.get(key) is not None:
            print(f"{label:<29}: {fmt(r[key]):>7}")
    peak = r["mailbackup_peak_rss_mb"]
    print(f"mailbackup peak RSS: {'n/a' if peak is None else f'{peak:.1f} MB'}  (target < {t['peak_rss_mb_max']:.0f} MB)  "
          f"{mark(ok['peak_rss_under_max'])}")
    if "scale" in report:
        print("\nRSS scaling (mailbackup, same server, second user):")
        for store, s in report["scale"].items():
            print(f"  {store:<8} N={s['small_n']}: {s['small_rss_mb']} MB   N={s['n']}: {s['rss_mb']} MB   "
                  f"growth {s['growth']}x")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stores", default="maildir,mbox,sqlite",
                        help="comma-separated subset of maildir,mbox,sqlite")
    parser.add_argument("--dir", default="/tmp", help="where contenders write (same filesystem for all)")
    parser.add_argument("--scale", action="store_true",
                        help="also back up N/10 messages and compare mailbackup's peak RSS")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run each mailbackup contender from the checkout at DIR (PYTHONPATH), interleaved")
    parser.add_argument("--keep", action="store_true", help="keep the output directories")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.stores = [s for s in args.stores.split(",") if s]
    bad = set(args.stores) - {"maildir", "mbox", "sqlite"}
    if bad:
        parser.error(f"unknown store(s): {', '.join(sorted(bad))}")
    if args.messages < 1:
        parser.error("--messages must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for tool in (TIME, shutil.which("mbsync"), shutil.which("dovecot"), shutil.which("doveadm")):
        if not tool or not os.path.exists(tool):
            print(f"missing tool: {tool} (need GNU time, isync, dovecot-imapd)", file=sys.stderr)
            return 2
    bench = Bench(args)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = bench.main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.cleanup()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
