"""The config file, several accounts, the archive lock and the scheduling examples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailbackup import config
from mailbackup.cli import main
from mailbackup.errors import ArchiveLocked, ConfigError
from mailbackup.stores import open_store

ROOT = Path(__file__).parent.parent


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), env={"MAILBACKUP_PASSWORD": ""}, catch_exceptions=False)


def test_plain_password_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[accounts.a]\nsource = "imaps://a@h"\narchive = "x.db"\npassword = "hunter2"\n')
    with pytest.raises(ConfigError, match="plain password.*password_command"):
        config.load(path)
    result = invoke("backup", "--config", str(path), "--all")
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "hunter2" not in result.output  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[accounts.a]\nsource = "imaps://a@h"\n', "needs archive"),
        ('[accounts.a]\nsource = "imaps://a@h"\narchive = "x.db"\nfolder = ["INBOX"]\n', "unknown keys folder"),
        ('[accounts.a]\nsource = "imaps://a@h"\narchive = "x.db"\npassword_file = "f"\npassword_command = "c"\n', "give one of"),
        ("[accounts\n", "not valid TOML"),
        ("[other]\n", "no \\[accounts.NAME\\]"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write_config(tmp_path, text))


def test_sample_config_parses_and_expands_home() -> None:
    accounts = config.load(ROOT / "examples" / "config.toml")
    assert set(accounts) == {"work", "gmail", "old-isp"}
    assert accounts["work"].archive == "maildir:" + os.path.expanduser("~/Mail/backup/work")
    assert accounts["gmail"].auth == "xoauth2"
    assert accounts["old-isp"].delete_older_than == 30


def test_accounts_back_up_in_parallel_processes(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    accounts = [dovecot.add_user() for _ in range(3)]
    lines = []
    for i, account in enumerate(accounts):
        dovecot.append(account, "INBOX", b"Subject: %d\r\n\r\nbody\r\n" % i)
        secret = tmp_path / f"{account.user}.pw"
        secret.write_text(account.password)
        lines.append(
            f'[accounts.a{i}]\nsource = "{account.url("imap")}"\narchive = "{tmp_path / f"a{i}.db"}"\n'
            f'no_tls = true\npassword_file = "{secret}"\n'
        )
    path = write_config(tmp_path, "\n".join(lines))
    result = invoke("backup", "--config", str(path), "--all", "--jobs", "3", "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    report = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert report["ok"] and {name: r["new"] for name, r in report["accounts"].items()} == {"a0": 1, "a1": 1, "a2": 1}
    one = invoke("backup", "--config", str(path), "--account", "a1", "--json")
    assert json.loads(one.stdout)["accounts"]["a1"]["new"] == 0  # type: ignore[attr-defined]
    missing = invoke("backup", "--config", str(path), "--account", "nope")
    assert missing.exit_code == 2 and "no account nope" in missing.output  # type: ignore[attr-defined]


def test_one_failing_account_does_not_stop_the_others(dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = dovecot.add_user()
    dovecot.append(good, "INBOX", b"Subject: ok\r\n\r\nbody\r\n")
    (tmp_path / "pw").write_text(good.password)
    path = write_config(
        tmp_path,
        f'[accounts.good]\nsource = "{good.url("imap")}"\narchive = "{tmp_path / "g.db"}"\nno_tls = true\npassword_file = "{tmp_path / "pw"}"\n'
        f'[accounts.bad]\nsource = "{good.url("imap")}"\narchive = "{tmp_path / "b.db"}"\nno_tls = true\npassword_command = "echo wrong"\n',
    )
    result = invoke("backup", "--config", str(path), "--all", "--json")
    assert result.exit_code == 3  # type: ignore[attr-defined]
    report = json.loads(result.stdout.splitlines()[-1])  # type: ignore[attr-defined]
    assert report["accounts"]["good"]["new"] == 1 and report["accounts"]["bad"]["exit_code"] == 3


@pytest.mark.parametrize("kind", ["maildir", "sqlite"])
def test_second_writer_is_refused_and_nothing_is_corrupted(dovecot, account, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    dovecot.seed_maildir(account, "INBOX", ((b"Subject: %d\r\n\r\n%s\r\n" % (i, b"z" * 4000), "", 1.6e9 + i) for i in range(1500)))
    url = f"maildir:{tmp_path / 'md'}" if kind == "maildir" else str(tmp_path / "a.sqlite")
    store = open_store(url, mode="write")
    with store.lock():  # a run in progress
        result = invoke("backup", account.url("imap"), url, "--no-tls", "--password-command", f"echo {account.password}")
        assert result.exit_code == 4, result.output  # type: ignore[attr-defined]
        assert "another mailbackup run" in result.output  # type: ignore[attr-defined]
        with pytest.raises(ArchiveLocked):
            with open_store(url, mode="write").lock():
                pass
    store.close()
    env = {**os.environ, "MAILBACKUP_PASSWORD": account.password}
    command = [sys.executable, "-m", "mailbackup", "backup", account.url("imap"), url, "--no-tls", "--json"]
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = sorted([first.wait(), second.wait()])
    assert codes in ([0, 0], [0, 4])  # the second waits for nothing: it refuses, or runs after the first
    final = invoke("backup", account.url("imap"), url, "--no-tls", "--json", "--password-command", f"echo {account.password}")
    assert json.loads(final.stdout)["new"] == 0  # type: ignore[attr-defined]
    assert json.loads(invoke("ls", url, "--json").stdout.splitlines()[0])["messages"] == 1500  # type: ignore[attr-defined]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    units = ROOT / "examples" / "systemd"
    service = (units / "mailbackup.service").read_text()
    # verify insists that ExecStart exists: point it at this interpreter.
    (tmp_path / "mailbackup.service").write_text(service.replace("%h/.local/bin/mailbackup", f"{sys.executable} -m mailbackup"))
    shutil.copy(units / "mailbackup.timer", tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", "mailbackup.timer", "mailbackup.service"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and "Unknown" not in done.stderr, done.stderr
    timer = (units / "mailbackup.timer").read_text()
    assert "Persistent=true" in timer and "RandomizedDelaySec=" in timer


def test_cron_line_has_five_fields_and_runs_all() -> None:
    lines = [line for line in (ROOT / "examples" / "crontab").read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split()
    assert all(f == "*" or f.isdigit() for f in fields[:5])
    assert "backup --all" in lines[0]
