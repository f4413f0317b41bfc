"""Access decisions without Redis: GCRA steps, script replies to decisions, per-request admission."""

from __future__ import annotations

import pytest

from gateway.access.lease import Grant, Lease
from gateway.access.limiter import TenantLimits, check_call, check_command, decide, gcra, parse_api_key
from gateway.access.resp import pack_command

NOW = 1_700_000_000.0
LIMITS = b"100.0 200 1048576.0 4194304 0 0"
REPLIES = {
    "admitted": [b"ok", b"k1", LIMITS, 199, b"0.01", 12, 12288],
    "rate-limited": [b"rate", b"k1", LIMITS, b"requests", b"0.25", 0, b"2.0"],
    "unknown-key": [b"unknown"],
}


@pytest.mark.parametrize("tat, cost", [(NOW, 1.0), (NOW + 2.5, 1.0)], ids=["admitted", "refused"])
def test_gcra(benchmark, tat: float, cost: float) -> None:
    result = benchmark(gcra, tat, 100.0, 200.0, cost, NOW)
    assert result.allowed == (tat == NOW)


def test_gcra_stream(benchmark) -> None:
    """A tenant sending 1 KiB records within its limits: both allowances, state carried."""
    state = [0.0, 0.0, NOW]

    def step() -> bool:
        now = state[2] = state[2] + 0.011  # about 91 requests and 93 KB a second
        req = gcra(state[0], 100.0, 200.0, 1.0, now)
        nbytes = gcra(state[1], 1048576.0, 4194304.0, 1024.0, now)
        if req.allowed and nbytes.allowed:
            state[0], state[1] = req.tat, nbytes.tat
            return True
        return False

    assert benchmark(step)


@pytest.mark.parametrize("outcome", list(REPLIES))
def test_decide(benchmark, outcome: str) -> None:
    decision = benchmark(decide, REPLIES[outcome], "acme", NOW)
    assert decision.admitted == (outcome == "admitted")


def test_admission_exact_per_request(benchmark) -> None:
    """--admission exact: what each request costs the gateway besides the round trip.

    The script call built and packed for the pipeline, its reply decided.
    """
    key = parse_api_key("sluice1.acme." + "A" * 43)
    assert key is not None
    out = bytearray()

    def step() -> bool:
        del out[:]
        pack_command(out, check_command(check_call(key, 1024, NOW)))  # type: ignore[arg-type]
        return decide(REPLIES["admitted"], "acme", NOW).admitted

    assert benchmark(step)


def test_admission_lease_per_request(benchmark) -> None:
    """--admission lease: a request admitted from the tenant's slice (no round trip)."""
    lease = Lease("acme")
    limits = TenantLimits(1e9, 10 ** 9, 1e12, 10 ** 12)
    big = 10 ** 12

    def step() -> bool:
        if lease.requests < 1:  # a fresh slice now and then: a call's worth of work
            lease.granted(Grant("k1", limits, 100_000, big, 100_000, big, 0, 0.0, ("k1",), NOW),
                          ["KEY"])
        return lease.try_spend("KEY", 1024, NOW) is not None

    assert benchmark(step)
