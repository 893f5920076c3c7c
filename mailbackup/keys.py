"""An archive's keys: a random master key in key slots, each slot wrapped by one passphrase.

Passphrase mode: the master key M opens everything. HKDF gives from M the sealing key
(AES-256-GCM over each object) and the naming key (HMAC-SHA256 names). Each slot holds
M sealed under argon2id(passphrase); changing a passphrase rewrites one slot, no message.

Public-key mode (recipients): the backup machine must write what it cannot read. The
naming key N is random; it is sealed to the recipients (age) and, in "append" slots, under
the backup machine's own passphrase. Each run seals its objects with a fresh data key that
is stored only sealed to the recipients, so the backup machine forgets it when the run ends.

Where the secrets come from is a KeySource, which the CLI sets for the command with
`using(...)`, or a server holds as a KeyRing and passes to each store it opens
(open_store(..., key_ring=...)); stores look it up when they open an encrypted archive.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from . import crypto
from .catalog import new_id, now_iso
from .credentials import Login, resolve_secret
from .errors import ArchiveKeyError, ConfigError, UsageError, WrongPassphrase, setting

FORMAT = "1"  # the object format: version byte 1, see stores/codec.py

key_metadata = sa.MetaData()
crypt_meta = sa.Table(
    "crypt_meta",
    key_metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
key_slots = sa.Table(
    "key_slots",
    key_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),  # "passphrase" | "append" | "age"
    sa.Column("params", sa.Text, nullable=False),  # argon2id parameters as JSON
    sa.Column("salt", sa.LargeBinary, nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)
# A zstd dictionary trained on the archive's first small messages; sealed like an object
# in passphrase mode (it is made of their words), as it is in a compressed-only archive.
dictionaries = sa.Table(
    "zstd_dictionaries",
    key_metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),  # zstd's dictionary id
    sa.Column("data", sa.LargeBinary, nullable=False),
)
data_keys = sa.Table(
    "data_keys",
    key_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),  # age-encrypted to the recipients
)


@dataclass(frozen=True)
class Protection:
    """How a new archive is to be written (ignored once it exists)."""

    encrypt: bool = False
    compress: bool = False
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeySource:
    """Where the secrets for encrypted archives come from; never a secret itself."""

    passphrase: Login = field(default_factory=lambda: Login(password_env="MAILBACKUP_PASSPHRASE"))
    prompt: Callable[[], str] | None = None
    identity_file: str | None = None
    new_passphrase: Login | None = None  # key add/change
    new_prompt: Callable[[], str] | None = None
    protection: Protection = Protection()


class KeyRing:
    """A KeySource and what it has unlocked so far: the passphrase asked once, each slot opened once.

    One lives as long as its holder (a command's `using`, a server) and dies with it, so nothing
    is cached for the process; it is safe to share between threads (a server's workers).
    """

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self._lock = threading.RLock()  # one prompt and one argon2id run, whichever thread asks first
        self._passphrase: str | None = None
        # Slots already opened, so that argon2id (about a second here) runs once per archive
        # and holder, not at every open of the store.
        self._opened: dict[tuple[bytes, str], tuple[int, bytes]] = {}

    def passphrase(self, what: str) -> str:
        with self._lock:
            if self._passphrase is None:
                self._passphrase = _resolve_passphrase(self.source, what)
            return self._passphrase

    def open_slot(self, conn: sa.Connection, archive_id: bytes, kind: str, where: str) -> bytes:
        """The key a slot of this kind holds for the source's passphrase."""
        with self._lock:
            if (archive_id, kind) not in self._opened:
                self._opened[archive_id, kind] = _open_slot(conn, archive_id, kind, self.passphrase(where), where)
            return self._opened[archive_id, kind][1]

    def remember(self, archive_id: bytes, kind: str, opened: tuple[int, bytes]) -> None:
        with self._lock:
            self._opened[archive_id, kind] = opened

    def forget(self) -> None:
        with self._lock:
            self._passphrase = None
            self._opened.clear()


_current: contextvars.ContextVar[KeyRing | None] = contextvars.ContextVar("mailbackup_keys", default=None)


@contextmanager
def using(source: KeySource | KeyRing) -> Iterator[KeyRing]:
    """Run with these keys: stores opened inside look them up. A ring made here is forgotten on exit;
    the ring in force serves again for its own source (an account that has no keys of its own)."""
    ring = _ring(source)
    made = ring is not source and ring is not _current.get()
    token = _current.set(ring)
    try:
        yield ring
    finally:
        _current.reset(token)
        if made:
            ring.forget()


def current() -> KeySource:
    found = _current.get()
    return found.source if found is not None else KeySource()


def ring() -> KeyRing:
    """The ring in force, or a new one that caches for its caller only (never for the process)."""
    return _current.get() or KeyRing(KeySource())


def _ring(source: KeySource | KeyRing) -> KeyRing:
    """The active ring when it holds this very source (its cache serves), else a ring of its own."""
    if isinstance(source, KeyRing):
        return source
    active = _current.get()
    return active if active is not None and active.source is source else KeyRing(source)


def _resolve_passphrase(source: KeySource, what: str) -> str:
    try:
        return resolve_secret(source.passphrase, what=what, prompt=source.prompt)
    except ConfigError as exc:
        if source.passphrase.password_file or source.passphrase.password_command:
            raise
        raise ArchiveKeyError(
            f"{what} is encrypted: give {setting('passphrase_file')}, {setting('passphrase_command')} or MAILBACKUP_PASSPHRASE"
        ) from exc


def passphrase(source: KeySource | KeyRing, what: str) -> str:
    return _ring(source).passphrase(what)


def new_passphrase(source: KeySource | KeyRing) -> str:
    source = source.source if isinstance(source, KeyRing) else source
    if source.new_passphrase is None and source.new_prompt is None:
        raise UsageError(f"give the new passphrase with {setting('new_passphrase_file')} or {setting('new_passphrase_command')}")
    login = source.new_passphrase or Login(password_env="MAILBACKUP_NEW_PASSPHRASE")
    return resolve_secret(login, what="the new passphrase", prompt=source.new_prompt)


def identities(source: KeySource) -> tuple[str, ...]:
    if source.identity_file is None:
        return ()
    try:
        text = Path(source.identity_file).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read identity file {source.identity_file}: {exc.strerror}") from exc
    found = tuple(line.strip() for line in text.splitlines() if line.strip().startswith("AGE-SECRET-KEY-"))
    if not found:
        raise ConfigError(f"{source.identity_file} holds no age identity (AGE-SECRET-KEY-...)")
    return found


def recipients_from(values: tuple[str, ...]) -> tuple[str, ...]:
    """--recipient takes a key (age1...) or a file of them, one a line."""
    found: list[str] = []
    for value in values:
        if value.startswith("age1"):
            found.append(value)
            continue
        try:
            lines = Path(value).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{setting('recipient')} {value}: neither an age1... key nor a readable file ({exc.strerror})") from exc
        found += [line.strip() for line in lines if line.strip().startswith("age1")]
    if values and not found:
        raise ConfigError(f"{setting('recipient')} gave no age1... public key")
    return tuple(found)


# the archive's key material


@dataclass(frozen=True)
class Keys:
    """What one open archive knows: its id, and the keys this machine could unlock."""

    archive_id: bytes
    mode: str  # "none" (compression only), "passphrase" or "recipients"
    compress: bool
    naming_key: bytes | None
    master: bytes | None = None  # passphrase mode
    data_key_id: int = 0  # public-key mode: this run's data key (0: the master's sealing key)
    data_key: bytes | None = None
    read_keys: dict[int, bytes] = field(default_factory=dict)  # id -> sealing key this machine can open


def _meta(conn: sa.Connection) -> dict[str, str]:
    if not sa.inspect(conn).has_table("crypt_meta"):
        return {}
    return {k: v for k, v in conn.execute(sa.select(crypt_meta.c.key, crypt_meta.c.value))}


def slot_associated(archive_id: bytes, kind: str) -> bytes:
    return b"mailbackup key slot v1\0" + archive_id + b"\0" + kind.encode()


def _new_slot(conn: sa.Connection, archive_id: bytes, kind: str, secret: str, key: bytes) -> int:
    params = crypto.Argon2Params()
    salt = os.urandom(16)
    wrapped = crypto.Sealer(crypto.passphrase_key(secret, salt, params)).seal(key, slot_associated(archive_id, kind))
    result = conn.execute(
        key_slots.insert().values(kind=kind, params=json.dumps(params.as_dict()), salt=salt, wrapped=wrapped, created_at=now_iso())
    )
    return new_id(result)


def create(engine: sa.Engine, protection: Protection, source: KeySource | KeyRing, where: str) -> None:
    """Give a new archive its key material (or only its compression), in one transaction."""
    keyring = _ring(source)
    archive_id = os.urandom(16)
    mode = "recipients" if protection.recipients else "passphrase" if protection.encrypt else "none"
    key_metadata.create_all(engine)
    with engine.begin() as conn:
        rows = {"format": FORMAT, "archive_id": archive_id.hex(), "mode": mode,
                "compression": "zstd" if protection.compress or mode != "none" else "none"}
        if mode == "passphrase":
            master = crypto.random_key()
            slot = _new_slot(conn, archive_id, "passphrase", keyring.passphrase(where), master)
            keyring.remember(archive_id, "passphrase", (slot, master))
        elif mode == "recipients":
            naming = crypto.random_key()
            rows["recipients"] = "\n".join(protection.recipients)
            conn.execute(key_slots.insert().values(
                kind="age", params="{}", salt=b"",
                wrapped=crypto.age_encrypt(naming, protection.recipients), created_at=now_iso()))
            slot = _new_slot(conn, archive_id, "append", keyring.passphrase(where), naming)
            keyring.remember(archive_id, "append", (slot, naming))
        conn.execute(crypt_meta.insert(), [{"key": k, "value": v} for k, v in rows.items()])


def exists(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return bool(_meta(conn))


def _try_slots(conn: sa.Connection, archive_id: bytes, kinds: tuple[str, ...], secret: str) -> tuple[int, bytes] | None:
    """The slot id and key that `secret` opens, trying each slot of these kinds."""
    rows = conn.execute(sa.select(key_slots).where(key_slots.c.kind.in_(kinds)).order_by(key_slots.c.id)).all()
    for row in rows:
        kek = crypto.passphrase_key(secret, row.salt, crypto.Argon2Params.from_dict(json.loads(row.params)))
        key = crypto.open_or_none(crypto.Sealer(kek), row.wrapped, slot_associated(archive_id, row.kind))
        if key is not None:
            return row.id, key
    return None


def _open_slot(conn: sa.Connection, archive_id: bytes, kind: str, secret: str, where: str) -> tuple[int, bytes]:
    """The slot id and key that `secret` opens among the slots of this kind; else WrongPassphrase."""
    opened = _try_slots(conn, archive_id, (kind,), secret)
    if opened is None:
        raise WrongPassphrase(f"wrong passphrase for {where}")
    return opened


def unlock(engine: sa.Engine, source: KeySource | KeyRing, where: str, *, writable: bool) -> Keys | None:
    """The keys of an archive, or None if it has no key material (a plain archive)."""
    keyring = _ring(source)
    with engine.connect() as conn:
        meta = _meta(conn)
        if not meta:
            return None
        if meta["format"] != FORMAT:
            raise ArchiveKeyError(f"{where}: object format {meta['format']} is not supported (want {FORMAT})")
        archive_id = bytes.fromhex(meta["archive_id"])
        mode = meta["mode"]
        compress = meta["compression"] == "zstd"
        if mode == "none":
            return Keys(archive_id, mode, compress, None)
        if mode == "passphrase":
            master = keyring.open_slot(conn, archive_id, "passphrase", where)
            return Keys(archive_id, mode, compress, crypto.subkey(master, "names"), master,
                        read_keys={0: crypto.subkey(master, "objects")})
        return _unlock_recipients(engine, conn, meta, archive_id, keyring, where, writable)


def _unlock_recipients(
    engine: sa.Engine, conn: sa.Connection, meta: dict[str, str], archive_id: bytes, keyring: KeyRing, where: str, writable: bool
) -> Keys:
    ids = identities(keyring.source)
    naming: bytes | None = None
    read_keys: dict[int, bytes] = {}
    if ids:
        for row in conn.execute(sa.select(key_slots.c.wrapped).where(key_slots.c.kind == "age")):
            naming = naming or crypto.age_decrypt(row.wrapped, ids)
        if naming is None:
            raise WrongPassphrase(f"the identity file does not open {where}")
        for row in conn.execute(sa.select(data_keys)):
            key = crypto.age_decrypt(row.wrapped, ids)
            if key is None:
                raise WrongPassphrase(f"the identity file does not open data key {row.id} of {where}")
            read_keys[row.id] = key
    elif writable:
        naming = keyring.open_slot(conn, archive_id, "append", where)
    else:
        raise ArchiveKeyError(f"{where} is encrypted to a public key: reading it needs {setting('identity_file')}")
    data_key_id, data_key = 0, None
    if writable:
        data_key = crypto.random_key()
        recipients = tuple(meta["recipients"].split())
        with engine.begin() as write:
            result = write.execute(data_keys.insert().values(wrapped=crypto.age_encrypt(data_key, recipients)))
            data_key_id = new_id(result)
        read_keys[data_key_id] = data_key
    return Keys(archive_id, "recipients", meta["compression"] == "zstd", naming, None, data_key_id, data_key, read_keys)


# key list|add|change|remove


@dataclass(frozen=True)
class Slot:
    id: int
    kind: str
    params: str
    created_at: str

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "kdf": self.params, "created_at": self.created_at}


def _passphrase_kind(meta: dict[str, str], where: str) -> str:
    if meta.get("mode") == "passphrase":
        return "passphrase"
    if meta.get("mode") == "recipients":
        return "append"
    raise UsageError(f"{where} is not encrypted: it has no key slots")


def list_slots(engine: sa.Engine, where: str) -> list[Slot]:
    with engine.connect() as conn:
        _passphrase_kind(_meta(conn), where)
        rows = conn.execute(sa.select(key_slots).order_by(key_slots.c.id)).all()
    return [Slot(r.id, r.kind, "argon2id " + r.params if r.kind != "age" else "age X25519", r.created_at) for r in rows]


def _new_slot_for(conn: sa.Connection, source: KeySource | KeyRing, where: str) -> tuple[int, int]:
    """A slot for the new passphrase holding the key the current one opens: (the opened slot's id, the new one's)."""
    meta = _meta(conn)
    kind = _passphrase_kind(meta, where)
    archive_id = bytes.fromhex(meta["archive_id"])
    slot, key = _open_slot(conn, archive_id, kind, passphrase(source, where), where)
    return slot, _new_slot(conn, archive_id, kind, new_passphrase(source), key)


def add_slot(engine: sa.Engine, source: KeySource | KeyRing, where: str) -> int:
    """A new slot for a new passphrase, proved by the current one."""
    with engine.begin() as conn:
        return _new_slot_for(conn, source, where)[1]


def change_slot(engine: sa.Engine, source: KeySource | KeyRing, where: str) -> int:
    """Replace the slot the current passphrase opens by one for the new passphrase; returns the new id."""
    with engine.begin() as conn:
        old_id, new_id = _new_slot_for(conn, source, where)
        conn.execute(key_slots.delete().where(key_slots.c.id == old_id))
        return new_id


def remove_slot(engine: sa.Engine, source: KeySource | KeyRing, where: str, slot_id: int) -> None:
    """Remove a slot, proved by a passphrase; never the last one that opens the archive."""
    with engine.begin() as conn:
        meta = _meta(conn)
        kind = _passphrase_kind(meta, where)
        archive_id = bytes.fromhex(meta["archive_id"])
        ids = [r.id for r in conn.execute(sa.select(key_slots.c.id).where(key_slots.c.kind == kind))]
        if slot_id not in ids:
            raise UsageError(f"{where} has no passphrase slot {slot_id} (see 'mailbackup key list')")
        if len(ids) == 1:
            raise UsageError(f"slot {slot_id} is the last passphrase slot of {where}; add another before removing it")
        _open_slot(conn, archive_id, kind, passphrase(source, where), where)
        conn.execute(key_slots.delete().where(key_slots.c.id == slot_id))
