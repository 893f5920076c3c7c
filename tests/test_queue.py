"""The job queue on the suite's real PostgreSQL, with worker processes backing up accounts on the real Dovecot."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from archive_view import archived
from click.testing import CliRunner
from servers.dovecot import Account, Dovecot
from servers.postgres import Postgres

from mailbackup.cli import main
from mailbackup.queue import app as queue_app
from mailbackup.queue import runs

WORKER_TIMEOUTS = ["--heartbeat", "0.5", "--stall-timeout", "2"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def queue_url(postgres: Postgres) -> str:
    return postgres.create_database(f"mbqueue_{os.getpid()}_{time.monotonic_ns()}")


def message(account: str, number: int, filler: int = 200) -> bytes:
    return (
        f"From: a{number}@example.org\r\nTo: {account}@example.org\r\nSubject: {account} #{number}\r\n"
        f"Message-ID: <{account}.{number}@example.org>\r\n\r\n".encode()
        + (b"line %d of %s\r\n" % (number, account.encode())) * (filler // 20 + 1)
    )


class Setup:
    """N accounts on Dovecot, a config naming them with password files, a SQLite archive each."""

    def __init__(self, dovecot: Dovecot, directory: Path, count: int, messages: int, filler: int = 200,
                 shared: tuple[str, str] | None = None) -> None:
        """shared=(database URL, s3://bucket/prefix): one PostgreSQL archive for all, bytes in the bucket."""
        self.dovecot = dovecot
        self.directory = directory
        self.accounts: dict[str, Account] = {}
        lines = ["[defaults]", "no_tls = true", "timeout = 30", "index = false"]
        if shared:
            lines += [f'archive = "{shared[0]}"', f'blobs = "{shared[1]}"']
        lines.append("")
        for n in range(count):
            name = f"acct{n:03d}"
            account = dovecot.add_user()
            self.accounts[name] = account
            dovecot.seed_maildir(account, "INBOX", ((message(name, i, filler), "S", 1.6e9 + i) for i in range(messages)))
            dovecot.seed_maildir(account, "Archive/2024", ((message(name, -i, filler), "", 1.6e9 + i) for i in range(3)))
            secret = directory / f"{name}.pw"
            secret.write_text(account.password + "\n")
            lines += [f"[accounts.{name}]", f'source = "{account.url("imap")}"', f'password_file = "{secret}"', ""]
            if not shared:
                lines.insert(-1, f'archive = "{self.archive(name)}"')
        self.config = directory / "config.toml"
        self.config.write_text("\n".join(lines))

    def archive(self, name: str) -> Path:
        return self.directory / f"{name}.sqlite"

    def assert_exact(self, name: str) -> None:
        """Every message on the server is in the archive once, with the same SHA-256, and nothing else."""
        server = {folder: sorted(hashlib.sha256(raw).hexdigest() for raw in raws)
                  for folder, raws in self.dovecot.folder_bodies(self.accounts[name]).items()}
        ours = {folder: sorted(hashlib.sha256(m.raw).hexdigest() for m in messages)
                for folder, messages in archived(str(self.archive(name))).items()}
        assert ours == server, name


class Workers:
    """Worker processes, each with its own log file; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, url: str, config: Path, directory: Path) -> None:
        self.url, self.config, self.directory = url, config, directory
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        with open(self.directory / f"worker{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "mailbackup", "worker", "--queue", self.url, "--config", str(self.config),
                 *WORKER_TIMEOUTS, "-v", *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self.processes.append(process)
        return process

    def log(self, index: int) -> str:
        return (self.directory / f"worker{index}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def workers_for(tmp_path: Path) -> Iterator[Callable[[str, Path], Workers]]:
    started: list[Workers] = []

    def make(url: str, config: Path) -> Workers:
        started.append(Workers(url, config, tmp_path))
        return started[-1]

    yield make
    for workers in started:
        workers.stop()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def info(url: str) -> str:
    return queue_app.conninfo(url)


def jobs_json(url: str, *extra: str) -> tuple[int, dict]:
    code, output = cli("jobs", "--queue", url, "--json", *extra)
    return code, json.loads(output.strip().splitlines()[-1])


def assert_no_overlap(history: list[runs.Run]) -> None:
    """No account was worked on by two runs at once."""
    by_account: dict[str, list[runs.Run]] = defaultdict(list)
    for run in history:
        assert run.finished_at is not None, run
        by_account[run.account].append(run)
    for account, items in by_account.items():
        items.sort(key=lambda r: r.started_at)
        for before, after in itertools.pairwise(items):
            assert before.finished_at <= after.started_at, (account, before, after)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class SlowProxy:
    """Forwards to the IMAP port, server -> client at `rate` bytes/s: a backup that takes a while."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port, self.rate = target_port, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.rate), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        try:
            while chunk := source.recv(8192):
                if rate:
                    time.sleep(len(chunk) / rate)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def slow_setup(dovecot: Dovecot, directory: Path, rate: int = 150_000) -> tuple[Setup, SlowProxy]:
    """One account of 600 messages of ~2 kB behind a slow line: three batches of about 2.5 s each."""
    setup = Setup(dovecot, directory, 1, 600, filler=2000)
    proxy = SlowProxy(dovecot.imap_port, rate)
    text = setup.config.read_text().replace(f":{dovecot.imap_port}\"", f":{proxy.port}\"")
    setup.config.write_text(text)
    return setup, proxy


def entries(archive: Path) -> int:
    if not archive.exists():
        return 0
    import sqlite3

    with sqlite3.connect(f"file:{archive}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


# -- tests ---------------------------------------------------------------------------------------


def test_enqueue_twice_leaves_one_waiting_job(dovecot: Dovecot, queue_url: str, tmp_path: Path) -> None:
    setup = Setup(dovecot, tmp_path, 2, 1)
    code, output = cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")
    assert code == 0, output
    assert "acct000: queued" in output and "acct001: queued" in output
    code, output = cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--account", "acct000", "--json")
    assert code == 0, output
    assert json.loads(output) == {"account": "acct000", "job_id": None, "already_queued": True}
    code, summary = jobs_json(queue_url)
    assert code == 0
    assert [(a["account"], a["queued"], a["running"], a["last"]) for a in summary["accounts"]] == [
        ("acct000", 1, 0, None), ("acct001", 1, 0, None)]


def test_job_carries_the_account_name_and_config_path_never_a_secret(dovecot: Dovecot, queue_url: str, tmp_path: Path) -> None:
    setup = Setup(dovecot, tmp_path, 1, 1)
    assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")[0] == 0
    import psycopg

    with psycopg.connect(info(queue_url)) as conn:
        rows = conn.execute("SELECT args FROM procrastinate_jobs").fetchall()
    assert rows == [({"account": "acct000", "config": str(setup.config.resolve())},)]
    assert setup.accounts["acct000"].password not in json.dumps(rows)


def test_enqueue_refuses_unknown_accounts_and_non_postgres_queues(dovecot: Dovecot, queue_url: str, tmp_path: Path) -> None:
    setup = Setup(dovecot, tmp_path, 1, 1)
    code, output = cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--account", "nope")
    assert code == 2 and "no account nope" in output
    code, output = cli("enqueue", "--queue", "sqlite:///x.db", "--config", str(setup.config), "--all")
    assert code == 3 and "PostgreSQL URL" in output


def test_workers_drain_a_queue_with_every_account_exact_and_never_two_at_once(
    dovecot: Dovecot, queue_url: str, tmp_path: Path, workers_for: Callable[[str, Path], Workers], request: pytest.FixtureRequest
) -> None:
    count = 50
    setup = Setup(dovecot, tmp_path, count, 5)
    workers = workers_for(queue_url, setup.config)
    assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")[0] == 0
    workers.start()
    workers.start()
    # Once some accounts run, queue everything again: running accounts get a second job, which
    # must wait for the first (the account's lock); waiting ones are not queued twice.
    wait_for(lambda: len(runs.history(info(queue_url))) >= 4, 60, "the first runs")
    code, output = cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all", "--json")
    assert code == 0
    requeued = [json.loads(line) for line in output.splitlines()]
    assert any(item["already_queued"] for item in requeued)
    workers.start("--concurrency", "2")  # a third worker, started later, backing up two accounts at a time
    code, summary = jobs_json(queue_url, "--wait", "--timeout", "90")
    assert code == 0, summary
    assert summary["ok"] and summary["pending"] == 0
    assert sorted(a["account"] for a in summary["accounts"]) == sorted(setup.accounts)
    assert all(a["last"]["status"] == "ok" for a in summary["accounts"])
    history = runs.history(info(queue_url))
    assert_no_overlap(history)
    assert len({run.worker for run in history}) == 3, "all three workers took jobs"
    first_runs = {}
    for run in history:
        first_runs.setdefault(run.account, run)
    assert sum(run.new_messages or 0 for run in first_runs.values()) == count * 8
    for name in setup.accounts:
        setup.assert_exact(name)


def test_a_killed_worker_job_finishes_on_another_with_nothing_lost_or_doubled(
    dovecot: Dovecot, queue_url: str, tmp_path: Path, workers_for: Callable[[str, Path], Workers]
) -> None:
    setup, proxy = slow_setup(dovecot, tmp_path)
    try:
        workers = workers_for(queue_url, setup.config)
        assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")[0] == 0
        doomed = workers.start()
        archive = setup.archive("acct000")
        wait_for(lambda: entries(archive) >= 200, 30, "the first committed batch")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        survivor = workers.start()
        code, summary = jobs_json(queue_url, "--wait", "--timeout", "60")
        assert code == 0, summary
        history = runs.history(info(queue_url))
        assert [run.status for run in history] == ["lost", "ok"]
        assert history[1].attempt == 1
        assert_no_overlap(history)
        assert 0 < history[1].new_messages < 603  # the rerun fetched only what the killed run had not committed
        setup.assert_exact("acct000")
        assert survivor.poll() is None
    finally:
        proxy.close()


def test_sigterm_ends_the_job_at_a_batch_boundary_requeues_it_and_exits_0(
    dovecot: Dovecot, queue_url: str, tmp_path: Path, workers_for: Callable[[str, Path], Workers]
) -> None:
    setup, proxy = slow_setup(dovecot, tmp_path)
    try:
        workers = workers_for(queue_url, setup.config)
        assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")[0] == 0
        first = workers.start()
        archive = setup.archive("acct000")
        wait_for(lambda: entries(archive) >= 200, 30, "the first committed batch of INBOX")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0, workers.log(0)
        stopped_at = entries(archive)
        assert 200 <= stopped_at < 603 and stopped_at % 200 in (0, 3)  # whole batches only (+3 in Archive/2024)
        history = runs.history(info(queue_url))
        assert [run.status for run in history] == ["interrupted"]
        code, summary = jobs_json(queue_url)
        assert summary["accounts"][0]["queued"] == 1  # back in the queue
        workers.start()
        code, summary = jobs_json(queue_url, "--wait", "--timeout", "60")
        assert code == 0, summary
        history = runs.history(info(queue_url))
        assert [run.status for run in history] == ["interrupted", "ok"]
        assert history[1].new_messages == 603 - stopped_at
        setup.assert_exact("acct000")
    finally:
        proxy.close()


def test_jobs_reports_each_accounts_result_and_exits_1_on_a_failure(
    dovecot: Dovecot, queue_url: str, tmp_path: Path, workers_for: Callable[[str, Path], Workers]
) -> None:
    setup = Setup(dovecot, tmp_path, 2, 2)
    (tmp_path / "acct001.pw").write_text("wrong password\n")
    workers = workers_for(queue_url, setup.config)
    assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), "--all")[0] == 0
    workers.start()
    code, summary = jobs_json(queue_url, "--wait", "--timeout", "60")
    assert code == 1
    last = {a["account"]: a["last"] for a in summary["accounts"]}
    assert last["acct000"]["status"] == "ok" and last["acct000"]["new_messages"] == 5
    assert last["acct000"]["bytes"] > 0 and last["acct000"]["duration"] > 0
    assert last["acct001"]["status"] == "failed" and "login" in last["acct001"]["error"].lower()
    code, output = cli("jobs", "--queue", queue_url)
    assert code == 1
    assert "acct000" in output and "ok" in output and "failed" in output


