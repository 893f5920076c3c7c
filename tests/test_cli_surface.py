"""One CLI surface: every command that talks to a server takes the same option groups."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from mailbackup.cli import main
from mailbackup.credentials import Login, resolve_secret
from mailbackup.errors import ConfigError

LOGIN = {"--password-file", "--password-command", "--oauth2-token-command", "--oauth2-mechanism"}
TLS = {"--ca-file", "--no-tls", "--timeout"}
OUTPUT = {"--json", "--verbose", "--quiet"}


def options(command: str) -> set[str]:
    found = main.commands[command]
    assert isinstance(found, click.Command)
    return {name for param in found.params for name in param.opts if name.startswith("--")}


@pytest.mark.parametrize("command", ["backup", "prune-server", "verify", "restore", "migrate"])
def test_every_server_command_has_login_tls_and_output_options(command: str) -> None:
    assert LOGIN | TLS | OUTPUT <= options(command)


def test_migrate_has_target_twins_for_its_second_login() -> None:
    assert {f"--target-{name[2:]}" for name in LOGIN} <= options("migrate")


@pytest.mark.parametrize("command", ["restore", "migrate"])
def test_workers_reach_the_transfer_options(command: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib

    restore_module = importlib.import_module("mailbackup.restore")  # the module: the package exports a function of that name
    seen = []

    def capture(*args, options, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(options.workers)
        raise ConfigError("stop here")

    monkeypatch.setattr(restore_module, command, capture)
    first = "/nonexistent/a.sqlite" if command == "restore" else "imap://a@127.0.0.1:1"
    env = {"MAILBACKUP_PASSWORD": "x", "MAILBACKUP_TARGET_PASSWORD": "y"}
    for argv in ([], ["--workers", "1"]):
        CliRunner().invoke(main, [command, first, "imap://b@127.0.0.1:1", "--no-tls", *argv], env=env)
    assert seen == [3, 1]
    refused = CliRunner().invoke(main, [command, first, "imap://b@127.0.0.1:1", "--workers", "0"], env=env)
    assert refused.exit_code == 2


def test_target_password_prompt_names_the_target_options() -> None:
    result = CliRunner().invoke(
        main, ["migrate", "imap://a@127.0.0.1:1", "imap://b@127.0.0.1:1", "--no-tls", "--target-no-tls", "--password-command", "echo x"],
        env={"MAILBACKUP_PASSWORD": "", "MAILBACKUP_TARGET_PASSWORD": ""},
    )
    assert result.exit_code == 2
    assert "--target-password-file" in result.stderr


def test_config_and_command_line_share_one_resolver(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "pw"
    secret.write_text("hunter2\nignored\n")
    assert resolve_secret(Login(password_file=str(secret))) == "hunter2"
    assert resolve_secret(Login(password_command="echo s3cret")) == "s3cret"
    monkeypatch.setenv("MY_PW", "from-env")
    assert resolve_secret(Login(password_env="MY_PW")) == "from-env"
    assert resolve_secret(Login(oauth2_token_command="echo tok")) == "tok"
    with pytest.raises(ConfigError, match="not several"):
        resolve_secret(Login(password_file=str(secret), password_command="echo x"))


def test_library_errors_name_no_command_line_flags(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MAILBACKUP_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as caught:
        resolve_secret(Login())
    assert "--" not in str(caught.value)


def test_a_partial_run_exits_1_with_one_error_line(dovecot, account, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mailbackup.errors import ServerError
    from mailbackup.sources import imap as imap_source

    dovecot.append(account, "INBOX", b"Subject: a\r\n\r\nbody\r\n")

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ServerError("FETCH failed")

    monkeypatch.setattr(imap_source.ImapSource, "fetch", broken)
    result = CliRunner().invoke(
        main, ["backup", account.url("imap"), str(tmp_path / "a.db"), "--no-tls"],
        env={"MAILBACKUP_PASSWORD": account.password},
    )
    assert result.exit_code == 1
    assert result.stderr.count("mailbackup: error:") == 1
    assert "rerun" in result.stderr


def test_verbose_prints_a_line_per_folder_with_its_time(dovecot, account, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dovecot.append(account, "INBOX", b"Subject: a\r\n\r\nbody\r\n")
    dovecot.append(account, "Sent", b"Subject: b\r\n\r\nbody\r\n")
    result = CliRunner().invoke(
        main, ["backup", account.url("imap"), str(tmp_path / "a.db"), "--no-tls", "-v"],
        env={"MAILBACKUP_PASSWORD": account.password},
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith(("INBOX:", "Sent:"))]
    assert len(lines) == 2
    assert all("1 new" in line and line.rstrip().endswith(" s") for line in lines), lines


def test_library_errors_name_settings_and_the_cli_names_their_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mailbackup import backup
    from mailbackup.errors import UsageError

    with pytest.raises(UsageError) as caught:
        backup("imaps://me@127.0.0.1:1", str(tmp_path / "a.db"), password="x", options=__import__("mailbackup").BackupOptions(no_tls=True))
    assert "--" not in str(caught.value) and "no tls contradicts imaps://" in str(caught.value)
    result = CliRunner().invoke(main, ["backup", "imaps://me@127.0.0.1:1", str(tmp_path / "a.db"), "--no-tls"],
                                env={"MAILBACKUP_PASSWORD": "x"})
    assert result.exit_code == 2
    assert "--no-tls contradicts imaps://" in result.stderr


def test_migrate_errors_about_the_target_say_target_and_name_its_twin_option() -> None:
    result = CliRunner().invoke(
        main, ["migrate", "imap://a@127.0.0.1:1", "imaps://b@127.0.0.1:1", "--no-tls", "--target-no-tls"],
        env={"MAILBACKUP_PASSWORD": "x", "MAILBACKUP_TARGET_PASSWORD": "y"},
    )
    assert result.exit_code == 2
    assert "--target-no-tls contradicts imaps://" in result.stderr
    result = CliRunner().invoke(
        main, ["migrate", "imap://a@127.0.0.1:1", "ftp://b@127.0.0.1:1", "--no-tls"],
        env={"MAILBACKUP_PASSWORD": "x", "MAILBACKUP_TARGET_PASSWORD": "y"},
    )
    assert result.exit_code == 2 and "the target 'ftp://b@127.0.0.1:1' must look like" in result.stderr


def test_no_library_module_spells_a_command_line_flag() -> None:
    import pathlib
    import re

    package = pathlib.Path(__file__).resolve().parent.parent / "mailbackup"
    flag = re.compile(r"""["'][^"'\n]*(?<![\w-])--[a-z][a-z-]+""")
    offenders = []
    for path in package.rglob("*.py"):
        if path.parent.name == "cli":  # the command line package: flags are its business
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "Error(" in code or "raise" in code or "log." in code:
                if flag.search(code):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
