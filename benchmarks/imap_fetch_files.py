"""Reference A of the benchmark: a minimal imaplib client.

Per folder: EXAMINE, one ``UID FETCH 1:* (BODY.PEEK[])``, each message written to
its own file (no fsync), streamed literal by literal so memory stays flat.

    IMAP_PASSWORD=... python benchmarks/imap_fetch_files.py HOST PORT USER OUTDIR
    IMAP_PASSWORD=... python benchmarks/imap_fetch_files.py HOST PORT USER OUTDIR --stock
    IMAP_PASSWORD=... python benchmarks/imap_fetch_files.py HOST PORT USER --discard [ITEMS]

--stock uses imaplib's own ``uid("FETCH", "1:*", "(BODY.PEEK[])")``, which holds a
folder's whole response in memory before the files are written (the reference A of
the targets); without it the response is streamed literal by literal.

Prints one JSON line: {"messages": N, "bytes": B, "folders": F}.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import sys

LIST_RE = re.compile(rb'^\((?P<attrs>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')
LITERAL_RE = re.compile(rb"\{(\d+)\}\r\n$")


def _unquote(name: bytes) -> bytes:
    if name.startswith(b'"') and name.endswith(b'"'):
        return re.sub(rb"\\(.)", rb"\1", name[1:-1])
    return name


def list_folders(imap: imaplib.IMAP4) -> list[bytes]:
    status, data = imap.list()
    if status != "OK":
        raise RuntimeError(f"LIST failed: {data!r}")
    names = []
    for line in data:
        if isinstance(line, tuple):  # name sent as a literal
            attrs, name = line[0].split(b")")[0], line[1]
        else:
            match = LIST_RE.match(line)
            if not match:
                raise RuntimeError(f"unparsed LIST line {line!r}")
            attrs, name = match["attrs"], _unquote(match["name"])
        if b"\\noselect" in attrs.lower() or b"\\nonexistent" in attrs.lower():
            continue
        names.append(name)
    return names


def fetch_folder(imap: imaplib.IMAP4, folder: bytes, outdir: str | None,
                 items: str = "BODY.PEEK[]") -> tuple[int, int]:
    """Stream one UID FETCH 1:*; write each literal to OUTDIR/<uid> (or discard)."""
    quoted = b'"' + folder.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    status, data = imap._simple_command("EXAMINE", quoted.decode("ascii"))
    if status != "OK":
        raise RuntimeError(f"EXAMINE {folder!r} failed: {data!r}")
    imap.state = "SELECTED"
    exists = int(imap.untagged_responses.get("EXISTS", [b"0"])[-1])
    imap.untagged_responses.clear()
    if exists == 0:
        return 0, 0
    tag = imap._new_tag()
    imap.send(tag + b" UID FETCH 1:* (" + items.encode() + b")\r\n")
    count = size = 0
    while True:
        line = imap.readline()
        if not line:
            raise RuntimeError("connection closed during FETCH")
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1:].startswith(b"OK"):
                raise RuntimeError(f"FETCH failed: {line!r}")
            break
        while True:  # one response may carry several literals
            match = LITERAL_RE.search(line)
            if not match:
                break
            body = imap.read(int(match.group(1)))
            uid = re.search(rb"UID (\d+)", line)
            if outdir is not None and b"BODY[]" in line:
                name = uid.group(1).decode() if uid else str(count + 1)
                with open(os.path.join(outdir, name), "wb") as handle:
                    handle.write(body)
            count += 1
            size += len(body)
            line = imap.readline()
    return count, size


def fetch_folder_stock(imap: imaplib.IMAP4, folder: bytes, outdir: str) -> tuple[int, int]:
    """Plain imaplib: ``imap.uid("FETCH", "1:*", ...)`` buffers the folder's whole response."""
    quoted = b'"' + folder.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    status, data = imap.select(quoted.decode("ascii"), readonly=True)
    if status != "OK":
        raise RuntimeError(f"EXAMINE {folder!r} failed: {data!r}")
    if int(data[0]) == 0:
        return 0, 0
    status, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    if status != "OK":
        raise RuntimeError(f"FETCH failed: {data!r}")
    count = size = 0
    for item in data:
        if isinstance(item, tuple):
            uid = re.search(rb"UID (\d+)", item[0])
            name = uid.group(1).decode() if uid else str(count + 1)
            with open(os.path.join(outdir, name), "wb") as handle:
                handle.write(item[1])
            count += 1
            size += len(item[1])
    return count, size


def run(host: str, port: int, user: str, password: str, outdir: str | None,
        items: str = "BODY.PEEK[]", stock: bool = False) -> dict[str, int]:
    imap = imaplib.IMAP4(host, port)
    imap.login(user, password)
    total = total_bytes = 0
    folders = list_folders(imap)
    for index, folder in enumerate(folders):
        target = None
        if outdir is not None:
            target = os.path.join(outdir, f"{index:03d}")
            os.makedirs(target)
            with open(os.path.join(target, ".name"), "wb") as handle:
                handle.write(folder)
        if stock and target is not None:
            count, size = fetch_folder_stock(imap, folder, target)
        else:
            count, size = fetch_folder(imap, folder, target, items)
        total += count
        total_bytes += size
    imap.logout()
    return {"messages": total, "bytes": total_bytes, "folders": len(folders)}


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, user, out = argv[0], int(argv[1]), argv[2], argv[3]
    password = os.environ["IMAP_PASSWORD"]
    if out == "--discard":
        items = argv[4] if len(argv) > 4 else "BODY.PEEK[]"
        result = run(host, port, user, password, None, items)
    else:
        result = run(host, port, user, password, out, stock="--stock" in argv[4:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
