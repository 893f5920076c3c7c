"""Restore and migrate benchmark: mailbackup against Dovecot's own importer, mbsync and an APPEND loop.

    python benchmarks/restore.py [--messages N] [--seed S] [--json] [--keep]

Starts a private Dovecot (plain IMAP on 127.0.0.1, ssl=no), seeds one account with
N generated messages (the generator of imap_backup.py), then times, in the same run,
each contender as a subprocess under /usr/bin/time -v, each into a fresh empty account:

  doveadm import     a Maildir copy of the archive -> an empty account, by the server's own
                     importer (`doveadm -c CONF import`, no IMAP), copying each file
                     (maildir_copy_with_hardlinks=no): the reference for both; the same
                     with Dovecot's default hard links is shown too
  mbsync pull        the seeded account -> a local Maildir (if isync is installed)
  mbsync push        that Maildir -> an empty account (if isync is installed)
  imaplib APPEND     one APPEND per message from that Maildir, waiting for each OK
  mailbackup restore a Maildir archive (made untimed with `mailbackup backup`) -> empty account
  mailbackup migrate the seeded account -> empty account, no local copy

Every target account is counted afterwards (STATUS MESSAGES over all folders), so a
broken run cannot post a fast time.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from imap_backup import TIME, Result, mbsync_tls_keyword, seed, timed  # noqa: E402
from imapclient import imap_utf7  # noqa: E402

from tests.servers.dovecot import Account, Dovecot  # noqa: E402

TARGETS = {"restore_vs_doveadm_import": 1.0, "migrate_vs_doveadm_import": 1.0}
FLAG_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def append_loop(host: str, port: int, user: str, maildir: str) -> int:
    """The reference: one APPEND per message (flags and date kept), each waiting for its OK."""
    imap = imaplib.IMAP4(host, port)
    imap.login(user, os.environ["IMAP_PASSWORD"])
    count = 0
    root = Path(maildir)
    for cur in sorted(root.rglob("cur")):
        folder = cur.parent.relative_to(root).as_posix()
        if folder != "INBOX":
            imap.create(_quote(folder))
        for path in sorted([*cur.iterdir(), *(cur.parent / "new").iterdir()]):
            letters = path.name.rpartition(":2,")[2]
            flags = "(" + " ".join(FLAG_LETTERS[c] for c in letters if c in FLAG_LETTERS) + ")"
            when = imaplib.Time2Internaldate(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))
            raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            status, data = imap.append(_quote(folder), flags, when, raw)
            if status != "OK":
                raise RuntimeError(f"APPEND refused: {data}")
            count += 1
    imap.logout()
    return count


def _quote(name: str) -> str:
    from imapclient import imap_utf7

    return '"' + imap_utf7.encode(name).decode("ascii") + '"'


def count_messages(server: Dovecot, account: Account) -> int:
    with server.client(account) as imap:
        total = 0
        for flags, _, name in imap.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                continue
            total += imap.folder_status(name, [b"MESSAGES"])[b"MESSAGES"]
    return total


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="mbr-", dir="/tmp"))  # short: Unix sockets
        self.work = Path(tempfile.mkdtemp(prefix="mailbackup-restore-bench-", dir=args.dir))
        self.server = Dovecot()
        self.results: list[Result] = []
        self.total_bytes = 0

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cleanup(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def url(self, account: Account) -> str:
        return f"imap://{account.user}@127.0.0.1:{self.server.imap_port}"

    def mbsyncrc(self, account: Account, maildir: Path, sync: str) -> Path:
        rc = self.work / f"mbsyncrc-{account.user}"
        rc.write_text(
            f"IMAPAccount bench\nHost 127.0.0.1\nPort {self.server.imap_port}\n"
            f"User {account.user}\nPass {account.password}\n{mbsync_tls_keyword()} None\nAuthMechs LOGIN\n\n"
            "IMAPStore remote\nAccount bench\n\n"
            f"MaildirStore local\nPath {maildir}/\nInbox {maildir}/INBOX\nSubFolders Verbatim\n\n"
            f"Channel bench\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nSync {sync}\nSyncState *\n"
        )
        return rc

    def record(self, result: Result, proc: subprocess.CompletedProcess, account: Account | Path) -> None:
        if proc.returncode != 0:
            result.ok = False
            result.error = f"exit {proc.returncode}: " + (proc.stdout + proc.stderr).decode(errors="replace").strip()[-1500:]
        if isinstance(account, Path):  # a Maildir
            result.messages = sum(len(os.listdir(d)) for sub in ("cur", "new") for d in account.rglob(sub))
        else:
            result.messages = count_messages(self.server, account)
        if result.ok and result.messages != self.args.messages:
            result.ok, result.error = False, f"target holds {result.messages} messages, expected {self.args.messages}"
        result.bytes = self.total_bytes
        result.cpu_seconds = getattr(proc, "cpu_seconds", 0.0)
        self.results.append(result)
        self.log(f"{result.name}: {result.seconds:.1f} s, {result.peak_rss_mb:.0f} MB RSS" if result.ok else f"{result.name}: FAILED {result.error}")

    def maildir_copy(self, archive: Path, into: Path) -> Path:
        """The archive's Maildir folders without its catalog, owned by the mail user."""
        shutil.copytree(archive, into, ignore=shutil.ignore_patterns(".mailbackup"))
        # Dovecot 2.3 reads folder names on disk as modified UTF-7 (its UTF8 option came in 2.4).
        for path in sorted(into.rglob("*"), key=lambda p: -len(p.parts)):
            if path.is_dir() and not path.name.isascii():
                path.rename(path.with_name(imap_utf7.encode(path.name).decode("ascii")))
        owner = self.server.mail_root.stat()
        self.work.chmod(0o711)  # doveadm reads it as the mail user
        for path in [into, *into.rglob("*")]:
            os.chown(path, owner.st_uid, owner.st_gid)
        return into

    def doveadm_import(self, archive: Path, hardlinks: bool = False) -> None:
        """Dovecot's own importer, against the benchmark's Dovecot config: no IMAP, no client.

        Maildir to Maildir on one filesystem, Dovecot hard-links each file instead of
        writing it (maildir_copy_with_hardlinks, on by default): no byte is copied. The
        reference copies, as a restore to a server elsewhere must; the hard-link run is
        shown for information.
        """
        copy = self.maildir_copy(archive, self.work / "import-src")
        imported = self.server.add_user("imported" + ("-ln" if hardlinks else ""))
        self.server.doveadm("mailbox", "list", "-u", imported.user)  # creates the user's Maildir, untimed
        # The archive nests folders as directories (LAYOUT=fs); INBOX is INBOX/.
        location = f"maildir:{copy}:LAYOUT=fs:INBOX={copy}/INBOX"
        seconds, rss, proc = timed(
            ["doveadm", "-c", str(self.server.conf_path), "-o", f"maildir_copy_with_hardlinks={'yes' if hardlinks else 'no'}",
             "import", "-s", "-u", imported.user, location, "", "ALL"]
        )
        self.record(Result("doveadm import" + (" (hard links)" if hardlinks else ""), seconds, peak_rss_mb=rss), proc, imported)
        shutil.rmtree(copy, ignore_errors=True)

    def main(self) -> dict:
        n = self.args.messages
        self.server.start(self.root, tls=False)
        source = self.server.add_user("src")
        t0 = time.perf_counter()
        seed(self.server, source, n, self.args.seed)
        self.server.doveadm("force-resync", "-u", source.user, "*")
        self.log(f"seeded {n} messages in {time.perf_counter() - t0:.1f} s")
        env = {**os.environ, "MAILBACKUP_PASSWORD": source.password}
        archive = self.work / "archive"
        done = subprocess.run(
            [sys.executable, "-m", "mailbackup", "backup", self.url(source), f"maildir:{archive}", "--no-tls", "--json", "-q"],
            env=env, capture_output=True, check=True, cwd=REPO,
        )
        self.total_bytes = json.loads(done.stdout.decode().strip().splitlines()[-1])["bytes"]
        self.log(f"archive made (untimed): {self.total_bytes / 1e6:.0f} MB")

        self.doveadm_import(archive)
        self.doveadm_import(archive, hardlinks=True)
        maildir = self.work / "mbsync"
        maildir.mkdir()
        if shutil.which("mbsync") and not self.args.target_refs_only:
            seconds, rss, proc = timed(["mbsync", "-q", "-c", str(self.mbsyncrc(source, maildir, "Pull")), "bench"])
            self.record(Result("mbsync pull", seconds, peak_rss_mb=rss), proc, maildir)

            pushed = self.server.add_user("push")
            # mbsync keeps its sync state in the Maildir: push a copy without it.
            push_dir = self.work / "push"
            shutil.copytree(maildir, push_dir, ignore=shutil.ignore_patterns(".mbsyncstate*", ".uidvalidity"))
            seconds, rss, proc = timed(["mbsync", "-q", "-c", str(self.mbsyncrc(pushed, push_dir, "Push")), "bench"])
            self.record(Result("mbsync push", seconds, peak_rss_mb=rss), proc, pushed)
        elif not self.args.target_refs_only:
            maildir = self.maildir_copy(archive, self.work / "loop-src")

        if not self.args.target_refs_only:
            looped = self.server.add_user("loop")
            seconds, rss, proc = timed(
                [sys.executable, __file__, "append-loop", "127.0.0.1", str(self.server.imap_port), looped.user, str(maildir)],
                {**os.environ, "IMAP_PASSWORD": looped.password},
            )
            self.record(Result("imaplib APPEND loop", seconds, peak_rss_mb=rss), proc, looped)

        # With --baseline, restore and migrate also run from that checkout, each just before its twin.
        for baseline in (True, False) if self.args.baseline else (False,):
            mark, path = (" (baseline)", self.args.baseline) if baseline else ("", str(REPO))
            restored = self.server.add_user("restored" + ("b" if baseline else ""))
            state = self.work / f"restore{'-b' if baseline else ''}.sqlite"
            seconds, rss, proc = timed(
                [sys.executable, "-m", "mailbackup", "restore", f"maildir:{archive}", self.url(restored), "--no-tls", "--json",
                 "-q", "--state", str(state)],
                {**os.environ, "MAILBACKUP_PASSWORD": restored.password, "PYTHONPATH": path},
            )
            self.record(Result("mailbackup restore" + mark, seconds, peak_rss_mb=rss), proc, restored)
        for baseline in (True, False) if self.args.baseline else (False,):
            mark, path = (" (baseline)", self.args.baseline) if baseline else ("", str(REPO))
            migrated = self.server.add_user("migrated" + ("b" if baseline else ""))
            state = self.work / f"migrate{'-b' if baseline else ''}.sqlite"
            seconds, rss, proc = timed(
                [sys.executable, "-m", "mailbackup", "migrate", self.url(source), self.url(migrated), "--no-tls", "--target-no-tls", "--json",
                 "-q", "--state", str(state)],
                {**os.environ, "MAILBACKUP_PASSWORD": source.password, "MAILBACKUP_TARGET_PASSWORD": migrated.password,
                 "PYTHONPATH": path},
            )
            self.record(Result("mailbackup migrate" + mark, seconds, peak_rss_mb=rss), proc, migrated)
        return self.report()

    def report(self) -> dict:
        by = {r.name: r for r in self.results}

        def ratio(a: str, b: str) -> float | None:
            x, y = by.get(a), by.get(b)
            if not (x and y and x.ok and y.ok and x.seconds and y.seconds):
                return None
            return round((x.messages / x.seconds) / (y.messages / y.seconds), 2)

        ratios = {
            "restore_vs_doveadm_import": ratio("mailbackup restore", "doveadm import"),
            "migrate_vs_doveadm_import": ratio("mailbackup migrate", "doveadm import"),
            "restore_vs_mbsync_push": ratio("mailbackup restore", "mbsync push"),
            "migrate_vs_mbsync_pull": ratio("mailbackup migrate", "mbsync pull"),
            "restore_vs_append_loop": ratio("mailbackup restore", "imaplib APPEND loop"),
        }
        return {
            "messages": self.args.messages, "seed": self.args.seed, "bytes": self.total_bytes,
            "transport": "plain IMAP on 127.0.0.1 (dovecot ssl=no)",
            "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip(),
            "mbsync": subprocess.run(["mbsync", "--version"], capture_output=True, text=True).stdout.strip()
            if shutil.which("mbsync") else "mbsync not installed",
            "results": [r.row() for r in self.results],
            "ratios": ratios, "targets": TARGETS,
            "meets_targets": {k: None if ratios[k] is None else ratios[k] >= t for k, t in TARGETS.items()},
        }


