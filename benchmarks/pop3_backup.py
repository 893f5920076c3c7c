"""POP3 backup benchmark: mailbackup against a minimal poplib client, fetchmail and getmail6.

    python benchmarks/pop3_backup.py [--messages N] [--seed S] [--stores maildir,mbox,sqlite]
                                     [--dir /tmp] [--json]

Starts a private Dovecot (plain POP3 on 127.0.0.1, ``ssl = no``: no STLS, TLS
cost is out of the picture), seeds one user's INBOX (the POP3 maildrop) with N
generated messages (the same size mix as benchmarks/imap_backup.py), lets
Dovecot index them and compute POP3 sizes once, then times in the same run,
against the same maildrop, each contender writing into a fresh directory under
--dir.  Every contender leaves the mail on the server, so all see the same N:

  ref-0 poplib discard     LIST + RETR each, nothing written (protocol ceiling)
  ref-A poplib files       LIST + RETR each, one file per message, no fsync (target reference)
  fetchmail bsmtp          fetchmail --keep --all, appending every message to one BSMTP file
  fetchmail mda Maildir    fetchmail --keep --all, mda = /bin/sh + cat into Maildir/new
                           (a process per message: the usual fetchmail-to-Maildir setup)
  getmail6 Maildir         SimplePOP3Retriever, delete = false, read_all = true
  maildir / mbox / sqlite  ``mailbackup backup pop3://... --no-tls`` into that store
  maildir-incr             the same maildir command again (nothing new: UIDL check only)

Each contender runs as a subprocess under ``/usr/bin/time -v`` (peak RSS).
Outputs are counted afterwards so a broken run cannot post a fast time.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from imap_backup import TIME, MessageFactory, Result, _ge, count_files, mailbackup_count, timed  # noqa: E402  shared with the IMAP benchmark
from imap_backup import Bench as ImapBench  # noqa: E402

from tests.servers.dovecot import Account  # noqa: E402

REF_A = "ref-A poplib files"
FM_BSMTP = "fetchmail bsmtp"
FM_MDA = "fetchmail mda Maildir"
GETMAIL = "getmail6 Maildir"
TARGETS = {"vs_fetchmail": 1.2, "vs_poplib": 0.7}  # fetchmail: its faster (bsmtp) mode
NOBODY = 65534  # uid and gid (nobody / nogroup) for getmail6 when run as root


# getmail6 6.18.11 (Debian 12) forks a delivery child per message and can lose the child's
# SIGCHLD wake-up (the handler notifies before the parent waits; getmail6 issue #226): the
# run then stops after `timeout` (180 s) with "waiting child pid N timed out", at a random
# message.  We run the packaged getmail with only _wait_for_child replaced by a version that
# waits for the reaped status instead of for the notification; everything else is stock.
GETMAIL_PYTHON = "/usr/bin/python3"  # the interpreter the Debian package is installed for
GETMAIL_RACE_FIX = """
import os, runpy, socket, sys
from getmailcore import baseclasses
from getmailcore.exceptions import getmailOperationError

def _wait_for_child(self, childpid):
    cond = self._ForkingBase__child_exited
    with cond:
        if not cond.wait_for(lambda: self._ForkingBase__child_status is not None,
                             socket.getdefaulttimeout() or 60):
            raise getmailOperationError('waiting child pid %d timed out' % childpid)
    pid, status = self._ForkingBase__child_pid, self._ForkingBase__child_status
    if pid != childpid:
        raise getmailOperationError('got child pid %d, not %d' % (pid, childpid))
    if os.WIFSIGNALED(status):
        raise getmailOperationError('child pid %d killed by signal %d' % (pid, os.WTERMSIG(status)))
    if not os.WIFEXITED(status):
        raise getmailOperationError('child pid %d failed to exit' % pid)
    return os.WEXITSTATUS(status)

