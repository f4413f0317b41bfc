"""Retry timing as an immutable value: exponential backoff, full jitter, deadline.

Theory of operation
-------------------
A `RetryPolicy` holds the configuration (bases, cap, deadline, attempt
limit) and the state of one send (when its first attempt started, how many
attempts failed).  Like urllib3's ``Retry`` it is never changed in place, and
unlike it, it never sleeps or reads a clock: the caller passes ``now`` and a
random value, so tests need neither sleeping nor seeding globals.

    policy = RetryPolicy().start(now)
    ...the attempt fails...
    decision = policy.decide(now, rng, throttled=True)
    if isinstance(decision, GiveUp): drop or dead-letter the records
    else: wait decision.delay, resend, and keep decision.policy

The delay after failed attempt *i* (0-based) is ``u * min(cap, b * 2**i)``
with ``u`` uniform in [0, 1] ("full jitter", from the AWS Architecture Blog's
"Exponential Backoff And Jitter", also botocore's standard retry mode), where
``b`` is ``throttled_base`` for throttling and ``base`` otherwise.  A retry
that would start after the deadline is not offered: the records are given up
while there is still time to say so.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Optional, Union

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_THROTTLED_BASE",
    "DEFAULT_CAP",
    "DEFAULT_DEADLINE",
    "RETRY_AFTER_MAX_EXTRA",
    "GIVE_UP_ATTEMPTS",
    "GIVE_UP_DEADLINE",
    "RetryPolicy",
    "Retry",
    "GiveUp",
]

# botocore standard retry mode: 50 ms base for errors other than throttling.
DEFAULT_BASE = 0.05

# botocore standard retry mode: 1 s base for throttling; Kinesis shard
# limits are per second, so sooner retries mostly meet the same limit.
DEFAULT_THROTTLED_BASE = 1.0

# Longest single wait.  botocore caps at 20 s; a gateway whose ring fills
# while it waits wants to probe again within a few seconds.
DEFAULT_CAP = 5.0

# Seconds from the first attempt until the records are given up: the Kinesis
# Producer Library's default RecordTtl is 30000 ms.
DEFAULT_DEADLINE = 30.0

# botocore honours a service's x-amz-retry-after up to 5 s past its own delay.
RETRY_AFTER_MAX_EXTRA = 5.0

# Past this many doublings the cap wins for any base and cap worth using, and
# the power of two would overflow a float long after that.
_MAX_DOUBLINGS = 64

GIVE_UP_ATTEMPTS = "attempts"
GIVE_UP_DEADLINE = "deadline"

RandomSource = Union[float, random.Random]


@dataclass(frozen=True)
class Retry:
    """Wait ``delay`` seconds (until ``at``), resend, then use ``policy``."""

    delay: float
    at: float
    policy: RetryPolicy


@dataclass(frozen=True)
class GiveUp:
    """Stop retrying; ``reason`` is `GIVE_UP_DEADLINE` or `GIVE_UP_ATTEMPTS`."""

    reason: str
    attempts: int
    elapsed: float


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff configuration plus the state of one send.

    ``max_attempts`` counts every attempt including the first; None leaves
    the deadline as the only bound.  ``attempts`` and ``started`` are state:
    use `start` and `decide` rather than setting them.
    """

    base: float = DEFAULT_BASE
    throttled_base: float = DEFAULT_THROTTLED_BASE
    cap: float = DEFAULT_CAP
    deadline: float = DEFAULT_DEADLINE
    max_attempts: Optional[int] = None
    attempts: int = 0
    started: Optional[float] = None

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.throttled_base > 0 and self.cap > 0):
            raise ValueError("backoff bases and cap must be positive")
        if not self.deadline > 0:
            raise ValueError("deadline must be positive")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.attempts < 0:
            raise ValueError("attempts cannot be negative")

    def start(self, now: float) -> RetryPolicy:
        """The policy for a send whose first attempt starts at *now*."""
        return replace(self, attempts=0, started=now)

    @property
    def deadline_at(self) -> Optional[float]:
        """When the records are given up, once started."""
        return None if self.started is None else self.started + self.deadline

    def ceiling(self, *, throttled: bool = False) -> float:
        """Upper bound of the next delay (before any retry-after hint)."""
        base = self.throttled_base if throttled else self.base
        return min(self.cap, math.ldexp(base, min(self.attempts, _MAX_DOUBLINGS)))

    def decide(
        self,
        now: float,
        rand: RandomSource,
        *,
        throttled: bool = False,
        retry_after: Optional[float] = None,
    ) -> Union[Retry, GiveUp]:
        """Decide what follows the attempt that just failed at *now*.

        *rand* is a float in [0, 1] or a ``random.Random``.  *retry_after*
        is a server's hint in seconds: the delay is raised towards it, by at
        most `RETRY_AFTER_MAX_EXTRA`.
        """
        if self.started is None:
            raise ValueError("call start(now) before the first attempt")
        failed = self.attempts + 1
        elapsed = now - self.started
        if self.max_attempts is not None and failed >= self.max_attempts:
            return GiveUp(GIVE_UP_ATTEMPTS, failed, elapsed)
        u = rand.random() if isinstance(rand, random.Random) else float(rand)
        if not 0.0 <= u <= 1.0:
            raise ValueError(f"random value must be in [0, 1], got {u!r}")
        delay = u * self.ceiling(throttled=throttled)
        if retry_after is not None and retry_after > delay:
            delay = min(retry_after, delay + RETRY_AFTER_MAX_EXTRA)
        at = now + delay
        if at > self.started + self.deadline:
            return GiveUp(GIVE_UP_DEADLINE, failed, elapsed)
        return Retry(delay, at, replace(self, attempts=failed))
