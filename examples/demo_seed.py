"""Fill a demo account with sample mail: nested and non-ASCII folders, flags, dates."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.corpus.tricky import tricky_messages  # noqa: E402
from tests.servers.dovecot import Dovecot  # noqa: E402


def main(directory: str, user: str, password: str) -> None:
    server = Dovecot.attach(directory)
    account = server.account(user, password)
    folders = ["INBOX", "Sent", "Archive/2023", "Archive/2024", "Entwürfe"]
    samples = [p.read_bytes() for p in sorted((ROOT / "tests/corpus/mikel-mail").glob("**/*.eml"))]
    samples += list(tricky_messages().values())
    when = datetime(2023, 1, 1, 9, 0, tzinfo=timezone.utc)
    flags = [("\\Seen",), ("\\Seen", "\\Flagged"), (), ("\\Seen", "\\Answered", "$Forwarded"), ("Project-X",)]
    for i, raw in enumerate(samples):
        server.append(account, folders[i % len(folders)], raw, flags[i % len(flags)], when + timedelta(hours=7 * i))
    print(f"seeded {len(samples)} messages into {len(folders)} folders for {user}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