baseclasses.ForkingBase._wait_for_child = _wait_for_child
sys.argv[0] = "/usr/bin/getmail"
runpy.run_path("/usr/bin/getmail", run_name="__main__")
"""


# -- the poplib reference client (run as a subprocess: `pop3_backup.py _poplib ...`) ----------

def poplib_client(host: str, port: int, user: str, out: str | None) -> dict:
    """Stock poplib: USER/PASS, LIST, RETR each, write each message to its own file."""
    poplib._MAXLINE = 1 << 20  # stock limit is 2048; our generated lines are short anyway
    conn = poplib.POP3(host, port, timeout=120)
    conn.user(user)
    conn.pass_(os.environ["POP3_PASSWORD"])
    _, listing, _ = conn.list()
    messages = total = 0
    for line in listing:
        number, size = line.split()[:2]
        _, lines, _ = conn.retr(int(number))
        if out is not None:
            with open(os.path.join(out, f"{int(number)}.eml"), "wb") as f:
                f.write(b"\r\n".join(lines) + b"\r\n")
        messages += 1
        total += int(size)
    conn.quit()  # no DELE sent: everything stays on the server
    return {"messages": messages, "bytes": total}


def count_bsmtp(path: Path) -> int:
    """Messages in a BSMTP file: MAIL FROM ... DATA ... '.' blocks (bodies are dot-stuffed)."""
    count, in_data = 0, False
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if in_data:
                if line == b".":
                    count, in_data = count + 1, False
            elif line == b"DATA":
                in_data = True
    return count


class Bench(ImapBench):
    """Reuses the IMAP benchmark's temp dirs, cleanup, logging and result bookkeeping."""

    def setup(self, user: str, n: int) -> Account:  # type: ignore[override]
        account = self.server.add_user(user)
        t0 = time.perf_counter()
        factory = MessageFactory(self.args.seed)
        self.server.seed_maildir(account, "INBOX", (factory.make(i, "INBOX") for i in range(n)))
        size = sum(p.stat().st_size for p in (self.server.maildir(account) / "cur").iterdir())
        self.log(f"seeded {user}: {n} messages into INBOX, {size / 1e6:.0f} MB on disk (LF), "
                 f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.server.doveadm("force-resync", "-u", account.user, "INBOX")
        # One untimed discarding pass: Dovecot builds its index and the POP3 (CRLF) sizes,
        # RETR marks everything \Seen (file renames happen now, not in a timed run), and the
        # mail is in the page cache before anything is timed.
        warm = json.loads(self.poplib_proc(account, None, timed_run=False).stdout)
        if warm["messages"] != n:
            raise RuntimeError(f"warm-up fetched {warm['messages']} messages, expected {n}")
        self.sizes[user] = self.total_bytes = warm["bytes"]
        self.log(f"indexed + warm-up RETR of {warm['bytes'] / 1e6:.0f} MB (CRLF) in "
                 f"{time.perf_counter() - t0:.1f} s")
        return account

    def poplib_proc(self, account: Account, out: Path | None, timed_run: bool = True):
        env = {**os.environ, "POP3_PASSWORD": account.password}
        cmd = [sys.executable, str(Path(__file__).resolve()), "_poplib", "127.0.0.1",
               str(self.server.pop3_port), account.user, str(out) if out else "-"]
        if not timed_run:
            return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return timed(cmd, env)

    # -- contenders --
    def poplib_ref(self, account: Account, n: int, discard: bool) -> Result:
        out = None if discard else self.fresh("ref-a")
        seconds, rss, proc = self.poplib_proc(account, out)
        r = Result("ref-0 poplib discard" if discard else REF_A, seconds, peak_rss_mb=rss,
                   bytes=self.total_bytes)
        if proc.returncode != 0:
            r.ok, r.error = False, proc.stderr.decode(errors="replace").strip()[-2000:]
        else:
            r.messages = json.loads(proc.stdout)["messages"] if discard else count_files(out, maildir=False)
        self.record(r, n)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        return r

    def fetchmail(self, account: Account, n: int, mda: bool) -> Result:
        out = self.fresh("fetchmail")
        home = out / "home"
        home.mkdir(mode=0o700)
        if mda:
            for sub in ("cur", "new", "tmp"):
                (out / "Maildir" / sub).mkdir(parents=True)
            # fetchmail popen()s the mda through /bin/sh (dash) once per message; the shell
            # part is builtins only, then exec cat: one fork + two execs per message.
            # $$ is unique while it runs; the loop guards against PID reuse (pid_max 32768).
            new = out / "Maildir" / "new"
            delivery = (f"mda \"f={new}/$$.fm; while [ -e $f ]; do f=$f.x; done; "
                        f"exec cat > $f\"")
        else:
            delivery = f"bsmtp \"{out / 'mail.bsmtp'}\""
        rc = home / "fetchmailrc"
        rc.write_text(
            "set no syslog\nset no bouncemail\n"
            f"poll 127.0.0.1 protocol POP3 service {self.server.pop3_port} uidl auth password\n"
            f"  user \"{account.user}\" there with password \"{account.password}\" is root here\n"
            f"  keep fetchall no sslcertck sslproto '' {delivery}\n")
        rc.chmod(0o600)
        env = {**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)}
        seconds, rss, proc = timed(["fetchmail", "-s", "-f", str(rc), "--idfile", str(home / ".fetchids"),
                                    "--nodetach"], env)
        r = Result(FM_MDA if mda else FM_BSMTP, seconds, peak_rss_mb=rss, bytes=self.total_bytes,
                   cpu_seconds=proc.cpu_seconds)
        if proc.returncode != 0:  # 0 = got mail; 1 would be "no mail", a failure here
            r.ok, r.error = False, f"exit {proc.returncode}: " + \
                (proc.stdout + proc.stderr).decode(errors="replace").strip()[-2000:]
        if mda:
            r.messages = count_files(out / "Maildir", maildir=True)
        elif (out / "mail.bsmtp").exists():
            r.messages = count_bsmtp(out / "mail.bsmtp")
        self.record(r, n)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def getmail(self, account: Account, n: int) -> Result:
        out = self.fresh("getmail")
        gdir = out / "getmail"
        gdir.mkdir(mode=0o700)
        for sub in ("cur", "new", "tmp"):
            (out / "Maildir" / sub).mkdir(parents=True)
        rc = gdir / "getmailrc"
        rc.write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {self.server.pop3_port}\nusername = {account.user}\npassword = {account.password}\n\n"
            f"[destination]\ntype = Maildir\npath = {out / 'Maildir'}/\n\n"
            "[options]\nverbose = 0\ndelete = false\nread_all = true\nmessage_log_syslog = false\n")
        rc.chmod(0o600)
        cmd = [GETMAIL_PYTHON, "-c", GETMAIL_RACE_FIX, "--getmaildir", str(gdir), "--rcfile", str(rc)]
        if os.geteuid() == 0:
            # getmail6 refuses to deliver into a Maildir as root: run it as nobody, as a
            # non-root user would run it (setpriv execs, so time -v still sees getmail itself).
            self.work.chmod(0o711)
            for path in [out, *out.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        seconds, rss, proc = timed(cmd, {**os.environ, "HOME": str(gdir)})
        r = Result(GETMAIL, seconds, peak_rss_mb=rss, bytes=self.total_bytes)
        if proc.returncode != 0:
            r.ok, r.error = False, f"exit {proc.returncode}: " + \
                (proc.stdout + proc.stderr).decode(errors="replace").strip()[-2000:]
        r.messages = count_files(out / "Maildir", maildir=True)
        self.record(r, n)
        shutil.rmtree(out, ignore_errors=True)
        return r

    def run_mailbackup(self, name: str, account: Account, archive: str, expected_new: int,
                       expected_total: int, extra: tuple[str, ...] = (), baseline: bool = False) -> Result:
        env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
        if baseline:  # another checkout of mailbackup, e.g. `git worktree add /tmp/base main`
            env["PYTHONPATH"] = self.args.baseline
            name += " (baseline)"
        cmd = [*self.mailbackup, "backup", f"pop3://{account.user}@127.0.0.1:{self.server.pop3_port}",
               "--no-tls", archive, "--json", "-q", *extra]
        seconds, rss, proc = timed(cmd, env)
        r = Result(name, seconds, peak_rss_mb=rss, bytes=self.total_bytes if expected_new else 0,
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
            except (ValueError, IndexError, AttributeError):
                r.extra["summary"] = out[-300:]
        try:
            r.messages = mailbackup_count(archive)
        except (RuntimeError, ValueError, KeyError) as exc:
            r.ok, r.error = False, (r.error + " " if r.error else "") + str(exc)
        return self.record(r, expected_total)

    def contenders(self, account: Account, n: int) -> None:
        if not self.args.target_refs_only:
            self.poplib_ref(account, n, discard=True)
        self.poplib_ref(account, n, discard=False)
        self.fetchmail(account, n, mda=False)
        if not self.args.target_refs_only:
            self.fetchmail(account, n, mda=True)
            if shutil.which("getmail"):
                self.getmail(account, n)
        for store in self.args.stores:
            for baseline in (True, False) if self.args.baseline else (False,):
                out = self.fresh(store)
                archive = self.archive_spec(store, out)
                self.run_mailbackup(store, account, archive, n, n, baseline=baseline)
                if store == "maildir":
                    self.run_mailbackup("maildir-incr", account, archive, 0, n, baseline=baseline)
                if not self.args.keep:
                    shutil.rmtree(out, ignore_errors=True)

    def main(self) -> dict:  # type: ignore[override]
        n = self.args.messages
        self.server.start(self.root, tls=False)  # the helper chmods it 755
        self.log(f"dovecot pid {self.server.pid} pop3=127.0.0.1:{self.server.pop3_port} (plain, ssl=no)")
        account = self.setup("bench", n)
        self.contenders(account, n)
        return self.report(n)

    def report(self, n: int) -> dict:  # type: ignore[override]
        by = {r.name: r for r in self.results}

        def rate(name: str) -> float | None:
            r = by.get(name)
            return r.messages / r.seconds if r and r.ok and r.seconds else None

        fm_rates = {name: rate(name) for name in (FM_BSMTP, FM_MDA)}
        fm_ref = max((k for k, v in fm_rates.items() if v), key=lambda k: fm_rates[k], default=None)
        ratios, checks = {}, {}
        for store in self.args.stores:
            mine = rate(store)
            for key, ref in (("vs_fetchmail", fm_ref), ("vs_fetchmail_mda", FM_MDA), ("vs_poplib", REF_A)):
                other = rate(ref) if ref else None
                value = round(mine / other, 2) if mine and other else None
                ratios[f"{store}_{key}"] = value
                if key in TARGETS:
                    checks[f"{store}_{key}"] = _ge(value, TARGETS[key])
        versions = {
            "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip(),
            "fetchmail": next((line for line in subprocess.run(
                ["fetchmail", "--version"], capture_output=True, text=True).stdout.splitlines()
                if "release" in line), "").strip(),
            "getmail": subprocess.run(["getmail", "--version"], capture_output=True,
                                      text=True).stdout.strip() if shutil.which("getmail") else "not installed",
        }
        return {
            "messages": n, "seed": self.args.seed, "bytes_fetched": self.total_bytes,
            "transport": "plain POP3 on 127.0.0.1 (dovecot ssl=no, no STLS): TLS cost excluded",
            "filesystem_dir": str(self.work.parent), "versions": versions,
            "fetchmail_reference": fm_ref,
            "results": [r.row() for r in self.results],
            "ratios": ratios, "targets": TARGETS, "meets_targets": checks,
        }


def print_table(report: dict) -> None:
    print(f"\nmailbackup POP3 backup benchmark: {report['messages']} messages, "
          f"{report['bytes_fetched'] / 1e6:.0f} MB as served (CRLF), seed {report['seed']}")
    print(f"transport: {report['transport']}; output under {report['filesystem_dir']}")
    print("; ".join(f"{k}: {v}" for k, v in report["versions"].items()))
    head = f"{'contender':<24} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'MB/s':>7} {'RSS MB':>7} {'CPU s':>7}"
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        if row["ok"]:
            print(f"{row['contender']:<24} {row['messages']:>8} {row['seconds']:>8.2f} "
                  f"{row['msgs_per_s']:>8.0f} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>7.1f} {row.get('cpu_s', 0):>7.1f}")
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

    fm = report["fetchmail_reference"] or "fetchmail"
    print(f"ratios in msgs/s; 'fetchmail' = the faster fetchmail row ({fm})")
    for key in ok:
        store = key.split("_vs_")[0]
        if key.endswith("vs_fetchmail"):
            print(f"{store:<8} vs fetchmail : {fmt(r[key]):>7}  (target >= {t['vs_fetchmail']}x)  {mark(ok[key])}"
                  f"   [vs fetchmail mda: {fmt(r[f'{store}_vs_fetchmail_mda'])}]")
        else:
            print(f"{store:<8} vs ref-A     : {fmt(r[key]):>7}  (target >= {t['vs_poplib']}x)  {mark(ok[key])}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stores", default="maildir,mbox,sqlite",
                        help="comma-separated subset of maildir,mbox,sqlite")
    parser.add_argument("--dir", default="/tmp", help="where contenders write (same filesystem for all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run each mailbackup contender from the checkout at DIR (PYTHONPATH), interleaved")
    parser.add_argument("--target-refs-only", action="store_true",
                        help="of the references, run only those the targets name (poplib files, fetchmail bsmtp)")
    parser.add_argument("--keep", action="store_true", help="keep mailbackup's output directories")
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
    if argv[:1] == ["_poplib"]:  # the reference client, run as a timed subprocess
        host, port, user, out = argv[1:5]
        print(json.dumps(poplib_client(host, int(port), user, None if out == "-" else out)))
        return 0
    args = parse_args(argv)
    for tool in (TIME, shutil.which("fetchmail"), shutil.which("dovecot"), shutil.which("doveadm")):
        if not tool or not os.path.exists(tool):
            print(f"missing tool: {tool} (need GNU time, fetchmail, dovecot-pop3d; getmail6 is optional)",
                  file=sys.stderr)
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
