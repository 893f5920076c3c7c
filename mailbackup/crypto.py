"""The primitives an encrypted archive uses, each from a well-kept library; nothing home-made.

- argon2id (argon2-cffi) turns a passphrase into a key-encryption key;
- AES-256-GCM (cryptography) seals keys and message objects, with associated data
  that binds each ciphertext to its archive and its name;
- HKDF-SHA256 (cryptography) derives the sealing and naming keys from the master key;
- HMAC-SHA256 (stdlib hmac) names objects, so a name cannot be matched against a known message;
- zstd (zstandard) compresses before sealing;
- age X25519 (pyrage) wraps keys to a public key in public-key mode.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ArchiveCorrupt, ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class Argon2Params:
    """RFC 9106's second recommended setting (t=3, 64 MiB, p=4): about 0.1-0.3 s per unlock
    here, paid once per command; 64 MiB per guess makes GPU/ASIC guessing costly while any
    machine that runs a backup can afford it."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 4

    def as_dict(self) -> dict[str, int]:
        return {"t": self.time_cost, "m": self.memory_kib, "p": self.parallelism}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> Argon2Params:
        return cls(int(values["t"]), int(values["m"]), int(values["p"]))


def random_key() -> bytes:
    return os.urandom(KEY_BYTES)


def passphrase_key(passphrase: str, salt: bytes, params: Argon2Params) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(
        passphrase.encode("utf-8"),
        salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=KEY_BYTES,
        type=Type.ID,
    )


def subkey(master: bytes, purpose: str) -> bytes:
    """A key for one purpose, so the sealing key and the naming key never coincide."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=f"mailbackup {purpose} v1".encode()).derive(master)


class Sealer:
    """AES-256-GCM with a fresh random 96-bit nonce per object (prepended)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext; raises InvalidTag when a bit of sealed or associated differs."""
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)


def open_or_none(sealer: Sealer, sealed: bytes, associated: bytes) -> bytes | None:
    from cryptography.exceptions import InvalidTag

    try:
        return sealer.open(sealed, associated)
    except (InvalidTag, ValueError):
        return None


def mac_name(key: bytes, raw: bytes) -> str:
    """An object's name: HMAC-SHA256 in hex, the same shape as a plain SHA-256."""
    return hmac.new(key, raw, hashlib.sha256).hexdigest()


def age_encrypt(data: bytes, recipients: tuple[str, ...]) -> bytes:
    pyrage = _pyrage()
    try:
        keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
    except Exception as exc:
        raise ConfigError(f"not an age X25519 recipient: {exc}") from exc
    return bytes(pyrage.encrypt(data, keys))


def age_decrypt(data: bytes, identities: tuple[str, ...]) -> bytes | None:
    pyrage = _pyrage()
    try:
        keys = [pyrage.x25519.Identity.from_str(i) for i in identities]
    except Exception as exc:
        raise ConfigError(f"not an age X25519 identity: {exc}") from exc
    try:
        return bytes(pyrage.decrypt(data, keys))
    except Exception:
        return None


def _pyrage() -> Any:
    try:
        import pyrage
    except ImportError:
        raise ConfigError("public-key mode needs the 'pyrage' package: pip install 'mailbackup[crypto]'") from None
    return pyrage


class Zstd:
    """zstd level 1. On mail (benchmarks/encrypted.py's corpus) level 3 shrinks text to 0.375
    of its size and level 1 to 0.382, but level 1 is twice as fast on small messages, where
    zstd's per-frame setup dominates; base64 attachments come out at 0.75 either way."""

    LEVEL = 1
    DICTIONARY_BYTES = 64 * 1024

    def __init__(self, dictionary: Callable[[int], bytes | None] = lambda dict_id: None) -> None:
        import zstandard

        self._zstandard = zstandard
        self._compressor = zstandard.ZstdCompressor(level=self.LEVEL)
        self._decompressors = {0: zstandard.ZstdDecompressor()}
        self._dictionary = dictionary  # a dictionary's bytes by its zstd id, from the archive

    def use(self, dictionary: bytes) -> None:
        """Compress with this dictionary from now on (each frame names it by its id)."""
        loaded = self._zstandard.ZstdCompressionDict(dictionary)
        self._compressor = self._zstandard.ZstdCompressor(level=self.LEVEL, dict_data=loaded)
        self._decompressors[loaded.dict_id()] = self._zstandard.ZstdDecompressor(dict_data=loaded)

    def train(self, samples: list[bytes]) -> bytes | None:
        """A dictionary trained on these messages, or None if zstd finds too little to learn from."""
        try:
            return bytes(self._zstandard.train_dictionary(self.DICTIONARY_BYTES, list[bytes | bytearray | memoryview](samples), k=1024, d=8).as_bytes())
        except self._zstandard.ZstdError:
            return None

    def dictionary_id(self, dictionary: bytes) -> int:
        return int(self._zstandard.ZstdCompressionDict(dictionary).dict_id())

    def compress(self, raw: bytes) -> bytes:
        return self._compressor.compress(raw)

    def decompress(self, data: bytes, what: str) -> bytes:
        try:
            dict_id = self._zstandard.get_frame_parameters(data).dict_id
            if dict_id not in self._decompressors:
                found = self._dictionary(dict_id)
                if found is None:
                    raise ArchiveCorrupt(f"{what} needs zstd dictionary {dict_id}, which the archive does not have")
                self._decompressors[dict_id] = self._zstandard.ZstdDecompressor(
                    dict_data=self._zstandard.ZstdCompressionDict(found)
                )
            return self._decompressors[dict_id].decompress(data)
        except self._zstandard.ZstdError as exc:
            raise ArchiveCorrupt(f"{what} does not decompress ({exc})") from exc
