"""The codec seam: message bytes -> zstd -> AES-256-GCM -> the blob backend, and back.

An object of an encrypted archive is

    version (1 byte, 1) | flags (1 byte: 1 = zstd) | data key id (4 bytes) | nonce (12) | ciphertext+tag

sealed with associated data "mailbackup object v1", the archive id, the object's name and
the first six bytes, so an object moved to another name or archive, or a flipped bit
anywhere, fails to open. Its name is HMAC-SHA256(naming key, original bytes): the catalog's
sha256 column holds that name, never the plain SHA-256.
"""

from __future__ import annotations

import hashlib
import struct

import sqlalchemy as sa

from .. import crypto, keys
from ..errors import ArchiveCorrupt, ArchiveKeyError, UsageError, setting
from ..model import Message

VERSION = 1
ZSTD = 1
HEADER = struct.Struct(">BBI")


class Codec:
    """Plain (no key material), compressed, or sealed, as the archive's crypt_meta says."""

    def __init__(self, material: keys.Keys | None, where: str, engine: sa.Engine | None = None, *, writable: bool = False) -> None:
        self.keys = material
        self.where = where
        self.sealed = material is not None and material.mode != "none"
        self.compress = material is not None and material.compress
        self._engine = engine
        self._zstd = crypto.Zstd(self._dictionary) if self.compress else None
        sealing = self._sealing_key() if self.sealed else None
        self._writer = crypto.Sealer(sealing) if sealing else None
        self._readers: dict[int, crypto.Sealer] = {}
        # Public-key mode trains none: a later run could not read an earlier run's dictionary.
        self._learning = writable and self._zstd is not None and material is not None and material.mode != "recipients"
        self._samples: list[bytes] = []
        if self._learning and self._zstd is not None:
            known = self._dictionaries()
            if known:
                self._zstd.use(self._open_dictionary(*known[0]))
                self._learning = False

    # the zstd dictionary

    SAMPLES = 400  # small messages to learn from; until then objects are compressed without one
    SMALL = 100_000

    def learn(self, raws: list[bytes]) -> None:
        """Collect small messages; once there are enough, train the archive's dictionary and use it."""
        if not self._learning or self._zstd is None or self._engine is None:
            return
        self._samples += [raw for raw in raws if len(raw) < self.SMALL]
        if len(self._samples) < self.SAMPLES:
            return
        samples, self._samples, self._learning = self._samples, [], False
        trained = self._zstd.train(samples)
        if trained is None:
            return
        dict_id = self._zstd.dictionary_id(trained)
        stored = self._sealer(0).seal(trained, self._dictionary_associated(dict_id)) if self.sealed else trained
        keys.dictionaries.create(self._engine, checkfirst=True)
        # Committed before any object that needs it.
        with self._engine.begin() as conn:
            conn.execute(keys.dictionaries.insert().values(id=dict_id, data=stored))
        self._zstd.use(trained)

    def _dictionaries(self) -> list[tuple[int, bytes]]:
        assert self._engine is not None
        with self._engine.connect() as conn:
            if not sa.inspect(conn).has_table(keys.dictionaries.name):
                return []
            return [(r.id, r.data) for r in conn.execute(sa.select(keys.dictionaries).order_by(keys.dictionaries.c.id))]

    def _dictionary(self, dict_id: int) -> bytes | None:
        if self._engine is None:
            return None
        found = dict(self._dictionaries()).get(dict_id)
        return None if found is None else self._open_dictionary(dict_id, found)

    def _open_dictionary(self, dict_id: int, stored: bytes) -> bytes:
        if not self.sealed:
            return stored
        opened = crypto.open_or_none(self._sealer(0), stored, self._dictionary_associated(dict_id))
        if opened is None:
            raise ArchiveCorrupt(f"zstd dictionary {dict_id} in {self.where} fails authentication: damaged or altered")
        return opened

    def _dictionary_associated(self, dict_id: int) -> bytes:
        assert self.keys is not None
        return b"mailbackup dictionary v1\0" + self.keys.archive_id + b"\0" + str(dict_id).encode()

    def _sealer(self, key_id: int) -> crypto.Sealer:
        return self._reader(key_id, f"the archive {self.where}")

    def _sealing_key(self) -> bytes | None:
        assert self.keys is not None
        return self.keys.data_key if self.keys.mode == "recipients" else self.keys.read_keys.get(0)

    def name(self, raw: bytes) -> str:
        """The object's name (and the catalog's sha256) for these bytes."""
        if self.sealed:
            assert self.keys is not None and self.keys.naming_key is not None
            return crypto.mac_name(self.keys.naming_key, raw)
        return hashlib.sha256(raw).hexdigest()

    def _associated(self, name: str, header: bytes) -> bytes:
        assert self.keys is not None
        return b"mailbackup object v1\0" + self.keys.archive_id + b"\0" + name.encode() + b"\0" + header

    def encode(self, name: str, raw: bytes) -> bytes:
        data = self._zstd.compress(raw) if self._zstd is not None else raw
        if not self.sealed:
            return data
        assert self.keys is not None and self._writer is not None
        header = HEADER.pack(VERSION, ZSTD if self._zstd else 0, self.keys.data_key_id)
        return header + self._writer.seal(data, self._associated(name, header))

    def decode(self, name: str, data: bytes) -> bytes:
        what = f"object {name} in {self.where}"
        if self.sealed:
            if len(data) < HEADER.size + crypto.NONCE_BYTES + 16:
                raise ArchiveCorrupt(f"{what} is truncated")
            header = data[: HEADER.size]
            version, flags, key_id = HEADER.unpack(header)
            if version != VERSION:
                raise ArchiveCorrupt(f"{what} has format version {version} (want {VERSION}) or is damaged")
            opened = crypto.open_or_none(self._reader(key_id, what), data[HEADER.size :], self._associated(name, header))
            if opened is None:
                raise ArchiveCorrupt(f"{what} fails authentication: damaged or altered")
            return self._zstd.decompress(opened, what) if flags & ZSTD and self._zstd else opened
        return self._zstd.decompress(data, what) if self._zstd is not None else data

    def _reader(self, key_id: int, what: str) -> crypto.Sealer:
        assert self.keys is not None
        if key_id not in self._readers:
            key = self.keys.read_keys.get(key_id)
            if key is None:
                if self.keys.mode == "recipients":
                    raise ArchiveKeyError(f"{what} is sealed to the archive's public key: reading it needs {setting('identity_file')}")
                raise ArchiveCorrupt(f"{what} names data key {key_id}, which the archive does not have")
            self._readers[key_id] = crypto.Sealer(key)
        return self._readers[key_id]


