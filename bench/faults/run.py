"""The load-with-faults run: a gateway process with ``--ack spool`` under a steady rate, faults on a schedule.

See bench/faults/__init__.py for what it does and prints.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Counter, Dict, List, Optional, Sequence, Tuple

from bench.faults.client import Outcome, SteadyClient
from bench.faults.endpoint import RecordingEndpoint, sequence_of
from bench.load.procstat import rss_bytes, tree
from bench.load.servers import ROOT, Child, free_port

__all__ = ["main", "count", "FAULTS"]

#: Every body starts with this and the request's sequence number.
PREFIX = b"fault-load "
FAULTS = ("sink", "redis", "kill", "worker")
#: Seconds the gateway gets to come back after a kill, and Redis.
START_TIMEOUT = 60.0
#: Seconds between two looks at the sink while waiting for it to catch up,
#: and between two RSS samples of the gateway.
POLL = 0.5
#: Sequence numbers listed in the JSON report per kind of problem.
LISTED = 50


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description="Load a gateway (--ack spool) at a steady rate while faults are injected on a "
                    "schedule; print and save the exact count. Exit status 1 if an acknowledged "
                    "record was lost.")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--body-size", type=int, default=1024, help="bytes per body (default 1024)")
    parser.add_argument("--sink", choices=("kinesis", "file"), default="kinesis",
                        help="kinesis: a recording Kinesis-compatible endpoint in this process "
                             "(the sink outage needs it); file: the file sink")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="which faults to inject, of %s (default all)" % ",".join(FAULTS))
    parser.add_argument("--on-redis-failure", choices=("closed", "open"), default="closed")
    parser.add_argument("--spool-size", default="64MiB")
    parser.add_argument("--workers", default="",
                        help="the gateway's --workers (default: its own default)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the gateway")
    parser.add_argument("--threads", type=int, default=16, help="client threads (default 16)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after the load for the sink to catch up (default 120)")
    parser.add_argument("--json", default="", help="report file (default bench/results/faults-TIME.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "AWS_"))}
    env["PYTHONPATH"] = ROOT
    env.update(AWS_ACCESS_KEY_ID="faults", AWS_SECRET_ACCESS_KEY="faults", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    return env


class Restartable:
    """A server child on a fixed port that can be killed and started again."""

    def __init__(self, name: str, command: List[str], port: int,
                 ready: Optional[Callable[[str], bool]] = None) -> None:
        self.name = name
        self.command = command
        self.port = port
        #: Whether a line of its stderr says it is wholly up (beyond listening).
        self.ready = ready
        self.child: Optional[Child] = None
        self.runs: List[Dict[str, Any]] = []
        self._sampler: Optional[threading.Thread] = None
        self._sampling = threading.Event()

    def start(self) -> None:
        started = time.monotonic()
        self.child = Child(self.name, self.command, env=_env()).wait_port(self.port)
        if self.ready is not None:
            self._wait_ready(self.child, self.ready)
        self.runs.append({"pid": self.child.pid, "start_seconds": round(time.monotonic() - started, 3),
                          "peak_rss": 0, "exit": None})
        self._sampling.clear()
        self._sampler = threading.Thread(target=self._sample, args=(self.child, self.runs[-1]), daemon=True)
        self._sampler.start()

    def _wait_ready(self, child: Child, ready: Callable[[str], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not any(ready(line) for line in list(child.lines)):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                child.stop()
                raise RuntimeError("%s did not start: %s" % (self.name, "\n".join(child.lines[-20:])))
            time.sleep(0.02)

    def _sample(self, child: Child, run: Dict[str, Any]) -> None:
        while not self._sampling.is_set() and child.proc.poll() is None:
            run["peak_rss"] = max(run["peak_rss"], rss_bytes(tree(child.pid)))
            self._sampling.wait(POLL)

    def _ended(self, status: Optional[int]) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        self.runs[-1]["exit"] = status
        if self.child is not None:
            # Its events (the gateway writes no line per request).
            self.runs[-1]["stderr_tail"] = self.child.lines[-20:]

    def kill(self) -> None:
        """SIGKILL to the process and every descendant at once, as a crash of its host would.

        A gateway with ``--workers`` above 1 is a supervisor whose workers
        run in sessions of their own: killing the supervisor alone leaves
        them draining, holding their spools.
        """
        assert self.child is not None
        pids = tree(self.child.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._ended(self.child.proc.wait())
        _wait_gone(pids[1:])
        self.child.stop()  # anything left in its process group

    def kill_one_worker(self) -> str:
        """SIGKILL one worker of a supervised gateway (its supervisor starts another)."""
        assert self.child is not None
        workers = tree(self.child.pid)[1:]
        if not workers:
            return "no worker to kill (a single process)"
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[0], signal.SIGKILL)
        return "pid %d" % workers[0]

    def stop(self) -> Optional[int]:
        """SIGTERM (graceful), then SIGKILL if it does not exit; the exit status."""
        if self.child is None or self.runs[-1]["exit"] is not None:
            return None
        status = self.child.stop()
        self._ended(status)
        return status

    def stderr(self) -> str:
        return "\n".join(self.child.lines) if self.child is not None else ""


def _gateway_ready(line: str) -> bool:
    """Every worker listens: the supervisor's ``supervisor_started``, or a lone process's ``started``.

    Before that, a worker killed while starting stops the whole gateway (a
    configuration that cannot start is not retried).
    """
    if '"event":"supervisor_started"' in line:
        return True
    return '"event":"started"' in line and '"worker":' not in line


def _wait_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Wait until none of ``pids`` (not our children) runs: gone, or a zombie."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.01)


class Schedule:
    """Faults at fractions of the run: ``(fraction, label, action)``, run in order from one thread."""

    def __init__(self) -> None:
        self.steps: List[Tuple[float, str, Callable[[], Optional[str]]]] = []
        self.events: List[Dict[str, Any]] = []

    def at(self, fraction: float, label: str, action: Callable[[], Optional[str]]) -> None:
        """Run ``action`` at ``fraction`` of the run; what it returns is added to the label."""
        self.steps.append((fraction, label, action))

    def run(self, start: float, duration: float) -> None:
        for fraction, label, action in sorted(self.steps, key=lambda step: step[0]):
            delay = start + fraction * duration - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            began = time.monotonic()
            detail = action()
            self.events.append({"t": round(began - start, 2), "event": label, "detail": detail,
                                "took": round(time.monotonic() - began, 2)})
            print("  t=%6.1fs  %s%s" % (began - start, label, " (%s)" % detail if detail else ""),
                  flush=True)


def _stored_from_files(data_dir: str) -> Tuple[Counter[int], Dict[int, str]]:
    from sinks.envelope import split_record
    from sinks.file import read_records

    copies: Counter[int] = collections.Counter()
    ids: Dict[int, str] = {}
    if not os.path.isdir(data_dir):
        return copies, ids
    # With --workers above 1 each worker writes to its own worker-N directory.
    directories = [data_dir] + sorted(os.path.join(data_dir, name) for name in os.listdir(data_dir)
                                      if name.startswith("worker-"))
    for directory in directories:
        for data in read_records(directory):
            meta, body = split_record(data)
            sequence = sequence_of(bytes(body[:40]), PREFIX)
            if sequence is not None:
                copies[sequence] += 1
                ids.setdefault(sequence, meta["id"])
    return copies, ids


def count(outcomes: Sequence[Outcome], copies: Counter[int], ids: Dict[int, str]) -> Dict[str, Any]:
    """The exact count: what was sent, answered and stored, and what was lost or stored twice."""
    sent = [o for o in outcomes if o.sent]
    acked = {o.sequence: o.record_id for o in sent if o.status == 202}
    refused: Counter[str] = collections.Counter(o.kind for o in sent if o.status != 202)
    sent_sequences = {o.sequence for o in sent}
    stored = [s for s in sent_sequences if copies.get(s)]
    lost = sorted(s for s, rid in acked.items() if not copies.get(s) or ids.get(s) != rid)
    twice = sorted(s for s in stored if copies[s] > 1)
    unacked_stored = sorted(s for s in stored if s not in acked)
    return {
        "sent": len(sent),
        "acknowledged": len(acked),
        "refused": sum(refused.values()),
        "refused_by_status": dict(sorted(refused.items())),
        "stored": len(stored),
        "stored_not_acknowledged": len(unacked_stored),
        "duplicated": len(twice),
        "extra_copies": sum(copies[s] - 1 for s in twice),
        "lost": len(lost),
        "lost_sequences": lost[:LISTED],
        "duplicated_sequences": twice[:LISTED],
        "stored_unsent": sum(n for s, n in copies.items() if s not in sent_sequences),
    }


def per_second(outcomes: Sequence[Outcome], start: float) -> List[Dict[str, int]]:
    """Outcomes by the second their request was due."""
    seconds: Dict[int, Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        if o.sent:
            seconds[int(o.due - start)][o.kind] += 1
    return [dict(seconds[s], second=s) for s in range(max(seconds) + 1)] if seconds else []


def table(counts: Dict[str, Any]) -> str:
    rows = [("sent", counts["sent"]), ("acknowledged (202)", counts["acknowledged"])]
    rows += [("refused: %s" % kind, n) for kind, n in counts["refused_by_status"].items()]
    rows += [("stored (distinct records)", counts["stored"]),
             ("stored, not acknowledged", counts["stored_not_acknowledged"]),
             ("duplicated (stored more than once)", counts["duplicated"]),
             ("lost (acknowledged, not stored)", counts["lost"])]
    width = max(len(label) for label, _ in rows)
    lines = ["| %s | records |" % "count".ljust(width), "|%s|---:|" % ("-" * (width + 2))]
    lines += ["| %s | %d |" % (label.ljust(width), n) for label, n in rows]
    return "\n".join(lines)


def _wait_stored(acked: Dict[int, str], look: Callable[[], Tuple[Counter[int], Dict[int, str]]],
                 timeout: float) -> float:
    """Wait until every acknowledged record is stored (or ``timeout``); the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        copies, _ = look()
        if all(copies.get(s) for s in acked):
            break
        time.sleep(POLL)
    return time.monotonic() - began


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        _parser().error("--faults: unknown %s" % ",".join(sorted(unknown)))
    if "sink" in faults and args.sink != "kinesis":
        _parser().error("--faults sink needs --sink kinesis (the file sink cannot be taken away)")
    work = tempfile.mkdtemp(prefix="sluice-faults-")
    endpoint: Optional[RecordingEndpoint] = None
    redis: Optional[Restartable] = None
    gateway: Optional[Restartable] = None
    try:
        port = free_port()
        command = [args.python, "-m", "gateway", "serve", "--listen", "127.0.0.1:%d" % port,
                   "--ack", "spool", "--spool-dir", os.path.join(work, "spool"),
                   "--spool-size", args.spool_size]
        if args.workers:
            command += ["--workers", args.workers]
        data_dir = os.path.join(work, "data")
        if args.sink == "kinesis":
            endpoint = RecordingEndpoint(PREFIX)
            command += ["--sink", "kinesis", "--stream", "faults", "--endpoint-url", endpoint.url,
                        "--region", "us-east-1"]
            look = endpoint.snapshot
        else:
            command += ["--sink", "file", "--data-dir", data_dir]
            look = lambda: _stored_from_files(data_dir)  # noqa: E731
        headers: Dict[str, str] = {}
        if "redis" in faults:
            redis, key = _start_redis(work)
            command += ["--redis", "redis://127.0.0.1:%d/0" % redis.port,
                        "--on-redis-failure", args.on_redis_failure]
            headers["Authorization"] = "Bearer " + key
        gateway = Restartable("sluice", command, port, ready=_gateway_ready)
        gateway.start()

        schedule = _schedule(faults, args.duration, endpoint, redis, gateway)
        client = SteadyClient(("127.0.0.1", port), rate=args.rate, body_size=args.body_size,
                              prefix=PREFIX, headers=headers, threads=args.threads)
        print("fault load: %gs at %g req/s, %d-byte bodies, sink %s, --ack spool, faults %s"
              % (args.duration, args.rate, args.body_size, args.sink, ",".join(faults) or "none"), flush=True)
        client.run()
        schedule.run(client.start, args.duration)
        time.sleep(max(0.0, client.start + args.duration - time.monotonic()))
        client.stop()
        outcomes = client.snapshot()
        acked = {o.sequence: o.record_id for o in outcomes if o.status == 202}
        drained = _wait_stored(acked, look, args.drain_timeout)
        gateway_exit = gateway.stop()
        counts = count(outcomes, *look())
        report = {
            "settings": {"duration": args.duration, "rate": args.rate, "body_size": args.body_size,
                         "sink": args.sink, "ack": "spool", "faults": faults,
                         "on_redis_failure": args.on_redis_failure if redis else None,
                         "spool_size": args.spool_size, "workers": args.workers or "default",
                         "threads": args.threads,
                         "python": args.python},
            "events": schedule.events,
            "counts": counts,
            "drain_seconds": round(drained, 2),
            "gateway_runs": gateway.runs,
            "gateway_exit": gateway_exit,
            "endpoint_calls": endpoint.calls if endpoint else None,
            "endpoint_foreign_records": endpoint.foreign if endpoint else None,
            "per_second": per_second(outcomes, client.start),
        }
        print()
        print(table(counts))
        path = args.json or os.path.join(ROOT, "bench", "results", "faults-%s.json" % time.strftime(
            "%Y%m%d-%H%M%S"))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print("\nreport: %s" % path)
        if counts["lost"]:
            print("LOST %d acknowledged records (first: %s)"
                  % (counts["lost"], counts["lost_sequences"][:10]))
            print(gateway.stderr()[-4000:], file=sys.stderr)
            return 1
        return 0
    finally:
        for server in (gateway, redis):
            if server is not None:
                server.stop()
        if endpoint is not None:
            endpoint.stop()
        if args.keep:
            print("work directory kept: %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _start_redis(work: str) -> Tuple[Restartable, str]:
    """redis-server with an append-only file (the key survives a kill), and an API key in it."""
    from gateway.access import keystore

    directory = os.path.join(work, "redis")
    os.makedirs(directory)
    port = free_port()
    server = Restartable("redis-server", [
        shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", directory,
        "--daemonize", "no"], port)
    server.start()
    admin = keystore.connect("redis://127.0.0.1:%d/0" % port)
    try:
        key = keystore.create_key(admin, "faults", time.time()).api_key
    finally:
        admin.close()
    return server, key


def _schedule(faults: Sequence[str], duration: float, endpoint: Optional[RecordingEndpoint],
              redis: Optional[Restartable], gateway: Restartable) -> Schedule:
    """The faults, at fixed fractions of the run (see the package docstring)."""
    schedule = Schedule()
    if "sink" in faults and endpoint is not None:
        schedule.at(0.15, "sink unreachable", endpoint.down)
        schedule.at(0.40, "sink back", endpoint.up)
    if "kill" in faults:
        # Once while the sink is away (the spool holds unshipped records),
        # once in normal flow (records in every state).
        for fraction in (0.30, 0.75):
            schedule.at(fraction, "gateway SIGKILLed", gateway.kill)
            schedule.at(fraction + 0.01, "gateway restarted", gateway.start)
    if "worker" in faults:
        schedule.at(0.65, "one worker SIGKILLed", gateway.kill_one_worker)
    if "redis" in faults and redis is not None:
        schedule.at(0.55, "Redis SIGKILLed", redis.kill)
        schedule.at(0.55 + min(0.05, 3.0 / duration), "Redis restarted", redis.start)
    return schedule
