"""Where a SQL archive keeps message bytes when not in its own database: an S3 bucket.

The catalog stays in the database; each message's bytes become one object named by
its SHA-256 (PREFIX/ab/abcdef…). Objects are written before the catalog commits the
entries that name them, so a crash leaves at worst an object nobody names yet, which
the rerun writes again over itself (same key, same bytes). Nothing relies on
conditional writes: S3-compatible servers such as rclone's ignore If-None-Match.

boto3 rather than obstore: its managed transfer streams a big message as a multipart
upload from a file-like view of the bytes we already hold, it reads the standard AWS
configuration (environment, ~/.aws/config, AWS_ENDPOINT_URL) on its own, and its
errors carry the S3 error code we map to a one-line message.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import StoreError, UsageError, setting

BIG = 8 << 20  # from here on a message goes up in 8 MB parts (multipart upload)
PUT_THREADS = 8  # objects written at once within one batch: S3 round trips, not CPU, bound a batch


@dataclass(frozen=True)
class Blob:
    """What a backend keeps under one key: the bytes to store (a message, or a codec's output)."""

    sha256: str  # the key: SHA-256 of the original message
    raw: bytes


class BlobBackend(Protocol):
    """Content-addressed bytes: put is idempotent, and durable when it returns."""

    where: str  # how to name the place to the user

    def put(self, blobs: Sequence[Blob]) -> None: ...

    def get(self, sha256: str) -> bytes: ...

    def address(self, sha256: str) -> str:
        """Where one blob lives, for messages to the user."""

    def any(self) -> bool:
        """True if the place holds any blob at all."""

    def keys(self) -> Iterator[tuple[str, int]]:
        """Every (sha256, size) held, ascending by sha256."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Bucket:
    """Where a new archive should keep its bytes (--blobs, --s3-endpoint)."""

    url: str  # s3://BUCKET/PREFIX
    endpoint: str | None = None  # None: boto3's own choice (AWS_ENDPOINT_URL, config, AWS)


def parse_bucket_url(url: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"{setting('blobs')} wants s3://BUCKET/PREFIX, not {url!r}")
    return parts.netloc, parts.path.strip("/")


_clients: dict[tuple[str | None, tuple[tuple[str, str], ...]], Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: str | None) -> Any:
    """One boto3 client per endpoint and AWS environment, kept for the life of the process.

    A client costs about 15 MB: botocore parses some 11 MB of JSON (the S3 model, the
    endpoint rules). A worker that made one per job (per account) parsed it again each
    time, and the freed parse buffers left its heap 20-25 MB larger after a dozen jobs.
    boto3 clients are thread-safe and refresh expiring credentials themselves, so the
    jobs of a process share one. The AWS variables are part of the key: a process that
    changes them gets a client that sees the change.
    """
    import boto3
    from botocore.config import Config

    key = (endpoint, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _clients_lock:  # a boto3 Session is not thread-safe; making clients one at a time is enough
        client = _clients.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=PUT_THREADS + 2,
                # Plain PUTs: S3-compatible servers do not all take the newer checksum trailers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


class S3Blobs:
    """Message bytes as objects in an S3-compatible bucket."""

    def __init__(self, url: str, endpoint: str | None = None) -> None:
        self.bucket, self.prefix = parse_bucket_url(url)
        self.where = url
        try:
            from boto3.s3.transfer import TransferConfig
            from botocore.exceptions import BotoCoreError
        except ImportError as exc:
            raise UsageError(f"the archive keeps its messages in {url}: install mailbackup[s3] (boto3)") from exc
        self.client: Any = s3_client(endpoint)

        self.transfer = TransferConfig(multipart_threshold=BIG, multipart_chunksize=BIG, max_concurrency=4)
        self._errors = self.client.exceptions.ClientError
        self._failures: tuple[type[BaseException], ...] = (self._errors, BotoCoreError)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._failures as exc:
            raise StoreError(f"cannot reach bucket {self.bucket}: {_text(exc)}") from exc

    def key(self, sha256: str) -> str:
        name = f"{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def address(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def put(self, blobs: Sequence[Blob]) -> None:
        unique = list({b.sha256: b for b in blobs}.values())
        if len(unique) <= 1:
            for blob in unique:
                self._put_one(blob)
            return
        with ThreadPoolExecutor(PUT_THREADS) as pool:
            for _ in pool.map(self._put_one, unique):
                pass  # re-raises the first failure

    def _put_one(self, blob: Blob) -> None:
        key = self.key(blob.sha256)
        try:
            if len(blob.raw) < BIG:
                # Same key, same bytes: writing it again over an earlier (crashed) run's is harmless.
                self.client.put_object(Bucket=self.bucket, Key=key, Body=blob.raw)
                return
            if self._size(key) == len(blob.raw):
                return  # a crashed run uploaded it already: content-addressed, so it is this message
            # BytesIO over bytes shares the buffer; the transfer reads it 8 MB part by part.
            self.client.upload_fileobj(io.BytesIO(blob.raw), self.bucket, key, Config=self.transfer)
        except self._failures as exc:
            raise StoreError(f"cannot write {self.address(blob.sha256)}: {_text(exc)}") from exc

    def _size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except self._errors as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def get(self, sha256: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except self._errors as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise StoreError(f"object {self.address(sha256)} missing") from exc
            raise StoreError(f"cannot read {self.address(sha256)}: {_text(exc)}") from exc
        except self._failures as exc:
            raise StoreError(f"cannot read {self.address(sha256)}: {_text(exc)}") from exc

    def any(self) -> bool:
        try:
            answer = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._under(), MaxKeys=1)
        except self._failures as exc:
            raise StoreError(f"cannot list {self.where}: {_text(exc)}") from exc
        return bool(answer.get("Contents"))

    def _under(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def keys(self) -> Iterator[tuple[str, int]]:
        """Listed one two-hex-digit fan-out at a time, each sorted here: no server's order is trusted."""
        paginator = self.client.get_paginator("list_objects_v2")
        for fan in range(256):
            under = f"{self._under()}{fan:02x}/"
            found: list[tuple[str, int]] = []
            try:
                for page in paginator.paginate(Bucket=self.bucket, Prefix=under):
                    for item in page.get("Contents", ()):
                        found.append((item["Key"][len(under) :], int(item["Size"])))
            except self._failures as exc:
                raise StoreError(f"cannot list {self.where}: {_text(exc)}") from exc
            found.sort()
            yield from found

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def close(self) -> None:
        """Nothing to do: the client is the process's (see s3_client), its connections pooled for the next job."""


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _text(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if response:
        error = response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
    return str(exc)
