"""Encrypted, compressed SQLite archives against plain ones: speed and size, in one run.

    python benchmarks/encrypted.py [--messages N] [--seed S] [--dir /tmp] [--json] [--keep]

Starts a private Dovecot (plain IMAP on 127.0.0.1), seeds one account with N messages
from imap_backup.py's generator, then times, each as a subprocess under /usr/bin/time -v:

  backup plain      mailbackup backup into a plain .sqlite archive
  backup encrypted  the same into a new archive with --encrypt (zstd, then AES-256-GCM)
  restore plain     each archive into a fresh, empty account
  restore encrypted

Both backups run with --no-index: an encrypted archive keeps no search index, and the
index helper process would bill the plain run for work the encrypted one never does.
Sizes: stored object bytes against the messages' own bytes, over all mail and over the
messages under 100 KB (text-only mail). Every archive and target is counted afterwards.
It also measures, in process, what a zstd dictionary trained on the account's own small
messages would save (the archive does not use one; see README "Encryption").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from imap_backup import FOLDERS, MessageFactory, Result, seed, timed  # noqa: E402
from restore import count_messages  # noqa: E402

from tests.servers.dovecot import Dovecot  # noqa: E402

TARGETS = {"backup_encrypted_vs_plain": 0.8, "restore_encrypted_vs_plain": 0.8}
SIZE_TARGETS = {"stored_vs_raw_all": 0.7, "stored_vs_raw_text": 0.4}
PASSPHRASE = "benchmark passphrase"
TEXT_ONLY = 100_000


def sizes(archive: Path) -> dict[str, float]:
    """Stored bytes over raw bytes, for all messages and for those under 100 KB."""
    with sqlite3.connect(archive) as db:
        rows = db.execute(
            "SELECT m.size, b.size FROM blobs b JOIN (SELECT DISTINCT sha256, size FROM messages) m ON m.sha256 = b.sha256"
        ).fetchall()
    raw_all, stored_all = sum(r[0] for r in rows), sum(r[1] for r in rows)
    text = [r for r in rows if r[0] < TEXT_ONLY]
    raw_text, stored_text = sum(r[0] for r in text), sum(r[1] for r in text)
    return {
        "objects": len(rows),
        "raw_bytes": raw_all,
        "stored_bytes": stored_all,
        "file_bytes": sum(p.stat().st_size for p in archive.parent.glob(archive.name + "*")),
        "stored_vs_raw_all": round(stored_all / raw_all, 3),
        "stored_vs_raw_text": round(stored_text / raw_text, 3),
    }


def dictionary_gain(n: int, seed_value: int) -> dict[str, float]:
    """zstd level 3 on small messages, without and with a 64 KB dictionary trained on 1,000 of them."""
    import zstandard

    factory = MessageFactory(seed_value + 1)
    small = [raw for raw in (factory.make(i, FOLDERS[i % len(FOLDERS)][0])[0] for i in range(min(n, 3000) + 1000)) if len(raw) < TEXT_ONLY]
    train, test = small[:1000], small[1000:]
    plain = zstandard.ZstdCompressor(level=3)
    trained = zstandard.train_dictionary(64 * 1024, train)
    with_dict = zstandard.ZstdCompressor(level=3, dict_data=trained)
    raw = sum(map(len, test))
    return {
        "messages": len(test),
        "zstd3": round(sum(len(plain.compress(m)) for m in test) / raw, 3),
        "zstd3_dict64k": round(sum(len(with_dict.compress(m)) for m in test) / raw, 3),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="mbe-", dir="/tmp"))
        self.work = Path(tempfile.mkdtemp(prefix="mailbackup-encrypted-bench-", dir=args.dir))
        self.server = Dovecot()
        self.results: list[Result] = []

    def log(self, msg: str) -> None:
        if not self.args.json:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cleanup(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def url(self, user: str) -> str:
        return f"imap://{user}@127.0.0.1:{self.server.imap_port}"

    def run(self, name: str, command: list[str], env: dict[str, str], count: Callable[[], int]) -> Result:
        seconds, rss, proc = timed([sys.executable, "-m", "mailbackup", *command, "--no-tls", "--json", "-q"],
                                   {**os.environ, **env, "PYTHONPATH": str(REPO)})
        result = Result(name, seconds, peak_rss_mb=rss)
        if proc.returncode != 0:
            result.ok, result.error = False, (proc.stdout + proc.stderr).decode(errors="replace").strip()[-1500:]
        result.messages = count()
        if result.ok and result.messages != self.args.messages:
            result.ok, result.error = False, f"holds {result.messages} messages, expected {self.args.messages}"
        self.results.append(result)
        self.log(f"{name}: {seconds:.1f} s, {rss:.0f} MB RSS" if result.ok else f"{name}: FAILED {result.error}")
        return result

    def main(self) -> dict:
        n = self.args.messages
        self.server.start(self.root, tls=False)
        source = self.server.add_user("src")
        t0 = time.perf_counter()
        seed(self.server, source, n, self.args.seed)
        self.server.doveadm("force-resync", "-u", source.user, "*")
        self.log(f"seeded {n} messages in {time.perf_counter() - t0:.1f} s")
        archives = {"plain": self.work / "plain.sqlite", "encrypted": self.work / "encrypted.sqlite"}
        secret = {"MAILBACKUP_PASSPHRASE": PASSPHRASE}

        def rows(path: Path) -> Callable[[], int]:
            def count() -> int:
                with sqlite3.connect(path) as db:
                    return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
            return count

        env = {"MAILBACKUP_PASSWORD": source.password, **secret}
        self.run("backup plain", ["backup", self.url(source.user), str(archives["plain"]), "--no-index"], env, rows(archives["plain"]))
        self.run("backup encrypted", ["backup", self.url(source.user), str(archives["encrypted"]), "--no-index", "--encrypt"],
                 env, rows(archives["encrypted"]))
        for kind, archive in archives.items():
            target = self.server.add_user(f"r{kind}")
            self.run(f"restore {kind}", ["restore", str(archive), self.url(target.user)],
                     {"MAILBACKUP_PASSWORD": target.password, **secret}, lambda t=target: count_messages(self.server, t))
        measured = {kind: sizes(path) for kind, path in archives.items()}
        for result in self.results:
            result.bytes = int(measured["plain"]["raw_bytes"])
        return self.report(measured, dictionary_gain(n, self.args.seed))

    def report(self, measured: dict[str, dict[str, float]], dictionary: dict[str, float]) -> dict:
        by = {r.name: r for r in self.results}

        def ratio(a: str, b: str) -> float | None:
            x, y = by.get(a), by.get(b)
            if not (x and y and x.ok and y.ok and x.seconds and y.seconds):
                return None
            return round((x.messages / x.seconds) / (y.messages / y.seconds), 2)

        ratios = {
            "backup_encrypted_vs_plain": ratio("backup encrypted", "backup plain"),
            "restore_encrypted_vs_plain": ratio("restore encrypted", "restore plain"),
        }
        enc = measured["encrypted"]
        return {
            "messages": self.args.messages, "seed": self.args.seed,
            "results": [r.row() for r in self.results], "ratios": ratios, "targets": TARGETS,
            "sizes": measured, "size_targets": SIZE_TARGETS, "dictionary": dictionary,
            "meets_targets": {
                **{k: None if ratios[k] is None else ratios[k] >= t for k, t in TARGETS.items()},
                **{k: enc[k] <= t for k, t in SIZE_TARGETS.items()},
            },
        }


def print_table(report: dict) -> None:
    print(f"\nencrypted archive benchmark: {report['messages']} messages, seed {report['seed']}")
    head = f"{'contender':<20} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'MB/s':>7} {'RSS MB':>7}"
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        rate = f"{row['msgs_per_s']:>8.0f}" if row["ok"] else f"{'FAILED':>8}"
        print(f"{row['contender']:<20} {row['messages']:>8} {row['seconds']:>8.2f} {rate} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>7.1f}")
        if not row["ok"]:
            print(f"    {row.get('error', '')[-500:]}")
    print()
    for key, value in report["ratios"].items():
        target = report["targets"][key]
        verdict = "ok" if value is not None and value >= target else "MISSED"
        print(f"{key:<28} {'n/a' if value is None else f'{value:.2f}x':>7}  (target >= {target}x) {verdict}")
    for kind, s in report["sizes"].items():
        print(f"{kind:<10} raw {s['raw_bytes'] / 1e6:.0f} MB, stored {s['stored_bytes'] / 1e6:.0f} MB, files {s['file_bytes'] / 1e6:.0f} MB; "
              f"stored/raw all {s['stored_vs_raw_all']:.3f}, under 100 KB {s['stored_vs_raw_text']:.3f}")
    for key, target in report["size_targets"].items():
        print(f"encrypted {key:<20} {report['sizes']['encrypted'][key]:.3f}  (target <= {target}) "
              f"{'ok' if report['meets_targets'][key] else 'MISSED'}")
    d = report["dictionary"]
    print(f"dictionary: {d['messages']} small messages, zstd-3 {d['zstd3']:.3f}, with a 64 KB trained dictionary {d['zstd3_dict64k']:.3f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default="/tmp", help="where archives go")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    bench = Bench(args)
    try:
        report = bench.main()
    finally:
        bench.cleanup()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if all(v for v in report["meets_targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
