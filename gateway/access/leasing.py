"""The lease-mode half of :class:`gateway.access.control.AccessControl`.

Theory of operation
-------------------
Each tenant seen by this process has a :class:`~gateway.access.lease.Lease`.
:meth:`Leases.check` admits from it without awaiting anything while the
slice lasts and the key was confirmed within
:data:`~gateway.access.lease.LEASE_SECONDS`.  Otherwise one request per
tenant becomes the *renewer*: it waits out
:data:`~gateway.access.lease.MIN_CALL_INTERVAL` since the tenant's last call
if needed, then sends one lease call (settle the old slice, confirm the keys,
lease the next slice) through the control's pipeline; the other requests of
that tenant wait for it and then spend from the new slice.  A refusal is kept
on the lease until its retry time (and at least the call interval), so a
throttled tenant does not reach Redis more often either.

:meth:`Leases.settle_expired` hands back the slices that outlived their
lease (the control's flush loop calls it), :meth:`Leases.settle_all` every
slice at shutdown.  While Redis is not answering nothing is spent from a
slice: the control answers as ``--on-redis-failure`` says, and the slices
are settled once Redis is back.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, cast

import trio

from gateway.access.lease import (
    MIN_CALL_INTERVAL,
    SETTLED,
    Grant,
    Lease,
    Settlement,
    lease_call,
    parse_lease_reply,
)
from gateway.access.limiter import (
    DISABLED,
    QUOTA,
    REVOKED,
    UNKNOWN,
    Admission,
    Decision,
    ParsedKey,
    ScriptCall,
)

__all__ = ["Leases", "IDLE_SECONDS"]

#: A tenant without a slice and without a call for this long is forgotten
#: (its rate estimate with it), so the table holds the tenants of the last
#: minute, not every tenant ever seen.
IDLE_SECONDS = 60.0


class _Renewal:
    """A lease call in flight for one tenant; ``event`` is set when it is done."""

    __slots__ = ("event", "failed")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.failed = False


class Leases:
    """Slices per tenant for one :class:`~gateway.access.control.AccessControl`."""

    def __init__(self, control: Any) -> None:
        self._control = control
        self._leases: Dict[str, Lease] = {}

    def lease(self, tenant: str) -> Optional[Lease]:
        return self._leases.get(tenant)

    async def check(self, key: ParsedKey, body_bytes: int, now: float) -> Admission:
        """Admit from the tenant's slice, renewing it when needed; raise a refusal."""
        lease = self._leases.get(key.tenant)
        if lease is None:
            lease = Lease(key.tenant)
            self._control._bounded_put(self._leases, key.tenant, lease)
        control = self._control
        while True:
            admission = lease.try_spend(key.key_hash, body_bytes, now)
            if admission is not None:
                control._counts["admitted"] += 1
                control._decisions["admitted"] += 1
                return admission
            refusal = lease.refusal
            if refusal is not None and now < refusal[2] and body_bytes >= refusal[1]:
                control._counts["refusal_cache_hits"] += 1
                return control._refuse(refusal[0], now)
            if not lease.ran_out:
                lease.ran_out = now
            renewal = cast(Optional[_Renewal], lease.renewal)
            if renewal is None:
                renewal = await self._renew(lease, key, body_bytes, now)
            else:
                lease.waiting_requests += 1
                lease.waiting_bytes += body_bytes
                try:
                    # The renewer may first wait out the call interval, then
                    # waits for Redis at most the check timeout itself.
                    with trio.move_on_after(control.config.check_timeout + MIN_CALL_INTERVAL):
                        await renewal.event.wait()
                finally:
                    lease.waiting_requests -= 1
                    lease.waiting_bytes -= body_bytes
            if control._state != "ok" or renewal.failed or not renewal.event.is_set():
                return control._unavailable(key, control._keys.get(key.key_hash), body_bytes, now)
            # Unknown, revoked and disabled keys are kept apart from confirmed ones.
            entry = control._bad_keys.get(key.key_hash)
            if entry is not None and entry.decision.outcome in (UNKNOWN, REVOKED, DISABLED):
                return control._refuse(entry.decision, now)
            now = control._clock()

    async def _renew(self, lease: Lease, key: ParsedKey, body_bytes: int,
                     now: float) -> _Renewal:
        control = self._control
        renewal = lease.renewal = _Renewal()
        try:
            wait = lease.last_call + MIN_CALL_INTERVAL - now
            if wait > 0:
                await trio.sleep(wait)
                now = control._clock()
            lease.last_call = now
            hashes = lease.keys_to_confirm(key.key_hash, now)
            want_requests, want_bytes = lease.wants(body_bytes, now)
            settlement = lease.settlement()
            call = lease_call(key.tenant, hashes, settlement, body_bytes, want_requests,
                              want_bytes, now)
            reply = await self._call(call, settlement, lease)
            if reply is None:
                renewal.failed = True
                return renewal
            try:
                result = parse_lease_reply(reply, key.tenant, now)  # type: ignore[arg-type]
            except (ValueError, TypeError, IndexError) as exc:
                control._malformed_reply(reply, exc)
                renewal.failed = True
                return renewal
            if isinstance(result, Grant):
                for key_hash, outcome in lease.granted(result, hashes):
                    control._remember(key_hash, Decision(outcome, key.tenant, now=now))
                for key_hash in hashes:
                    if key_hash in lease.keys:
                        control._remember(key_hash, Decision(
                            "ok", key.tenant, lease.keys[key_hash][1].key_id, result.limits,
                            now=now))
            elif isinstance(result, Decision):
                lease.refused(result, body_bytes, now + MIN_CALL_INTERVAL)
                if result.outcome == QUOTA and lease.refusal is not None:
                    # A quota raised by an admin must show within the key cache ttl.
                    lease.refusal = lease.refusal[:2] + (
                        now + control.config.key_cache_ttl,)
                control._remember(key.key_hash, result)
                if result.outcome == DISABLED:
                    for key_hash in hashes:
                        control._remember(key_hash, result)
            return renewal
        finally:
            lease.renewal = None
            renewal.event.set()

    async def _call(self, call: ScriptCall, settlement: Settlement,
                    lease: Lease) -> Optional[object]:
        """One lease call's reply, or None (Redis failed or too slow)."""
        control = self._control
        results: Optional[List[object]] = None
        try:
            with trio.move_on_after(control.config.check_timeout):
                results = await control._pipeline([call], [], [], [])
        except BaseException:
            # Cancelled with the call out (the client went away): it may
            # not have run, so its debt stays here to be charged.
            lease.restore_debt(settlement)
            raise
        if results is None:
            if control._state == "ok":
                control._counts["timeouts"] += 1
                if control._redis_stalled():
                    control._mark_down("no answer within %gs" % control.config.check_timeout)
            lease.restore_debt(settlement)
            return None
        reply = results[0]
        if isinstance(reply, Exception):
            lease.restore_debt(settlement)
            return None
        return reply

    def charge_after_store(self, tenant: str, nbytes: int) -> bool:
        """Spend ``nbytes`` of a stored body from ``tenant``'s slice (debt allowed); False if none."""
        lease = self._leases.get(tenant)
        if lease is None or not lease.month:
            return False
        lease.charge(nbytes)
        return True

    def give_back(self, tenant: str, records: int, nbytes: int) -> bool:
        """Return quota of a request not stored to ``tenant``'s slice; False if none."""
        lease = self._leases.get(tenant)
        if lease is None or not lease.month:
            return False
        lease.give_back(records, nbytes)
        return True

    async def settle_expired(self, now: float, everything: bool = False) -> None:
        """Hand back the slices past their lease (all with ``everything``); forget idle tenants."""
        control = self._control
        if control._state != "ok":
            return
        calls: List[ScriptCall] = []
        taken: List[Tuple[Lease, Settlement]] = []
        idle: List[str] = []
        for tenant, lease in self._leases.items():
            if lease.renewal is not None or not (everything or now >= lease.expires):
                continue
            settlement = lease.settlement()
            if settlement.empty:
                if now - lease.last_call > IDLE_SECONDS:
                    idle.append(tenant)
                continue
            calls.append(lease_call(lease.tenant, (), settlement, 0, 0, 0, now))
            taken.append((lease, settlement))
        for tenant in idle:
            del self._leases[tenant]
        step = control.config.batch_max_checks
        for start in range(0, len(calls), step):
            part = taken[start:start + step]
            results = await control._pipeline(calls[start:start + step], [], [], [])
            for (lease, settlement), reply in zip(part, results or [None] * len(part)):
                if not (isinstance(reply, (list, tuple)) and reply
                        and reply[0] in (SETTLED, SETTLED.encode())):
                    lease.restore_debt(settlement)
