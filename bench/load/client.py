"""The Python load generator: ``python -m bench.load.client --port P --mode open|closed ...``.

One thread, non-blocking sockets and ``selectors``; HTTP/1.1 keep-alive, no
pipelining (one request in flight per connection); answers framed by
``Content-Length`` only.

* ``open``: request *i* is due at ``start + i / rate`` whatever happened
  before.  A due request goes out on an idle connection, or on a new one
  (up to ``--connections``), or waits for one; its latency runs from its due
  time, so a stalled server shows as latency instead of as fewer requests
  (no coordinated omission).
* ``closed``: ``--connections`` connections each send the next request as
  soon as the previous answer arrived; latency runs from the send.

Requests due (open) or sent (closed) in ``[start + warmup, start + warmup +
duration)`` are measured.  The result is one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time
from array import array
from collections import deque
from typing import Any, Deque, Dict, List, Optional

from .bodies import body, request_head, sizes_for

__all__ = ["main", "run"]

#: Seconds a run waits after its end for answers still due.
DRAIN_TIMEOUT = 5.0
#: Open loop: requests allowed to wait for a connection; past this the run
#: stops as overloaded (the latencies would only say "unbounded").
MAX_BACKLOG = 200_000
#: Latencies kept for the JSON (every k-th past this); percentiles use all.
MAX_SAMPLES = 100_000
RECV_SIZE = 65536
#: Requests slower than this are listed with their wall-clock time, so the
#: report can say what the server was doing meanwhile; at most MAX_SLOW.
SLOW_S = 0.010
MAX_SLOW = 20_000


class _Conn:
    __slots__ = ("sock", "out", "inbuf", "due", "sent", "size", "measured", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out: Deque[memoryview] = deque()
        self.inbuf = bytearray()
        self.due = 0.0
        self.sent = 0.0
        self.size = 0
        self.measured = False
        self.waiting = False  # a request sent, its answer not read yet


class _Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = sizes_for(args.mix)
        host = "%s:%d" % (args.host, args.port)
        self.requests = {s: (request_head(s, host, args.token), body(s)) for s in set(self.sizes)}
        self.sel = selectors.DefaultSelector()
        self.idle: List[_Conn] = []
        self.in_flight = 0  # requests sent and not answered (or failed) yet
        self.open_count = 0
        self.latencies = array("d")
        #: The same latencies by body size, so a tail can be told from large bodies' cost.
        self.by_size: Dict[int, Any] = {s: array("d") for s in set(self.sizes)}
        #: [wall-clock start, latency, body size] of each request over SLOW_S.
        self.slow: List[List[float]] = []
        self._wall_offset = time.time() - time.perf_counter()
        self.measured_bytes = 0
        self.completed = 0
        self.errors: Dict[str, int] = {}
        self.statuses: Dict[str, int] = {}
        self.next_size = 0
        self.overloaded = False

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def connect(self) -> Optional[_Conn]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((self.args.host, self.args.port))
        except OSError as exc:
            sock.close()
            self.error("connect: %s" % errno.errorcode.get(exc.errno or 0, str(exc)))
            return None
        sock.setblocking(False)
        self.open_count += 1
        return _Conn(sock)

    def close(self, conn: _Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.open_count -= 1

    def send(self, conn: _Conn, due: float, measured: bool) -> None:
        size = self.sizes[self.next_size]
        self.next_size = (self.next_size + 1) % len(self.sizes)
        head, data = self.requests[size]
        conn.out.extend((memoryview(head), memoryview(data)))
        conn.due, conn.size, conn.measured = due, size, measured
        conn.sent = time.perf_counter()
        conn.inbuf.clear()
        conn.waiting = True
        self.in_flight += 1
        self.flush(conn)

    def flush(self, conn: _Conn) -> None:
        try:
            while conn.out:
                part = conn.out[0]
                n = conn.sock.send(part)
                if n < len(part):
                    conn.out[0] = part[n:]
                    break
                conn.out.popleft()
        except BlockingIOError:
            pass
        except OSError:
            self.fail(conn, "send")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        try:
            self.sel.modify(conn.sock, events, conn)
        except KeyError:
            self.sel.register(conn.sock, events, conn)

    def fail(self, conn: _Conn, kind: str) -> None:
        if conn.waiting:
            conn.waiting = False
            self.in_flight -= 1
            self.error(kind)
        elif conn in self.idle:
            # A server closing an idle keep-alive connection (uvicorn after
            # 5 s, Sluice after --idle-timeout) is no failed request.
            self.idle.remove(conn)
        conn.out.clear()
        self.close(conn)

    def on_readable(self, conn: _Conn) -> bool:
        """Read; True when a whole answer arrived (the connection is then reusable)."""
        try:
            chunk = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            self.fail(conn, "recv")
            return False
        if not chunk:
            self.fail(conn, "closed by server")
            return False
        buf = conn.inbuf
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        length, close = 0, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if len(buf) < end + 4 + length:
            return False
        status = head[0].split(" ", 2)[1] if " " in head[0] else "?"
        now = time.perf_counter()
        conn.waiting = False
        self.in_flight -= 1
        if conn.measured:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status.startswith("2"):
                self.completed += 1
                self.measured_bytes += conn.size
                began = conn.due if self.args.mode == "open" else conn.sent
                latency = now - began
                self.latencies.append(latency)
                self.by_size[conn.size].append(latency)
                if latency > SLOW_S and len(self.slow) < MAX_SLOW:
                    self.slow.append([round(began + self._wall_offset, 6), round(latency, 6), conn.size])
            else:
                self.error("status %s" % status)
        if close:
            self.close(conn)
            return False
        return True

    def events(self, timeout: float) -> List[_Conn]:
        """Handle socket events; the connections that became idle."""
        done = []
        for key, mask in self.sel.select(timeout):
            conn = key.data
            if mask & selectors.EVENT_WRITE and conn.out:
                self.flush(conn)
            if mask & selectors.EVENT_READ and not conn.out:
                if self.on_readable(conn):
                    self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    done.append(conn)
        return done

    def run_open(self, start: float, window: float, end: float) -> None:
        rate, limit = self.args.rate, self.args.connections
        interval = 1.0 / rate
        backlog: Deque[float] = deque()
        i = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            while start + i * interval <= now:
                backlog.append(start + i * interval)
                i += 1
            if len(backlog) > MAX_BACKLOG:
                self.overloaded = True
                break
            while backlog and (self.idle or self.open_count < limit):
                conn = self.idle.pop() if self.idle else self.connect()
                if conn is None:
                    backlog.popleft()
                    continue
                due = backlog.popleft()
                self.send(conn, due, window <= due < end)
            wait = min(max(0.0, start + i * interval - time.perf_counter()), 0.01)
            self.idle.extend(self.events(wait))
        # Requests never sent because the server was too slow count as errors.
        for due in backlog:
            if window <= due < end:
                self.error("not sent before the end (server too slow)")
        self.drain()

    def run_closed(self, start: float, window: float, end: float) -> None:
        while time.perf_counter() < start:
            time.sleep(min(0.01, max(0.0, start - time.perf_counter())))
        conns = [c for c in (self.connect() for _ in range(self.args.connections)) if c]
        for conn in conns:
            self.send(conn, start, False)
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            for conn in self.events(0.01):
                sent = time.perf_counter()
                if sent < end:
                    self.send(conn, sent, window <= sent)
            while self.open_count < self.args.connections and time.perf_counter() < end:
                conn = self.connect()
                if conn is None:
                    break
                self.send(conn, time.perf_counter(), False)
        self.drain()

    def drain(self) -> None:
        deadline = time.perf_counter() + DRAIN_TIMEOUT
        while self.in_flight > 0 and time.perf_counter() < deadline:
            self.idle.extend(self.events(0.05))

    def shutdown(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        for conn in self.idle:
            conn.sock.close()
        self.sel.close()


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one load and return its measurements."""
    r = _Run(args)
    wall_start = args.start_at if args.start_at else time.time()
    # perf_counter has no fixed epoch: translate the wall-clock start.
    start = time.perf_counter() + max(0.0, wall_start - time.time())
    window = start + args.warmup
    end = window + args.duration
    try:
        if args.mode == "open":
            r.run_open(start, window, end)
        else:
            r.run_closed(start, window, end)
    finally:
        r.shutdown()
    lat = sorted(r.latencies)
    step = max(1, len(lat) // MAX_SAMPLES)
    return {
        "generator": "python",
        "mode": args.mode,
        "mix": args.mix,
        "rate": args.rate if args.mode == "open" else None,
        "connections": args.connections,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "window_start_time": wall_start + args.warmup,
        "completed": r.completed,
        "body_bytes": r.measured_bytes,
        "requests_per_s": r.completed / args.duration,
        "mb_per_s": r.measured_bytes / args.duration / 1e6,
        "latency_s": _percentiles(lat),
        "latency_samples_s": [round(x, 7) for x in lat[::step]],
        "latency_by_size_s": {str(size): dict(_percentiles(sorted(values)), count=len(values))
                              for size, values in sorted(r.by_size.items()) if values},
        "slow_requests": r.slow,
        "errors": r.errors,
        "statuses": r.statuses,
        "overloaded": r.overloaded,
    }


def _percentiles(lat: List[float]) -> Dict[str, Optional[float]]:
    def pick(q: float) -> Optional[float]:
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    return {"p50": pick(0.50), "p99": pick(0.99), "p99.9": pick(0.999),
            "max": lat[-1] if lat else None, "mean": sum(lat) / len(lat) if lat else None}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load.client", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: requests per second")
    parser.add_argument("--connections", type=int, default=64,
                        help="closed loop: connections; open loop: most connections opened")
    parser.add_argument("--mix", default="1k")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (time.time())")
    parser.add_argument("--token", default=None, help="sent as Authorization: Bearer")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("--host: loopback only")
    if not (0 < args.rate <= 1e6 and 1 <= args.connections <= 4096 and 0 < args.duration <= 3600):
        parser.error("--rate, --connections or --duration out of range")
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
