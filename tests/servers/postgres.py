"""A throwaway PostgreSQL cluster on a Unix socket in its own temp dir."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "mb"


def bin_dir() -> Path:
    """Newest /usr/lib/postgresql/N/bin (Debian layout); the version is not hard-coded."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                           "(run: bash tests/bootstrap.sh)")
    return max(candidates, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))


class Postgres:
    def __init__(self) -> None:
        self.directory: Path | None = None
        self.bin = bin_dir()

    def _run(self, *argv: str) -> None:
        # initdb and postgres refuse to run as root: use the Debian 'postgres' user then
        command = [str(a) for a in argv]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if proc.returncode != 0:
            log = ""
            if self.directory is not None and (self.directory / "log").exists():
                log = (self.directory / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{proc.stdout}{proc.stderr}{log}")

    def start(self) -> str:
        """Init and start a cluster; returns the SQLAlchemy URL of its 'postgres' database."""
        self.directory = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
        self.directory.chmod(0o700)
        data = self.directory / "data"
        self._run(self.bin / "initdb", "-D", str(data), "-A", "trust", "-U", SUPERUSER,
                  "--no-sync", "-E", "UTF8", "--locale=C")
        self._run(self.bin / "pg_ctl", "-D", str(data), "-l", str(self.directory / "log"), "-w",
                  "-o", f"-k {self.directory} -c listen_addresses='' -c fsync=off", "start")
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.directory}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its SQLAlchemy URL."""
        import psycopg  # only needed when a test asks for a database

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        with psycopg.connect(host=str(self.directory), user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown of our own cluster, then remove its directory."""
        if self.directory is None:
            return
        try:
            if (self.directory / "data" / "postmaster.pid").exists():
                self._run(self.bin / "pg_ctl", "-D", str(self.directory / "data"), "-m", "fast",
                          "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
