"""A private Dovecot on 127.0.0.1 for tests, benchmarks and the demo.

Library:  ``Dovecot().start(directory)`` then ``add_user()``, ``client()``, ``append()``...
Script:   ``python tests/servers/dovecot.py start DIR`` prints a JSON object with
          ports and cert; ``... add-user DIR [NAME]`` prints user and password;
          ``... stop DIR`` stops it.  Keep DIR short (Unix socket path limit).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from imapclient import IMAPClient, imap_utf7

SCRIPT = Path(__file__).with_name("dovecot.sh")
STATE_FILE = "state.json"
_user_counter = itertools.count(1)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    # A daemon's zombie lingers until init reaps it, which may take a while
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return children


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# Ports for servers the suite starts by number come from below the kernel's ephemeral range
# (32768-60999 by default), where every port-0 bind and every outgoing connection takes its
# port: a port picked here and bound a moment later by Dovecot cannot meanwhile become a
# stand-in provider's or a client's. Each pytest-xdist worker has its own slice.
PORTS_LOW, PORTS_HIGH = 20_000, 32_000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from this worker's slice of the range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    width = (PORTS_HIGH - PORTS_LOW) // max(workers, 1)
    low = PORTS_LOW + width * (index % max(workers, 1))
    for _ in range(200):
        port = low + secrets.randbelow(width)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + width}")


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    host: str = "127.0.0.1"
    imap_port: int | None = None
    imaps_port: int | None = None
    pop3_port: int | None = None
    pop3s_port: int | None = None

    def port(self, scheme: str) -> int:
        port = {"imap": self.imap_port, "imaps": self.imaps_port,
                "pop3": self.pop3_port, "pop3s": self.pop3s_port}.get(scheme)
        if not port:
            raise ValueError(f"no {scheme} listener for {self.user}")
        return port

    def url(self, scheme: str = "imap") -> str:
        """E.g. ``imap://user@127.0.0.1:PORT`` (no password in it)."""
        return f"{scheme}://{self.user}@{self.host}:{self.port(scheme)}"


@dataclass(frozen=True)
class FetchedMessage:
    uid: int
    flags: tuple[bytes, ...]
    internal_date: datetime
    raw: bytes


