"""Several gateways sharing one Redis enforce one limit per tenant, not one each.

Three ``sluice serve --redis`` processes are driven together at about twice
the tenant's request rate for a few seconds.  GCRA admits at most ``rate x
duration + burst`` requests over any window, and with demand above the rate
it admits about that many; the count admitted by all three together must be
within 5% of it.  That is a bound on counts, not on speed: a slow machine
only sends later, and the window is measured from the requests actually sent.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from gateway.access import keystore
from tests.support.access import post
from tests.support.gateway import GatewayProcess
from tests.support.redis import running_redis

GATEWAYS = 3
RATE = 40.0  # requests per second, for the tenant as a whole
BURST = 10
SECONDS = 5.0
DEMAND = 2 * RATE
CLIENTS = 6  # threads; each sends every CLIENTS / DEMAND seconds, to one gateway


def test_gateways_sharing_redis_enforce_one_global_limit(tmp_path):
    with running_redis() as redis_server:
        admin = keystore.connect(redis_server.url)
        key = keystore.create_key(admin, "GLOBAL", time.time(), requests_per_second=RATE,
                                  burst=BURST).api_key
        gateways = [GatewayProcess(["--redis", redis_server.url, "--sink", "null"],
                                   data_dir=str(tmp_path / ("g%d" % n))) for n in range(GATEWAYS)]
        try:
            with ThreadPoolExecutor(GATEWAYS) as pool:
                list(pool.map(lambda g: g.start(), gateways))
            # A key another tenant uses warms every gateway up (threads,
            # connections, the JIT) without touching the measured tenant.
            warm = keystore.create_key(admin, "WARM", time.time()).api_key
            for gateway in gateways:
                for _ in range(20):
                    assert post(gateway.address, b"warm", warm).status == 202
            counts = _drive(gateways, key)
            stderr = "".join(g.stderr for g in gateways)
        finally:
            for gateway in gateways:
                gateway.stop()
            admin.close()
    sent = counts["sent"]
    window = counts["last"] - counts["first"]
    expected = RATE * window + BURST
    admitted = counts[202]
    print("sent %d over %.3fs, admitted %d, expected %.1f (%+.1f%%)" % (
        sent, window, admitted, expected, 100.0 * (admitted - expected) / expected))
    assert counts[202] + counts[429] == sent, counts
    assert sent >= 1.5 * RATE * SECONDS  # the demand really was above the rate
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, counts)
    assert "Traceback" not in stderr


def _drive(gateways: List[GatewayProcess], key: str) -> Dict:
    counts: Dict = {"sent": 0, 202: 0, 429: 0, "first": float("inf"), "last": 0.0}
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    interval = CLIENTS / DEMAND

    def client(n: int) -> None:
        gateway = gateways[n % len(gateways)]
        at = start + n / DEMAND  # the clients take turns: DEMAND requests/s in all
        while at < start + SECONDS:
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent_at = time.monotonic()
            status = post(gateway.address, b"{}", key).status
            with lock:
                counts["sent"] += 1
                counts[status] = counts.get(status, 0) + 1
                counts["first"] = min(counts["first"], sent_at)
                counts["last"] = max(counts["last"], sent_at)
            at += interval

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts
