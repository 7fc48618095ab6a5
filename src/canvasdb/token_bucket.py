"""A token bucket: what a client may do at a sustained rate, after a burst (its pings, its updates)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held (it starts full)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self._at = float(burst), time.monotonic()

    def try_take(self, n: float = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them; False (and nothing taken) if not."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    async def take(self, n: float = 1) -> None:
        """Wait until the bucket holds ``n`` tokens, then take them (more than ``burst`` it
        never holds: refused, rather than waited for forever)."""
        if n > self.burst:
            raise ValueError(f"{n} tokens at once from a bucket of {self.burst}")
        while not self.try_take(n):
            await asyncio.sleep((n - self.tokens) / self.rate)