class Dovecot:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.separator = "/"
        self.imap_port = self.pop3_port = 0
        self.imaps_port: int | None = None
        self.pop3s_port: int | None = None
        self.pid: int | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self, directory: str | os.PathLike[str], separator: str = "/",
              tls: bool = True, oauth2_url: str | None = None,
              master: tuple[str, str] | None = None) -> Dovecot:
        """Start on fresh free ports; raises RuntimeError with the log tail on failure.

        master=(name, password) adds a master user that can log in as anyone (admin logins).
        """
        self.directory = Path(directory).absolute()
        self.separator = separator
        # A port free a moment ago may be taken by then (parallel test workers pick ports too):
        # a start that failed on a taken port tries fresh ones.
        for _attempt in range(3):
            self.imap_port, self.pop3_port = free_port(), free_port()
            self.imaps_port = free_port() if tls else None
            self.pop3s_port = free_port() if tls else None
            ports = [self.imap_port, self.pop3_port, self.imaps_port or 0, self.pop3s_port or 0]
            proc = subprocess.run(
                ["bash", str(SCRIPT), "start", str(self.directory), *map(str, ports)],
                env={**os.environ, "SEPARATOR": separator, "OAUTH2_URL": oauth2_url or "",
                     "MASTER_USER": ":".join(master) if master else ""},
                capture_output=True, text=True)
            if proc.returncode == 0 or "in use" not in f"{proc.stdout}{proc.stderr}{self.log_tail()}":
                break
        if proc.returncode != 0:
            raise RuntimeError(f"dovecot failed to start in {self.directory}:\n"
                               f"{proc.stdout}{proc.stderr}{self.log_tail()}")
        self.pid = int((self.directory / "run" / "master.pid").read_text())
        (self.directory / STATE_FILE).write_text(json.dumps(self.describe(), indent=1))
        return self

    def stop(self) -> None:
        """SIGTERM our own master process and wait for it to exit."""
        if self.pid is None:
            return
        master, self.pid = self.pid, None
        if not _alive(master):
            return
        os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 15
        nudged = False
        while _alive(master):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot {master} did not stop")
            if not nudged and time.monotonic() > deadline - 14.5:
                # The master waits ~5 s for an idle imap-login it forks while
                # shutting down; its own children take SIGTERM at once.
                for child in _children(master):
                    _signal(child, signal.SIGTERM)
                nudged = True
            time.sleep(0.05)

    def __enter__(self) -> Dovecot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> Dovecot:
        """The instance that ``start`` recorded in DIR/state.json."""
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        self = cls()
        self.directory = Path(state["directory"])
        self.separator = state["separator"]
        for key in ("imap_port", "imaps_port", "pop3_port", "pop3s_port", "pid"):
            setattr(self, key, state[key])
        return self

    # -- paths -------------------------------------------------------------
    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("dovecot not started")
        return self.directory

    @property
    def conf_path(self) -> Path:
        return self._dir() / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self._dir() / "dovecot.log"

    @property
    def cert_path(self) -> Path:
        """Self-signed cert (CN localhost, IP SAN 127.0.0.1); use it as the CA file."""
        return self._dir() / "tls" / "cert.pem"

    @property
    def mail_root(self) -> Path:
        return self._dir() / "mail"

    def maildir(self, account: Account) -> Path:
        return self.mail_root / account.user

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def describe(self) -> dict[str, object]:
        return {"host": self.host, "imap_port": self.imap_port, "imaps_port": self.imaps_port,
                "pop3_port": self.pop3_port, "pop3s_port": self.pop3s_port,
                "separator": self.separator, "cert_path": str(self.cert_path),
                "conf_path": str(self.conf_path), "log_path": str(self.log_path),
                "directory": str(self._dir()), "pid": self.pid}

    # -- users -------------------------------------------------------------
    def add_user(self, name: str | None = None) -> Account:
        """Create a user who can log in immediately (unique name when none given)."""
        if name is None:
            name = f"u{os.getpid()}x{next(_user_counter)}"
        password = "pw-" + secrets.token_hex(6)
        # One passwd-file per user: Dovecot re-stats the shared DIR/passwd at
        # most once a second, but looks DIR/users/NAME up afresh every time.
        line = f"{name}:{{PLAIN}}{password}::::{self.mail_root / name}::\n"
        path = self._dir() / "users" / name
        if path.exists():
            raise ValueError(f"user {name} exists")
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(line)
        tmp.chmod(0o644)
        tmp.rename(path)
        return self.account(name, password)

    def account(self, user: str, password: str) -> Account:
        return Account(user, password, self.host, self.imap_port, self.imaps_port,
                       self.pop3_port, self.pop3s_port)

    # -- IMAP helpers ------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_path))

    def client(self, account: Account, tls: bool = False) -> IMAPClient:
        """Logged-in IMAPClient: plain port without STARTTLS, or implicit TLS on imaps."""
        if tls:
            imap = IMAPClient(self.host, account.port("imaps"), ssl=True,
                              ssl_context=self.ssl_context(), timeout=30)
        else:
            imap = IMAPClient(self.host, account.port("imap"), ssl=False, timeout=30)
        imap.normalise_times = False
        imap.login(account.user, account.password)
        return imap

    def append(self, account: Account, folder: str, raw: bytes, flags: Iterable[str | bytes] = (),
               internal_date: datetime | None = None) -> int | None:
        """APPEND exactly ``raw`` (creating the folder); returns the UID from APPENDUID."""
        with self.client(account) as imap:
            if not imap.folder_exists(folder):
                imap.create_folder(folder)
            response = imap.append(folder, raw, tuple(flags), internal_date)
        # b"[APPENDUID 1700000000 1] Append completed."
        if response.startswith(b"[APPENDUID "):
            return int(response.split(b"]")[0].split()[2])
        return None

    def fetch(self, account: Account, folder: str) -> list[FetchedMessage]:
        """Every message of a folder, in UID order, as Dovecot serves it."""
        with self.client(account) as imap:
            imap.select_folder(folder, readonly=True)
            uids = imap.search("ALL")
            data: dict[int, dict[bytes, object]] = {}
            # imapclient cannot FETCH "1:*"; explicit UID lists, short enough for one line
            for start in range(0, len(uids), 500):
                data.update(imap.fetch(uids[start:start + 500],
                                       ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]))
        return [FetchedMessage(uid, tuple(item[b"FLAGS"]), item[b"INTERNALDATE"],  # type: ignore[arg-type]
                               item[b"BODY[]"]) for uid, item in sorted(data.items())]  # type: ignore[arg-type]

    def folders(self, account: Account) -> list[str]:
        """Selectable folder names (decoded), INBOX first."""
        with self.client(account) as imap:
            names = [name for attrs, _, name in imap.list_folders()
                     if b"\\Noselect" not in attrs and b"\\NonExistent" not in attrs]
        return sorted(names, key=lambda name: (name != "INBOX", name))

    def folder_bodies(self, account: Account) -> dict[str, list[bytes]]:
        """Folder -> BODY[] of each message in UID order (empty folders included)."""
        return {folder: [m.raw for m in self.fetch(account, folder)]
                for folder in self.folders(account)}

    def uid_validity(self, account: Account, folder: str) -> int:
        with self.client(account) as imap:
            return imap.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"]

    def recreate_folder(self, account: Account, folder: str) -> int:
        """Delete and recreate ``folder`` (emptying it); returns the new UIDVALIDITY."""
        old = self.uid_validity(account, folder)
        with self.client(account) as imap:
            imap.delete_folder(folder)
            imap.create_folder(folder)
        new = self.uid_validity(account, folder)
        if new == old:  # UIDVALIDITY is time-based; force a change within the same second
            self.doveadm("mailbox", "update", "-u", account.user,
                         "--uid-validity", str(old + 1), folder)
            new = old + 1
        return new

    def doveadm(self, *args: str) -> str:
        """``doveadm -c CONF ARGS`` -> stdout (raises CalledProcessError with stderr)."""
        return subprocess.run(["doveadm", "-c", str(self.conf_path), *args],
                              check=True, capture_output=True, text=True).stdout

    # -- fast seeding ------------------------------------------------------
    def seed_maildir(self, account: Account, folder: str,
                     messages: Iterable[tuple[bytes, str, float]]) -> int:
        """Write (raw, flag letters e.g. "FS", mtime=INTERNALDATE) straight into Maildir++.

        Folder names use this instance's separator; Dovecot assigns UIDs on next access.
        Returns the number of messages written.
        """
        mail_root = self.mail_root
        owner = mail_root.stat()
        root = self.maildir(account)
        if folder.upper() == "INBOX":
            target = root
        else:
            parts = folder.split(self.separator)
            target = root / ("." + ".".join(imap_utf7.encode(p).decode("ascii") for p in parts))
        new_dirs = [d for d in (root, target) if not d.exists()]
        for directory in (root, target):
            for sub in ("", "cur", "new", "tmp"):
                (directory / sub).mkdir(exist_ok=True)
        if target != root and not (target / "maildirfolder").exists():
            (target / "maildirfolder").touch()
        for directory in new_dirs:
            for path in [directory, *directory.iterdir()]:
                os.chown(path, owner.st_uid, owner.st_gid)
        stamp = f"{os.getpid()}_{time.time_ns()}"
        cur = target / "cur"
        count = 0
        for count, (raw, flags, mtime) in enumerate(messages, 1):
            letters = "".join(sorted(set(flags)))
            path = cur / f"{int(mtime)}.M{count}P{stamp}.mailbackup,S={len(raw)}:2,{letters}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fchown(fd, owner.st_uid, owner.st_gid)
            finally:
                os.close(fd)
            os.utime(path, (mtime, mtime))
        return count


def main(argv: list[str]) -> int:
    usage = "usage: dovecot.py start DIR [--separator .] [--no-tls] | add-user DIR [NAME] | stop DIR"
    if len(argv) < 2 or argv[0] not in ("start", "stop", "add-user"):
        print(usage, file=sys.stderr)
        return 2
    command, directory, rest = argv[0], argv[1], argv[2:]
    if command == "start":
        separator = rest[rest.index("--separator") + 1] if "--separator" in rest else "/"
        server = Dovecot().start(directory, separator=separator, tls="--no-tls" not in rest)
        print(json.dumps(server.describe(), indent=1))
    elif command == "add-user":
        account = Dovecot.attach(directory).add_user(rest[0] if rest else None)
        print(json.dumps(asdict(account), indent=1))
    else:
        Dovecot.attach(directory).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
