"""What a keep-alive connection holds while it waits for its next request.

An agent's connection idles between requests for far longer than a minor
collection's interval, so on PyPy everything it waits in is moved to the old
generation, and collected there only by a major collection, whose last
marking step traces in one go what was moved while it ran.  The gateway's
own code therefore adds no coroutine of its own to the wait: the connection
waits in the frame that serves it for its whole life, inside Trio's wait.
Real loopback sockets, the gateway in this process.
"""

from __future__ import annotations

import gc
import os
import types

import trio

import gateway
from tests.support.gateway import RawConnection, gateway_in_process, post_request

CONNECTIONS = 4
GATEWAY_DIR = os.path.dirname(os.path.abspath(gateway.__file__)) + os.sep


def _coroutines():
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is types.CoroutineType]


async def _until_waiting(gw, count: int) -> None:
    with trio.fail_after(10):
        while gw.registry.waiting < count:
            await trio.sleep(0.01)


async def test_an_idle_connection_keeps_no_coroutine_of_ours_from_its_last_request():
    async with gateway_in_process(["--sink", "null"]) as (gw, port):
        conns = [RawConnection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]

        def one_round() -> None:
            for conn in conns:
                conn.send(post_request(b"x" * 1024))
            for conn in conns:
                assert conn.read_response().status == 202

        try:
            await trio.to_thread.run_sync(one_round)
            await _until_waiting(gw, CONNECTIONS)
            before = _coroutines()  # kept: their ids stay theirs
            seen = {id(c) for c in before}
            await trio.to_thread.run_sync(one_round)
            await _until_waiting(gw, CONNECTIONS)
            new = [c for c in _coroutines() if id(c) not in seen]
            ours = [c.cr_code.co_name for c in new if c.cr_code.co_filename.startswith(GATEWAY_DIR)]
            assert ours == []
            # Trio's wait itself is there, once per connection.
            assert len(new) >= CONNECTIONS
        finally:
            for conn in conns:
                conn.close()
