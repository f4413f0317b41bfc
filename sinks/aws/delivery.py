"""Which records go into the next call, and what each response means for them.

Theory of operation
-------------------
`Delivery` is the bookkeeping of the Kinesis and Firehose sinks without any
I/O: the Trio driver (``sinks.aws.sink``) asks it what to send and tells it
what came back, passing the clock and the random draws in.

Each record the sink holds is an `Entry`, in one of these states (everything
that moves an entry lives in ``_TRANSITIONS``)::

    QUEUED --send--> SENDING --store--> STORED
      ^                 |
      +-----wake---- BACKOFF <--retry--+
    QUEUED, SENDING, BACKOFF --give_up--> GIVEN_UP
    QUEUED, SENDING, BACKOFF --abandon--> ABANDONED

* New entries join the back of the send queue.  Entries whose backoff is
  over rejoin at the front, in their original order, so a retried record is
  not overtaken by the records that arrived while it waited.
* `send_at` says when the next call should start: at once when a full batch
  is queued or the sink is closing, otherwise when the oldest queued entry
  has waited ``linger`` seconds; never before a pause (set after a failed
  call, so a struggling endpoint is not hammered) ends.
* `take` moves entries from the front of the queue into a batch until it is
  full, through a caller-given ``add`` (the batch's admission check).
* `settle` reads a parsed response: stored entries are done, entries whose
  error is retryable go to BACKOFF with the delay their `RetryPolicy` gives,
  or are given up once their deadline would pass; a permanent error gives
  up its entries and is reported so the driver can stop the sink.  `fail`
  does the same for a call that failed as a whole.
* An entry's deadline counts from its arrival; `expire` gives up queued or
  backing-off entries whose deadline has passed.  An entry already in a call
  waits for that call's outcome, which can still store it.
* ``ABANDONED`` entries belong to a client that went away before the outcome:
  they are never sent (again), and the caller gives their ring space back.

Dead entries (given up or abandoned while queued) stay in the queue until
they reach its front and are skipped there, so giving up is O(1).
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from sinks.aws.errors import MalformedResponse, ServiceError, ThrottledError, TransientError
from sinks.aws.putrecords import PutRecordsResult, RecordRejected, RecordResult
from sinks.backoff import GiveUp, RetryPolicy

__all__ = [
    "QUEUED",
    "SENDING",
    "BACKOFF",
    "STORED",
    "GIVEN_UP",
    "ABANDONED",
    "Entry",
    "Delivery",
    "Settled",
    "QueueFull",
    "EntryStateError",
    "DeadlinePassed",
    "RETRY_REASONS",
    "MAX_THROTTLE_CODES",
]

QUEUED = "queued"
SENDING = "sending"
BACKOFF = "backoff"
STORED = "stored"
GIVEN_UP = "given_up"
ABANDONED = "abandoned"

_LIVE = (QUEUED, SENDING, BACKOFF)

#: Why a record is sent again (`Delivery.retry_reasons`): the service
#: throttled it, answered with an error (5xx, or a failed record in a 200),
#: answered something unreadable, or did not answer (connection error,
#: timeout).
RETRY_REASONS = ("throttled", "service_error", "unreadable_answer", "no_answer")
#: Throttling error codes counted one by one in `Delivery.throttles`; codes
#: beyond this many distinct ones count as "other", so a service inventing
#: codes cannot grow the table.  The services use about a dozen.
MAX_THROTTLE_CODES = 16

_TRANSITIONS: Dict[Tuple[str, str], str] = {
    (QUEUED, "send"): SENDING,
    (SENDING, "store"): STORED,
    (SENDING, "retry"): BACKOFF,
    (BACKOFF, "wake"): QUEUED,
    (QUEUED, "give_up"): GIVEN_UP,
    (SENDING, "give_up"): GIVEN_UP,
    (BACKOFF, "give_up"): GIVEN_UP,
    (QUEUED, "abandon"): ABANDONED,
    (SENDING, "abandon"): ABANDONED,
    (BACKOFF, "abandon"): ABANDONED,
}


class EntryStateError(RuntimeError):
    """An entry was moved in a way the state table does not allow."""


class QueueFull(Exception):
    """The sink holds as many records as it may."""


class DeadlinePassed(TransientError):
    """A record's retry deadline passed before the service stored it."""


