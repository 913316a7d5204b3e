"""The one backoff schedule every retry loop waits by (batches, undo, enforce, scan pages):
exponential, capped, jittered so that workers that failed together do not retry together."""

from __future__ import annotations

import random

import anyio

# (base, cap) in seconds for the kinds of retry there are.
BATCH = (0.05, 2.0)  # a batch transaction: locks and races clear in milliseconds
PAGE = (0.2, 5.0)  # a scan page after a lost connection
BUILD = (0.2, 5.0)  # enforce: the next CREATE INDEX attempt
DDL_LOCK = (0.5, 10.0)  # enforce: the next try for an ACCESS EXCLUSIVE lock


def backoff(attempt: int, schedule: tuple[float, float], *, jitter: bool = True) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first failure)."""
    base, cap = schedule
    delay = min(base * 2.0 ** max(attempt, 0), cap)
    return delay * (0.5 + random.random()) if jitter else delay


async def wait(attempt: int, schedule: tuple[float, float], *, jitter: bool = True) -> float:
    """Sleep the backoff of `attempt`; returns how long."""
    delay = backoff(attempt, schedule, jitter=jitter)
    await anyio.sleep(delay)
    return delay
