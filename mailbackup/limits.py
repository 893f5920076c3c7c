"""Provider limits a run keeps to by itself: a bandwidth cap and a daily byte budget.

Google, for one, suspends IMAP access for a day when an account downloads more than
2,500 MB in a day; staying under a budget of our own is cheaper than hitting theirs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .errors import ProviderLimit, UsageError, setting


def utc_day() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


@dataclass
class DailyBudget:
    """Bytes a source may send per UTC day (max_bytes_per_day); `used` starts at what the catalog recorded."""

    limit: int
    used: int
    day: str = field(default_factory=utc_day)

    def reserve(self, size: int) -> None:
        """Claim size bytes before asking for them; ProviderLimit when they would go over."""
        if self.used + size > self.limit:
            raise ProviderLimit(
                f"daily byte budget reached (max_bytes_per_day {self.limit} bytes; {self.used} fetched on {self.day} UTC); "
                "what was stored is kept; rerun tomorrow to go on"
            )
        self.used += size


class TokenBucket:
    """At most `rate` bytes a second on average (--max-rate), in bursts of up to one second's worth."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise UsageError(f"{setting('max_rate')} needs a number of bytes per second > 0")
        self.rate = rate
        self.tokens = rate
        self.clock, self.sleep = clock, sleep
        self.last = clock()
        self.lock = threading.Lock()

    def take(self, size: int) -> None:
        """Account for size bytes just read; sleep until the average is back under the rate."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= size
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            self.sleep(wait)
