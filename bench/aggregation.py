"""What ``--aggregation kpl`` saves: Kinesis records, PUT payload units, bytes, CPU.

``python -m bench.aggregation [--python PY] [--rate 500] [--records 1000] [--linger 10ms]``

For each of ``--aggregation off`` and ``kpl``: starts the gateway (Kinesis
sink, ``--ack kinesis``, random partition keys unless ``--keys N`` gives N
header keys) against a counting Kinesis stub in this process, sends
``--warmup`` records and then ``--records`` measured ones, open loop at
``--rate`` requests per second (``--linger`` is the gateway's), with the seed's body mix: 85% 1 KiB, 10%
16 KiB, 4% 256 KiB, 1% 900,000 bytes (shuffled with a fixed seed, so both
runs send the same sequence).  Over the measured records it reports what
the stub received (Kinesis records, PUT payload units of 25 KiB per record,
data plus partition key bytes, PutRecords request bytes on the wire: JSON
with base64) and the gateway's CPU time (``/proc/PID/stat``, utime +
stime).  On a shared machine the CPU figure is noisy: compare the two rows
of one run, not runs.
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from bench.load.bodies import body
from bench.load.procstat import cpu_seconds, tree
from bench.load.servers import ROOT, Child

__all__ = ["main", "seed_mix"]

#: The seed's mix per 1,000 requests: (count, body bytes).
SEED_MIX = ((850, 1024), (100, 16 * 1024), (40, 256 * 1024), (10, 900_000))
MIX_SEED = 20261203
#: Kinesis bills PUT payload units of 25 KB per record (data plus key);
#: the same constant as the sink's metrics.
UNIT = 25 * 1024
#: Client threads: enough for 500 req/s when a 202 waits for PutRecords.
CLIENTS = 96


def seed_mix(count: int) -> List[int]:
    """``count`` body sizes in the seed's proportions, in a fixed shuffled order."""
    sizes: List[int] = []
    for share, size in SEED_MIX:
        sizes += [size] * (count * share // 1000)
    sizes += [1024] * (count - len(sizes))
    random.Random(MIX_SEED).shuffle(sizes)
    return sizes


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.calls = self.records = self.units = self.payload = self.wire = 0

    def snapshot(self) -> Dict[str, int]:
        with self.lock:
            return {"calls": self.calls, "records": self.records, "units": self.units,
                    "payload": self.payload, "wire": self.wire}


class _Stub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    counts: _Counts

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        target = self.headers.get("X-Amz-Target", "")
        if not target.endswith(".PutRecords"):
            self._answer(400, b'{"__type":"UnknownOperationException"}')
            return
        records = json.loads(data)["Records"]
        units = payload = 0
        for record in records:
            text = record["Data"]
            size = len(text) * 3 // 4 - text[-2:].count("=") + len(record["PartitionKey"].encode())
            payload += size
            units += max(1, -(-size // UNIT))
        with self.counts.lock:
            self.counts.calls += 1
            self.counts.records += len(records)
            self.counts.units += units
            self.counts.payload += payload
            self.counts.wire += len(data)
        entry = b'{"SequenceNumber":"1","ShardId":"shardId-000000000000"}'
        self._answer(200, b'{"FailedRecordCount":0,"Records":[' + b",".join([entry] * len(records)) + b"]}")

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _post(port: int, data: bytes, headers: Dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/logs", body=data, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _send(port: int, sizes: List[int], rate: float, keys: int) -> List[int]:
    bodies = {size: body(size) for size in set(sizes)}
    start = time.monotonic()
    futures = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        for i, size in enumerate(sizes):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            headers = {"Content-Type": "application/json"}
            if keys:
                headers["X-Key"] = "tenant-%d" % (i % keys)
            futures.append(pool.submit(_post, port, bodies[size], headers))
        return [f.result() for f in futures]


def run_case(python: str, aggregation: str, args: argparse.Namespace, counts: _Counts,
             stub_url: str) -> Dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "AWS_"))}
    env.update(PYTHONPATH=ROOT, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    workdir = tempfile.mkdtemp(prefix="sluice-agg-")
    command = [python, "-m", "gateway", "serve", "--listen", "127.0.0.1:0", "--workers", "1",
               "--data-dir", workdir, "--sink", "kinesis", "--stream", "bench",
               "--endpoint-url", stub_url, "--region", "us-east-1", "--max-body", "1000KB",
               "--aggregation", aggregation, "--linger", args.linger]
    if args.keys:
        command += ["--partition-key", "header:X-Key"]
    gateway = Child("sluice", command, env=env).wait_port()
    try:
        port = gateway.port
        if args.warmup:
            _send(port, seed_mix(args.warmup), args.rate, args.keys)
        with counts.lock:
            counts.reset()
        pids = tree(gateway.pid)
        cpu = cpu_seconds(pids)
        started = time.monotonic()
        statuses = _send(port, seed_mix(args.records), args.rate, args.keys)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(pids) - cpu
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    seen = counts.snapshot()
    return {"aggregation": aggregation, "accepted": statuses.count(202), "seconds": round(elapsed, 2),
            "cpu_seconds": round(cpu, 2), **seen}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregation", description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000, help="records sent first, not measured")
    parser.add_argument("--linger", default="10ms", help="the gateway's --linger (default 10ms)")
    parser.add_argument("--keys", type=int, default=0,
                        help="partition keys from an X-Key header cycling over N tenants (0: random)")
    args = parser.parse_args(argv)
    counts = _Counts()
    handler = type("Stub", (_Stub,), {"counts": counts})
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    stub.daemon_threads = True
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d" % stub.server_address[1]
    rows = []
    try:
        for aggregation in ("off", "kpl"):
            rows.append(run_case(args.python, aggregation, args, counts, url))
    finally:
        stub.shutdown()
        stub.server_close()
    print("| aggregation | accepted | seconds | Kinesis records | PUT payload units | data + key bytes "
          "| request bytes on the wire | PutRecords calls | gateway CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {aggregation} | {accepted} | {seconds} | {records:,} | {units:,} | {payload:,} | {wire:,} "
              "| {calls:,} | {cpu_seconds} |".format(**row))
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
