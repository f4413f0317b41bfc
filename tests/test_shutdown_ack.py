"""What a graceful shutdown promises in each ``--ack`` mode when the sink is slow or stuck."""

from __future__ import annotations

import json

import trio

from tests.support.gateway import gateway_in_process
from tests.support.kinesis import Plan, aws_env_fixture, fault_server_fixture  # noqa: F401 - fixtures
from tests.support.sinks import post

#: Seconds allowed for things that take milliseconds; reached only when broken.
WAIT = 20.0


def kinesis(fault_server, ack: str, timeout: str):
    # A call in progress is not abandoned (its body is the batch's buffer):
    # the process exits once it ends, within --call-timeout.
    return ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", fault_server.url, "--ack", ack,
            "--shutdown-timeout", timeout, "--linger", "1ms", "--call-timeout", "1s"]


async def wait_for_calls(fake, count: int) -> None:
    with trio.fail_after(WAIT):
        while len(fake.calls) < count:
            await trio.sleep(0.01)


async def test_ack_kinesis_a_record_not_stored_by_the_deadline_gets_503(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.plan(Plan("hang", delay=10.0))
    answers = []
    async with gateway_in_process(kinesis(fault_server, "kinesis", "300ms")) as (gateway, port):
        async with trio.open_nursery() as nursery:
            async def client() -> None:
                answers.append(await trio.to_thread.run_sync(post, port, b"stuck"))

            nursery.start_soon(client)
            await wait_for_calls(fake, 1)
            started = trio.current_time()
            gateway.drain()
        answered = trio.current_time() - started
    ((status, headers, body),) = answers
    assert status == 503 and headers[b"retry-after"] == b"1"
    doc = json.loads(body)
    assert doc["error"] == "sink_unavailable" and "shutdown timeout" in doc["message"]
    assert 0.3 <= answered < 5
    assert fake.stored_datas() == []


async def test_ack_received_the_sink_stores_what_it_holds_until_the_deadline(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.plan(Plan("slow", delay=0.5))
    async with gateway_in_process(kinesis(fault_server, "received", "5s")) as (gateway, port):
        status, _, body = await trio.to_thread.run_sync(post, port, b"held")
        assert status == 202
        await wait_for_calls(fake, 0)
        gateway.drain()
    (data,) = fake.stored_datas()
    assert data.endswith(b"\nheld") and json.loads(data.partition(b"\n")[0])["id"] == json.loads(body)["id"]


async def test_ack_received_records_still_held_at_the_deadline_are_lost_and_reported(
        fault_server, aws_env, capsys):
    aws_env()
    fake = fault_server.fake
    fake.plan(*[Plan("hang", delay=10.0)] * 10)  # the retries hang too
    async with gateway_in_process(kinesis(fault_server, "received", "200ms")) as (gateway, port):
        status, _, _ = await trio.to_thread.run_sync(post, port, b"lost")
        assert status == 202
        await wait_for_calls(fake, 1)
        started = trio.current_time()
        gateway.drain()
    # The sink got the deadline (at least SINK_CLOSE_FLOOR) and the call in
    # progress its --call-timeout, not the 10 s the endpoint would take.
    assert trio.current_time() - started < 5
    assert fake.stored_datas() == []
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (cut,) = [e for e in events if e["event"] == "sink_cut"]
    assert cut["sink"] == "kinesis" and cut["level"] == "warning"
