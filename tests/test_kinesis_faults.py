"""Kinesis faults end to end: real gateway, real HTTP clients, botocore's signing and HTTP stack,
and a fault-injecting Kinesis-compatible endpoint (tests/support/kinesis.py FaultServer).

What must hold whatever the endpoint does: every record answered 202 is stored,
no record is answered 202 unless stored (503 instead), only failed entries are
sent again, permanent errors flip /readyz, and the ring is empty afterwards.
"""

from __future__ import annotations

import json
from typing import Dict, List

import trio

from tests.support.gateway import gateway_in_process, log_events
from tests.support.kinesis import (  # noqa: F401 - fixtures
    Plan,
    aws_env_fixture,
    fault_server_fixture,
)
from tests.support.sinks import get, post

THROTTLED = "ProvisionedThroughputExceededException"


def flags(fault_server, *extra):
    return ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", fault_server.url,
            "--call-timeout", "0.5s", "--retry-deadline", "4s", "--linger", "5ms"] + list(extra)


async def post_all(port, bodies: List[bytes], clients: int = 8) -> List[tuple]:
    """POST every body, ``clients`` at a time; answers in ``bodies`` order."""
    answers: List[tuple] = [None] * len(bodies)  # type: ignore[list-item]
    limiter = trio.CapacityLimiter(clients)

    async def one(index: int) -> None:
        answers[index] = await trio.to_thread.run_sync(post, port, bodies[index], limiter=limiter)

    async with trio.open_nursery() as nursery:
        for index in range(len(bodies)):
            nursery.start_soon(one, index)
    return answers


def body_of(data: bytes) -> bytes:
    return data.partition(b"\n")[2]


def id_of(data: bytes) -> str:
    return json.loads(data.partition(b"\n")[0])["id"]


def check_acknowledged_were_stored(fake, bodies, answers) -> Dict[str, int]:
    """Every 202 names a stored copy of its record; returns the count of each status."""
    stored = {}
    for item in fake.stored:
        stored.setdefault(id_of(item.data), []).append(item)
    counts: Dict[str, int] = {}
    for body, (status, headers, answer) in zip(bodies, answers):
        counts[str(status)] = counts.get(str(status), 0) + 1
        assert status in (202, 503), (status, answer)
        doc = json.loads(answer)
        if status == 202:
            copies = stored[doc["id"]]
            assert all(body_of(c.data) == body for c in copies)
            assert (doc["shard_id"], doc["sequence_number"]) in {
                (c.shard_id, c.sequence_number) for c in copies}
        else:
            assert doc["error"] == "sink_unavailable" and b"retry-after" in headers
    return counts