class Entry:
    """One record held by the sink, with its keys and retry state.

    ``size`` is what the record counts against the request limit (data plus
    partition key).  ``waiter`` and ``call`` belong to the driver.  ``result`` is set
    when stored, ``error`` when given up (or the last failure while retrying).
    """

    __slots__ = ("record", "partition_key", "hash_key", "size", "seq", "policy", "started",
                 "due", "state", "result", "error", "waiter", "call")

    def __init__(self, record: Any, partition_key: Optional[str], hash_key: Optional[str],
                 size: int, seq: int, policy: RetryPolicy, due: float, waiter: Any,
                 started: float) -> None:
        self.record = record
        self.partition_key = partition_key
        self.hash_key = hash_key
        self.size = size
        self.seq = seq
        #: The sink's policy until the first retry starts the entry's own.
        self.policy = policy
        #: When the entry was queued: its retry deadline runs from here.
        self.started = started
        self.due = due
        self.state = QUEUED
        self.result: Optional[RecordResult] = None
        self.error: Optional[ServiceError] = None
        self.waiter = waiter
        #: The driver's handle of the call the entry is in, while it is being encoded.
        self.call: Any = None

    @property
    def deadline_at(self) -> Optional[float]:
        """When the entry is given up if not stored by then (None: never)."""
        deadline = self.policy.deadline
        return None if deadline is None else self.started + deadline

    @property
    def live(self) -> bool:
        """Whether the sink still has to store or give up this entry."""
        return self.state in _LIVE

    def __repr__(self) -> str:
        return "<Entry #%d %s size=%d>" % (self.seq, self.state, self.size)


class Settled:
    """What one response (or failed call) decided, for the driver to act on."""

    __slots__ = ("stored", "given_up", "retried", "permanent", "resume_at")

    def __init__(self) -> None:
        self.stored: List[Entry] = []
        self.given_up: List[Entry] = []
        self.retried: List[Entry] = []
        #: A permanent error met in this response: the sink should stop.
        self.permanent: Optional[ServiceError] = None
        #: Earliest retry time among ``retried``.
        self.resume_at: Optional[float] = None


class Delivery:
    """The send queue, the backoff heap and the outcome of every call.

    ``max_records`` and ``max_bytes`` are one request's limits (used to tell a
    full batch's worth of queued records); ``max_entries`` bounds how many
    records the sink holds at once (`add` raises `QueueFull` past it).
    """

    def __init__(self, policy: RetryPolicy, *, linger: float, max_records: int,
                 max_bytes: int, max_entries: int) -> None:
        if linger < 0:
            raise ValueError("linger cannot be negative")
        self.policy = policy
        self.linger = linger
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._queue: Deque[Entry] = deque()
        self._backoff: List[Tuple[float, int, Entry]] = []
        self._queued = 0  # QUEUED entries in _queue
        self._queued_bytes = 0
        self._paused_until = float("-inf")
        # No deadline of a queued or backing-off entry is earlier than this,
        # so `expire` scans only when it can find something.
        self._expiry_hint = float("inf")
        self._seq = 0
        #: Entries not yet stored, given up or abandoned.
        self.held = 0
        self.sending = 0
        self.stored = 0
        self.given_up = 0
        self.retries = 0
        self.abandoned = 0
        #: Retries by reason (`RETRY_REASONS`); they add up to ``retries``.
        self.retry_reasons: Dict[str, int] = dict.fromkeys(RETRY_REASONS, 0)
        #: Throttled record attempts by the service's error code.
        self.throttles: Dict[str, int] = {}

    # -- arrivals ----------------------------------------------------------

    def add(self, record: Any, partition_key: Optional[str], hash_key: Optional[str],
            size: int, now: float, waiter: Any = None) -> Tuple[Entry, bool]:
        """Queue a record; returns ``(entry, wake)``.

        ``wake`` says the driver's send loop should look again now (the queue
        was empty, so a linger timer starts, or a full batch is waiting).
        """
        if self.held >= self.max_entries:
            raise QueueFull("the sink holds %d records, its limit" % self.held)
        self._seq += 1
        # The sink's policy is shared until a retry: a policy of its own per
        # record was one more object per record for PyPy's young
        # collections to move while the record waited for its batch.
        entry = Entry(record, partition_key, hash_key, size, self._seq,
                      self.policy, now + self.linger, waiter, now)
        deadline = entry.deadline_at
        if deadline is not None and deadline < self._expiry_hint:
            self._expiry_hint = deadline
        was_empty = self._queued == 0
        self._queue.append(entry)
        self._queued += 1
        self._queued_bytes += size
        self.held += 1
        return entry, was_empty or self.batch_waiting

    def abandon(self, entry: Entry) -> None:
        """The entry's client went away: never send it again."""
        if entry.state == QUEUED:
            self._unqueue(entry)
        elif entry.state == SENDING:
            self.sending -= 1
        self._move(entry, "abandon")
        self.held -= 1
        self.abandoned += 1

    # -- deciding when to send -------------------------------------------

    def pause(self, until: float) -> None:
        """Start no call before ``until``."""
        self._paused_until = max(self._paused_until, until)

    def wake(self, now: float) -> None:
        """Move entries whose backoff is over to the front of the queue."""
        backoff = self._backoff
        due: List[Entry] = []
        while backoff and backoff[0][0] <= now:
            _, _, entry = heapq.heappop(backoff)
            if entry.state != BACKOFF:
                continue  # given up or abandoned while waiting
            self._move(entry, "wake")
            due.append(entry)
        if due:
            due.sort(key=_by_seq)
            self._queue.extendleft(reversed(due))
            self._queued += len(due)
            self._queued_bytes += sum(e.size for e in due)

    def send_at(self, closing: bool = False) -> Optional[float]:
        """When the next call should start (``-inf``: now); None when nothing waits.

        Call `wake` first.  A time after ``now`` is also when to call `wake`
        again, since the earliest backoff ends no later than it.
        """
        self._skip_dead()
        if self._queued:
            if closing or self.batch_waiting:
                start = float("-inf")
            else:
                start = self._queue[0].due
        elif self._backoff:
            start = self._backoff[0][0]
        else:
            return None
        return max(start, self._paused_until)

    @property
    def batch_waiting(self) -> bool:
        """Whether a full batch's worth of records is queued."""
        return self._queued >= self.max_records or self._queued_bytes >= self.max_bytes

    def next_expiry(self) -> float:
        """No queued or backing-off entry's deadline is earlier than this."""
        return self._expiry_hint

    def take(self, add: Callable[[Entry], bool],
             limit: Optional[int] = None) -> Tuple[List[Entry], List[Entry]]:
        """Fill a batch from the front of the queue: ``(sent, rejected)``.

        ``add(entry)`` admits (or encodes) the entry and returns False when
        the batch is full; a `RecordRejected` it raises gives that entry up.
        With ``limit``, at most that many entries are sent: fewer means the
        batch is full or the queue empty, and a batch filled in parts is
        filled exactly as in one.
        """
        sent: List[Entry] = []
        rejected: List[Entry] = []
        queue = self._queue
        while queue and (limit is None or len(sent) < limit):
            entry = queue[0]
            if entry.state != QUEUED:
                queue.popleft()
                continue
            try:
                added = add(entry)
            except RecordRejected as exc:
                self._unqueue(entry)
                queue.popleft()
                entry.error = exc  # type: ignore[assignment]
                self._give_up(entry)
                rejected.append(entry)
                continue
            if not added:
                break
            queue.popleft()
            self._queued -= 1
            self._queued_bytes -= entry.size
            self._move(entry, "send")
            self.sending += 1
            sent.append(entry)
        return sent, rejected

    # -- outcomes ----------------------------------------------------------

    def settle(self, entries: List[Entry], result: PutRecordsResult, now: float,
               rand: float) -> Settled:
        """Apply a 200 response's per-record results (in request order)."""
        if len(result.records) != len(entries):
            raise ValueError("%d results for %d records" % (len(result.records), len(entries)))
        settled = Settled()
        for entry, outcome in zip(entries, result.records):
            if entry.state == ABANDONED:
                continue
            self.sending -= 1
            if outcome.error is None:
                entry.result = outcome
                self._move(entry, "store")
                self.held -= 1
                self.stored += 1
                settled.stored.append(entry)
            else:
                self._failed(entry, outcome.error, now, rand, settled, answered=True)
        return settled

    def fail(self, entries: List[Entry], error: ServiceError, now: float, rand: float) -> Settled:
        """Apply a failed call (non-200, unreadable answer, connection error)."""
        settled = Settled()
        for entry in entries:
            if entry.state == ABANDONED:
                continue
            self.sending -= 1
            self._failed(entry, error, now, rand, settled)
        return settled

    def expire(self, now: float) -> List[Entry]:
        """Give up queued and backing-off entries whose deadline has passed."""
        if now < self._expiry_hint:
            return []
        expired: List[Entry] = []
        earliest = float("inf")
        for entry in self._queue:
            if entry.state == QUEUED:
                earliest = _sort_expired(entry, now, expired, earliest)
        for _, _, entry in self._backoff:
            if entry.state == BACKOFF:
                earliest = _sort_expired(entry, now, expired, earliest)
        self._expiry_hint = earliest
        for entry in expired:
            if entry.state == QUEUED:
                self._unqueue(entry)
            if entry.error is None:
                entry.error = DeadlinePassed("DeadlinePassed", "not sent before the retry deadline")
            else:
                entry.error = _deadline_error(entry.error, entry.policy.attempts + 1)
            self._give_up(entry)
        return expired

    def give_up_all(self, error: ServiceError) -> List[Entry]:
        """Give up every queued and backing-off entry (the sink stopped)."""
        out: List[Entry] = []
        for entry in self._queue:
            if entry.state == QUEUED:
                out.append(entry)
        for _, _, entry in self._backoff:
            if entry.state == BACKOFF:
                out.append(entry)
        self._queue.clear()
        self._backoff.clear()
        self._queued = 0
        self._queued_bytes = 0
        self._expiry_hint = float("inf")
        for entry in out:
            entry.error = error
            self._give_up(entry)
        return out

    def statistics(self) -> dict:
        return {
            "held": self.held,
            "queued": self._queued,
            "queued_bytes": self._queued_bytes,
            "sending": self.sending,
            "backoff": sum(1 for _, _, e in self._backoff if e.state == BACKOFF),
            "stored": self.stored,
            "given_up": self.given_up,
            "retries": self.retries,
            "abandoned": self.abandoned,
            "retry_reasons": dict(self.retry_reasons),
            "throttles": dict(self.throttles),
        }

    # -- internals ---------------------------------------------------------

    def _skip_dead(self) -> None:
        queue = self._queue
        while queue and queue[0].state != QUEUED:
            queue.popleft()
        backoff = self._backoff
        while backoff and backoff[0][2].state != BACKOFF:
            heapq.heappop(backoff)

    def _unqueue(self, entry: Entry) -> None:
        # The entry stays in the deque and is skipped when it reaches the front.
        self._queued -= 1
        self._queued_bytes -= entry.size

    def _failed(self, entry: Entry, error: ServiceError, now: float, rand: float,
                settled: Settled, *, answered: bool = False) -> None:
        """``answered``: the error is a failed record of a 200 answer."""
        throttled = isinstance(error, ThrottledError)
        if throttled:
            self._count_throttle(error.code)
        if not error.retryable:
            entry.error = error
            self._give_up(entry)
            settled.given_up.append(entry)
            if settled.permanent is None:
                settled.permanent = error
            return
        policy = entry.policy
        if policy is self.policy:
            policy = policy.start(entry.started)
        decision = policy.decide(now, rand, throttled=throttled)
        if isinstance(decision, GiveUp):
            entry.error = _deadline_error(error, decision.attempts)
            self._give_up(entry)
            settled.given_up.append(entry)
            return
        entry.error = error
        entry.policy = decision.policy
        self._move(entry, "retry")
        heapq.heappush(self._backoff, (decision.at, entry.seq, entry))
        deadline = entry.deadline_at
        if deadline is not None and deadline < self._expiry_hint:
            self._expiry_hint = deadline
        self.retries += 1
        self.retry_reasons[_retry_reason(error, answered)] += 1
        settled.retried.append(entry)
        if settled.resume_at is None or decision.at < settled.resume_at:
            settled.resume_at = decision.at

    def _count_throttle(self, code: str) -> None:
        throttles = self.throttles
        if code not in throttles and len(throttles) >= MAX_THROTTLE_CODES - 1:
            code = "other"
        throttles[code] = throttles.get(code, 0) + 1

    def _give_up(self, entry: Entry) -> None:
        self._move(entry, "give_up")
        self.held -= 1
        self.given_up += 1

    @staticmethod
    def _move(entry: Entry, action: str) -> None:
        new = _TRANSITIONS.get((entry.state, action))
        if new is None:
            raise EntryStateError("cannot %s a %s entry" % (action, entry.state))
        entry.state = new


def _retry_reason(error: ServiceError, answered: bool) -> str:
    """Which of `RETRY_REASONS` a retried ``error`` is."""
    if isinstance(error, ThrottledError):
        return "throttled"
    if isinstance(error, MalformedResponse):
        return "unreadable_answer"
    if answered or error.status is not None:
        return "service_error"
    return "no_answer"


def _by_seq(entry: Entry) -> int:
    return entry.seq


def _sort_expired(entry: Entry, now: float, expired: List[Entry], earliest: float) -> float:
    """Collect ``entry`` if its deadline passed; else the earlier of its deadline and ``earliest``."""
    deadline = entry.deadline_at
    if deadline is None:
        return earliest
    if now >= deadline:
        expired.append(entry)
        return earliest
    return min(deadline, earliest)


def _deadline_error(last: ServiceError, attempts: int) -> ServiceError:
    return DeadlinePassed(
        "DeadlinePassed", "gave up after %d attempt%s; last error %s"
        % (attempts, "" if attempts == 1 else "s", last))