def test_a_scheduled_run_queues_every_account(
    dovecot: Dovecot, queue_url: str, tmp_path: Path, workers_for: Callable[[str, Path], Workers]
) -> None:
    setup = Setup(dovecot, tmp_path, 3, 1)
    queue_app.ensure_schema(info(queue_url))  # so that the history can be read before the worker is up
    workers = workers_for(queue_url, setup.config)
    workers.start("--schedule", "* * * * * */2")  # every 2 seconds (croniter's sixth field)
    wait_for(lambda: len({r.account for r in runs.history(info(queue_url)) if r.status == "ok"}) == 3, 30,
             "a scheduled run of every account")
    for name in setup.accounts:
        setup.assert_exact(name)


def test_a_bad_schedule_is_a_usage_error(queue_url: str, tmp_path: Path) -> None:
    code, output = cli("worker", "--queue", queue_url, "--config", str(tmp_path / "none.toml"), "--schedule", "nightly")
    assert code == 2 and "not a cron line" in output


@pytest.mark.parametrize("url, libpq", [
    ("postgresql://mb@db/q", "postgresql://mb@db/q"),
    ("postgres://mb@db/q", "postgresql://mb@db/q"),
    ("postgresql+psycopg://mb@/q?host=/tmp/pg", "postgresql://mb@/q?host=/tmp/pg"),
    ("PostgreSQL+psycopg2://mb@db:5433/q", "postgresql://mb@db:5433/q"),
])
def test_queue_urls_in_sqlalchemy_style_become_libpq_urls(url: str, libpq: str) -> None:
    assert queue_app.conninfo(url) == libpq