async def test_partial_failures_resend_only_the_failed_entries(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.fail_record = lambda data, attempt: THROTTLED if b"flaky" in data and attempt <= 2 else None
    bodies = [(b"flaky %d" if i % 3 == 0 else b"fine %d") % i for i in range(30)]
    async with gateway_in_process(flags(fault_server)) as (gateway, port):
        answers = await post_all(port, bodies)
    assert check_acknowledged_were_stored(fake, bodies, answers) == {"202": 30}
    sends: Dict[bytes, int] = {}
    for call in fake.calls:
        for data in call.datas:
            sends[body_of(data)] = sends.get(body_of(data), 0) + 1
    assert sends == {body: 3 if body.startswith(b"flaky") else 1 for body in bodies}
    # Failed entries go out again in the order they had.
    for earlier, later in zip(fake.calls, fake.calls[1:]):
        failed = [body_of(earlier.datas[i]) for i in earlier.failed]
        again = [body_of(d) for d in later.datas if body_of(d) in failed]
        assert again == [b for b in failed if b in again]
    assert sorted(body_of(s.data) for s in fake.stored) == sorted(bodies)
    assert gateway.ring.used == 0 and gateway.ring.live == 0


async def test_mixed_faults_never_acknowledge_an_unstored_record(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.plan(
        Plan("status", 500, "InternalFailure"),
        Plan("reset"),
        Plan("status", 400, THROTTLED),
        Plan("slow", delay=1.0),  # stored, but the answer comes after the call timeout
        Plan("hang", delay=1.0),
        Plan("status", 503, "ServiceUnavailable"),
    )
    fake.fail_record = lambda data, attempt: "InternalFailure" if attempt == 1 and b"odd" in data else None
    bodies = [(b"odd %d" if i % 2 else b"even %d") % i for i in range(40)]
    async with gateway_in_process(flags(fault_server)) as (gateway, port):
        answers = await post_all(port, bodies)
        ready = await trio.to_thread.run_sync(get, port, "/readyz")
    counts = check_acknowledged_were_stored(fake, bodies, answers)
    assert counts.get("202", 0) >= 1 and ready[0] == 200
    assert {c.fault for c in fake.calls} >= {"status", "reset", "hang"}
    assert gateway.ring.used == 0 and gateway.ring.live == 0
    assert gateway.sink.statistics().held == 0


async def test_an_endpoint_that_keeps_failing_gets_503s_after_the_deadline(fault_server, aws_env, capsys):
    aws_env()
    fake = fault_server.fake
    fake.plan(*[Plan("status", 500, "InternalFailure")] * 1000)
    bodies = [b"never %d" % i for i in range(6)]
    async with gateway_in_process(flags(fault_server, "--retry-deadline", "1s")) as (gateway, port):
        answers = await post_all(port, bodies)
        ready = await trio.to_thread.run_sync(get, port, "/readyz")
    assert check_acknowledged_were_stored(fake, bodies, answers) == {"503": 6}
    assert all(b"DeadlinePassed" in answer for _, _, answer in answers)
    assert fake.stored == [] and ready[0] == 200
    assert "kinesis sink" not in capsys.readouterr().err  # transient: no log line
    assert gateway.ring.used == 0


async def test_permanent_error_flips_readyz_answers_503_and_logs_once(fault_server, aws_env, capsys):
    aws_env()
    fake = fault_server.fake
    fake.plan(*[Plan("status", 400, "AccessDeniedException")] * 10)
    async with gateway_in_process(flags(fault_server)) as (gateway, port):
        first = await post_all(port, [b"a", b"b", b"c"])
        ready = await trio.to_thread.run_sync(get, port, "/readyz")
        later = await trio.to_thread.run_sync(post, port, b"after")
    assert [a[0] for a in first] == [503, 503, 503] and later[0] == 503
    assert 25 <= int(later[1][b"retry-after"]) <= 30
    assert ready[0] == 503
    reason = json.loads(ready[2])["reason"]
    assert reason.startswith("sink: kinesis: AccessDeniedException")
    (event,) = log_events(capsys.readouterr().err, "sink_not_ready")
    assert event["sink"] == "kinesis" and "kinesis:PutRecords" in event["reason"]
    assert fake.stored == [] and gateway.ring.used == 0


async def test_a_stalled_endpoint_fills_the_ring_then_new_requests_get_503(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.plan(*[Plan("hang", delay=2.0)] * 12)
    small = ["--ring-size", "64KiB", "--max-body", "1KiB", "--ring-wait", "50ms", "--ack", "received",
             "--max-in-flight", "2", "--retry-deadline", "20s"]
    bodies = [b"%04d" % i + b"." * 1000 for i in range(120)]
    async with gateway_in_process(flags(fault_server, *small)) as (gateway, port):
        answers = await post_all(port, bodies, clients=4)
        full = gateway.ring.statistics()
        fake.plans.clear()  # the endpoint recovers
        with trio.fail_after(30):
            while gateway.ring.live:
                await trio.sleep(0.05)
    statuses = [a[0] for a in answers]
    assert statuses.count(202) >= 20 and statuses.count(503) >= 20
    assert all(b"retry-after" in a[1] for a in answers if a[0] == 503)
    assert full["overloads"] >= 1 and full["capacity"] == 64 * 1024
    accepted = {json.loads(a[2])["id"] for a in answers if a[0] == 202}
    assert accepted <= {id_of(s.data) for s in fake.stored}
    assert gateway.ring.used == 0