def open_codec(engine: sa.Engine, where: str, *, writable: bool, fresh: bool) -> Codec:
    """The codec of the archive in engine; a writer creates key material in a fresh archive if asked."""
    keyring = keys.ring()
    protection = keyring.source.protection
    wanted = protection.encrypt or protection.compress or bool(protection.recipients)
    if writable and wanted and not keys.exists(engine):
        if not fresh:
            raise UsageError(
                f"{setting('encrypt')}, {setting('compress')} and {setting('recipient')} apply when an archive is created; {where} already holds messages as they are"
            )
        keys.create(engine, protection, keyring, where)
    return Codec(keys.unlock(engine, keyring, where, writable=writable), where, engine, writable=writable)


def content_name(store: object, raw: bytes) -> str:
    """What the catalog records as a message's sha256 in this store (a keyed MAC when encrypted)."""
    codec = getattr(store, "codec", None)
    return codec.name(raw) if isinstance(codec, Codec) else hashlib.sha256(raw).hexdigest()


def named(store: object, message: Message) -> Message:
    """The message as this store records it: an encrypted archive names it by keyed MAC."""
    codec = getattr(store, "codec", None)
    if isinstance(codec, Codec) and codec.sealed:
        from dataclasses import replace

        return replace(message, sha256=codec.name(message.raw))
    return message


def encrypted(store: object) -> bool:
    codec = getattr(store, "codec", None)
    return isinstance(codec, Codec) and codec.sealed