@pytest.mark.parametrize("url", ["sqlite:///q.db", "mysql://db/q", "db.example.org/q", "/tmp/q.sqlite"])
def test_a_queue_that_is_not_postgresql_is_refused(url: str) -> None:
    from mailbackup.errors import QueueError

    with pytest.raises(QueueError, match="PostgreSQL URL"):
        queue_app.conninfo(url)


def test_the_queue_table_in_the_config_gives_url_and_schedule_and_nothing_else(tmp_path: Path) -> None:
    from mailbackup.errors import ConfigError
    from mailbackup.queue import queue_settings

    path = tmp_path / "config.toml"
    path.write_text('[queue]\nurl = "postgresql://mb@db/q"\nschedule = "0 3 * * *"\n')
    assert queue_settings(path) == {"url": "postgresql://mb@db/q", "schedule": "0 3 * * *"}
    path.write_text('[queue]\nurl = "postgresql://mb@db/q"\nshedule = "0 3 * * *"\n')
    with pytest.raises(ConfigError, match="unknown keys shedule"):
        queue_settings(path)
    assert queue_settings(tmp_path / "absent.toml") == {}


def test_without_a_queue_url_the_commands_say_where_to_give_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILBACKUP_QUEUE", raising=False)
    code, output = cli("jobs", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and "give --queue" in output


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_worker_writing_postgresql_and_s3_stays_under_100_mb_however_many_accounts(
    dovecot: Dovecot, postgres: Postgres, s3_bucket: Path, queue_url: str, tmp_path: Path,
    workers_for: Callable[[str, Path], Workers],
) -> None:
    archive = postgres.create_database(f"mbrss_{os.getpid()}_{time.monotonic_ns()}")
    setup = Setup(dovecot, tmp_path, 24, 20, filler=3000, shared=(archive, f"s3://{s3_bucket.name}/mail"))
    names = sorted(setup.accounts)
    worker = workers_for(queue_url, setup.config).start()
    peaks = []
    for chunk in (names[:6], names[6:]):
        accounts = [arg for name in chunk for arg in ("--account", name)]
        assert cli("enqueue", "--queue", queue_url, "--config", str(setup.config), *accounts)[0] == 0
        code, summary = jobs_json(queue_url, "--wait", "--timeout", "120")
        assert code == 0 and summary["ok"], summary
        peaks.append(peak_rss_mb(worker.pid))
    assert peaks[1] < 100, f"worker peaked at {peaks[0]:.1f} MB after 6 accounts, {peaks[1]:.1f} MB after 24"
    # Four times the accounts, the same peak: nothing a job leaves behind piles up.
    assert peaks[1] - peaks[0] < 5, f"worker peak grew from {peaks[0]:.1f} to {peaks[1]:.1f} MB"


def test_stop_at_batch_raises_only_once_asked() -> None:
    asked = []
    progress = queue_app.StopAtBatch(lambda: bool(asked))
    progress.stored(200, 1000)
    progress.folder_started("INBOX", 10, 100)
    asked.append(True)
    with pytest.raises(queue_app.Stopped):
        progress.stored(200, 1000)