def print_table(report: dict) -> None:
    print(f"\nmailbackup restore/migrate benchmark: {report['messages']} messages, "
          f"{report['bytes'] / 1e6:.0f} MB, seed {report['seed']}; {report['transport']}")
    print(f"dovecot {report['dovecot']}, {report['mbsync']}")
    head = f"{'contender':<30} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'MB/s':>7} {'RSS MB':>7} {'CPU s':>7}"
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        rate = f"{row['msgs_per_s']:>8.0f}" if row["ok"] else f"{'FAILED':>8}"
        print(f"{row['contender']:<30} {row['messages']:>8} {row['seconds']:>8.2f} {rate} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>7.1f} {row.get('cpu_s', 0):>7.1f}")
        if not row["ok"]:
            print(f"    {row.get('error', '')[-500:]}")
    print()
    for key, value in report["ratios"].items():
        target = report["targets"].get(key)
        verdict = "" if target is None else ("  ok" if value is not None and value >= target else "  MISSED")
        print(f"{key:<24} {'n/a' if value is None else f'{value:.2f}x':>7}" + (f"  (target >= {target}x){verdict}" if target else ""))


def main(argv: list[str]) -> int:
    if argv[:1] == ["append-loop"]:
        host, port, user, maildir = argv[1:5]
        print(json.dumps({"messages": append_loop(host, int(port), user, maildir)}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default="/tmp", help="where archives and Maildirs go")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline", metavar="DIR", help="also run restore and migrate from the checkout at DIR")
    parser.add_argument("--target-refs-only", action="store_true", help="of the references, run only doveadm import")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for tool in (TIME, shutil.which("dovecot"), shutil.which("doveadm")):
        if not tool or not os.path.exists(tool):
            print(f"missing tool: {tool} (need GNU time, dovecot-imapd; isync is optional)", file=sys.stderr)
            return 2
    bench = Bench(args)
    try:
        report = bench.main()
    except KeyboardInterrupt:
        return 130
    finally:
        bench.cleanup()
    print(json.dumps(report, indent=1)) if args.json else print_table(report)
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
