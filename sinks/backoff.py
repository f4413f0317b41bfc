"""Retry timing as an immutable value: exponential backoff, jitter, deadline.

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

The one policy serves every retry in Sluice: the stream sinks' records (full
jitter, a deadline), access control's reconnects to Redis (`EQUAL_JITTER`,
so a fleet of gateways does not reconnect in step, and no deadline) and the
supervisor's restarts of a crashed worker (`NO_JITTER`, no deadline).  With
``jitter`` *j* the delay is ``min(cap, b * 2**i) * (1 - j + j * u)``.
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
    "FULL_JITTER",
    "EQUAL_JITTER",
    "NO_JITTER",
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

#: Shares of the delay that are random: all of it (spreads retries best), half
#: of it (never retries sooner than half the ceiling), none (a fixed schedule).
FULL_JITTER = 1.0
EQUAL_JITTER = 0.5
NO_JITTER = 0.0

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
    the deadline as the only bound, and a ``deadline`` of None retries for
    ever.  ``jitter`` is the random share of each delay (`FULL_JITTER`,
    `EQUAL_JITTER`, `NO_JITTER`).  ``attempts`` and ``started`` are state:
    use `start` and `decide` rather than setting them.
    """

    base: float = DEFAULT_BASE
    throttled_base: float = DEFAULT_THROTTLED_BASE
    cap: float = DEFAULT_CAP
    deadline: Optional[float] = DEFAULT_DEADLINE
    max_attempts: Optional[int] = None
    jitter: float = FULL_JITTER
    attempts: int = 0
    started: Optional[float] = None

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.throttled_base > 0 and self.cap > 0):
            raise ValueError("backoff bases and cap must be positive")
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError("deadline must be positive")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
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
        if self.started is None or self.deadline is None:
            return None
        return self.started + self.deadline

    def ceiling(self, *, throttled: bool = False, failed: Optional[int] = None) -> float:
        """Upper bound of the next delay (before any retry-after hint).

        ``failed``: after that many failed attempts in a row rather than
        this policy's own count, for a caller that keeps the count itself.
        """
        base = self.throttled_base if throttled else self.base
        doublings = self.attempts if failed is None else max(0, failed - 1)
        return min(self.cap, math.ldexp(base, min(doublings, _MAX_DOUBLINGS)))

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
        jitter = self.jitter
        delay = self.ceiling(throttled=throttled) * (1.0 - jitter + jitter * u)
        if retry_after is not None and retry_after > delay:
            delay = min(retry_after, delay + RETRY_AFTER_MAX_EXTRA)
        at = now + delay
        if self.deadline is not None and at > self.started + self.deadline:
            return GiveUp(GIVE_UP_DEADLINE, failed, elapsed)
        return Retry(delay, at, replace(self, attempts=failed))
