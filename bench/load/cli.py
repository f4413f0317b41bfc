"""``python -m bench.load``: run the cases, write results.json, results.md and PNGs.

A case is one server x one body mix x one mode.  Each case starts its server
afresh (pinned to core 0), loads it from core 1 for ``--warmup`` then
``--duration`` seconds, and measures only the second part.  ``--workers 1,2``
runs Sluice once per worker count (``sluice serve --workers N``); with more than
one worker nothing is pinned: the workers and the load generator share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from . import report, servers, wrk
from .bodies import MIXES, largest_body
from .procstat import TreeSampler, cpu_seconds

__all__ = ["main"]

#: Open-loop rates per mix when --rate is not given: well inside what every
#: server here sustains, so the latencies say something about service time.
DEFAULT_RATES = {"1k": 2000.0, "64k": 1000.0, "1m": 100.0, "5m": 20.0, "mix": 1000.0, "seed": 500.0}
#: The gateway's --max-body unless a mix sends more (then raised to fit it).
GATEWAY_MAX_BODY = 1024 * 1024
#: Seconds between a client's launch and its first request.
START_DELAY = 1.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=("seed",), default=None,
                   help="seed: the design load (500 req/s open loop of the seed mix, Kinesis sink, "
                        "--ack received, access control on, 600 s after 60 s of warm-up, against nginx "
                        "and uvicorn), then a table of its targets, each met or missed; any flag given "
                        "as well overrides the profile's")
    p.add_argument("--python", default="current",
                   help="gateway interpreter: cpython, pypy, current (default) or a path")
    p.add_argument("--sink", choices=("null", "file", "kinesis"), default="null")
    p.add_argument("--sizes", default="1k", help="comma-separated body mixes: %s" % ", ".join(MIXES))
    p.add_argument("--modes", default="open,closed", help="open, closed or both")
    p.add_argument("--rate", type=float, default=None, help="open loop requests/s (default: per mix)")
    p.add_argument("--connections", type=int, default=32, help="closed loop connections")
    p.add_argument("--open-connections", type=int, default=256, help="open loop: most connections")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--warmup", type=float, default=None, help="seconds before measuring (default 5 PyPy, 2)")
    p.add_argument("--peers", default="", help="comma-separated: %s" % ", ".join(servers.PEERS))
    p.add_argument("--generator", choices=("auto", "python", "wrk"), default="auto",
                   help="closed loop generator (auto: wrk when installed)")
    p.add_argument("--client-python", default=sys.executable, help="interpreter of the Python generator")
    p.add_argument("--redis", choices=("auto", "off"), default="auto",
                   help="auto: access control with a real redis-server when the gateway has --redis")
    p.add_argument("--tracemalloc", action="store_true", help="CPython gateway: run tracemalloc (slower)")
    p.add_argument("--stalls", action="store_true",
                   help="time every event-loop task step and report the stalls (steps of 1 ms or more) "
                        "by task, with the GC time inside them (costs two clock reads per step)")
    p.add_argument("--young-census", action="store_true",
                   help="halfway through the window, list the gateway's objects born in half a second "
                        "and still alive: what its young collections keep (holds the loop twice for "
                        "a moment, so that run's latency is not representative)")
    p.add_argument("--vmprof", action="store_true",
                   help="sample the gateway's measured window with vmprof (must be importable by the "
                        "gateway's interpreter) into NAME.vmprof in the results directory")
    p.add_argument("--workers", default="1",
                   help="comma-separated sluice serve --workers counts, one Sluice case each (default 1); "
                        "above 1 nothing is pinned")
    p.add_argument("--no-pin", action="store_true",
                   help="pin nothing in any case (compare --workers 1,2 with the same placement)")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for sluice serve, repeatable (e.g. --gateway-arg=--ack=received)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--cache", default=os.path.join(servers.ROOT, ".bench-peers"))
    p.add_argument("--out", default=None, help="results directory (default bench/results/TIMESTAMP)")
    return p


def _interpreter(choice: str) -> str:
    if choice == "current":
        return sys.executable
    return servers.PYTHONS.get(choice, choice)


def _sleep_until(t: float) -> None:
    for _ in range(100_000):
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _run_case(args: argparse.Namespace, server: servers.Child, mode: str, mix: str, warmup: float,
              workdir: str, token: Optional[str], gateway: bool, pin: bool = True) -> Dict[str, Any]:
    sampler = TreeSampler(server.pid).start()
    try:
        use_wrk = mode == "closed" and (args.generator == "wrk"
                                        or (args.generator == "auto" and wrk.available()))
        if use_wrk:
            if warmup > 0:
                wrk.run(server.port, mix, args.connections, warmup, workdir, token, pin=pin)
            pids = sampler.pids()
            t0, c0 = time.time(), cpu_seconds(pids)
            if gateway:
                server.signal(signal.SIGUSR1)
            load = wrk.run(server.port, mix, args.connections, args.duration, workdir, token, pin=pin)
            t1, c1 = time.time(), cpu_seconds(pids)
            if gateway:
                server.signal(signal.SIGUSR1)
        else:
            start = time.time() + START_DELAY
            rate = args.rate or DEFAULT_RATES[mix]
            command = (servers.pinned if pin else servers.unpinned)(servers.CLIENT_CORE, [
                args.client_python, "-m", "bench.load.client", "--port", str(server.port), "--mode", mode,
                "--mix", mix, "--rate", str(rate), "--warmup", str(warmup), "--duration", str(args.duration),
                "--start-at", repr(start), "--connections",
                str(args.open_connections if mode == "open" else args.connections)]
                + (["--token", token] if token else []))
            client = subprocess.Popen(command, cwd=servers.ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE,
                                      env=dict(os.environ, PYTHONPATH=servers.ROOT))
            try:
                _sleep_until(start + warmup)
                pids = sampler.pids()
                t0, c0 = time.time(), cpu_seconds(pids)
                if gateway:
                    server.signal(signal.SIGUSR1)
                if gateway and args.young_census:
                    _sleep_until(start + warmup + args.duration / 2)
                    server.signal(signal.SIGUSR2)
                    time.sleep(YOUNG_CENSUS_SPAN)
                    server.signal(signal.SIGUSR2)
                _sleep_until(start + warmup + args.duration)
                t1, c1 = time.time(), cpu_seconds(pids)
                if gateway:
                    server.signal(signal.SIGUSR1)
                out, err = client.communicate(timeout=args.duration + warmup + 120)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            if client.returncode != 0:
                raise RuntimeError("load generator failed: %s" % err.decode()[-2000:])
            load = json.loads(out)
        time.sleep(0.3)  # one more RSS sample after the load
        if gateway:
            server.signal(signal.SIGUSR1)  # the heap census, now that no request waits on it
    finally:
        sampler.stop()
    return {"load": load, "window": [t0, t1], "cpu_percent": 100.0 * (c1 - c0) / (t1 - t0),
            "rss_samples": sampler.samples}


def _start(name: str, workers: int, python: str, args: argparse.Namespace, case_dir: str,
           probe_file: str, kinesis_url: str, redis_url: str, vmprof: str = "") -> servers.Child:
    if workers:
        return servers.start_gateway(python, args.sink, case_dir, probe_file=probe_file,
                                     tracemalloc=args.tracemalloc, kinesis_url=kinesis_url,
                                     redis_url=redis_url, extra=args.gateway_arg, workers=workers,
                                     pin=not args.no_pin, stalls=args.stalls,
                                     vmprof=vmprof)
    return servers.start_peer(name, case_dir, args.cache)


#: Seconds between the two signals of ``--young-census``: a few of PyPy's
#: young collections at the design load (one about every 70 ms).
YOUNG_CENSUS_SPAN = 0.5
#: What ``--profile seed`` sets, unless the flag is given too.  The warm-up
#: outlasts ``--jit-settle``'s 20,000 requests (40 s at 500/s): the window
#: measures the settled gateway, not PyPy compiling its hot paths.
SEED_PROFILE = {"sink": "kinesis", "sizes": "seed", "modes": "open", "rate": 500.0, "duration": 600.0,
                "warmup": 60.0, "peers": "nginx,uvicorn", "workers": "1"}


def _apply_profile(args: argparse.Namespace, argv: List[str]) -> None:
    if args.profile != "seed":
        return
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for name, value in SEED_PROFILE.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
    if not any(a.startswith("--ack") for a in args.gateway_arg):
        args.gateway_arg.insert(0, "--ack=received")


def main(argv: Optional[List[str]] = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(raw)
    _apply_profile(args, raw)
    python = _interpreter(args.python)
    mixes = [m for m in args.sizes.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    for m in mixes:
        if m not in MIXES:
            raise SystemExit("--sizes: unknown mix %r" % m)
    for p in peers:
        if p not in servers.PEERS:
            raise SystemExit("--peers: unknown peer %r" % p)
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        raise SystemExit("--workers: comma-separated whole numbers, e.g. 1,2") from None
    if not worker_counts or min(worker_counts) < 1:
        raise SystemExit("--workers: comma-separated whole numbers, e.g. 1,2")
    if not set(modes) <= {"open", "closed"} or not 0 < args.duration <= 3600:
        raise SystemExit("--modes or --duration out of range")
    largest = largest_body(mixes)
    if largest > GATEWAY_MAX_BODY:
        if args.sink == "kinesis":
            # The Kinesis stub is a 1 MiB stream (bench/load/stubs.py).
            raise SystemExit("--sizes: bodies over 1 MiB need --sink null or file")
        if not any(a.startswith("--max-body") for a in args.gateway_arg):
            args.gateway_arg = ["--max-body=%d" % largest] + list(args.gateway_arg)
    implementation = subprocess.run([python, "-c", "import platform;print(platform.python_implementation())"],
                                    capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    warmup = args.warmup if args.warmup is not None else (5.0 if implementation == "PyPy" else 2.0)
    if args.vmprof and subprocess.run([python, "-c", "import vmprof"], capture_output=True,
                                      timeout=60).returncode != 0:
        raise SystemExit("bench.load: --vmprof: %s cannot import vmprof (install it with %s -m pip install "
                         "vmprof)" % (python, python))
    out = args.out or os.path.join(servers.ROOT, "bench", "results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    workdir = servers.scratch()
    helpers: List[servers.Child] = []
    cases: List[Dict[str, Any]] = []
    notes: List[str] = []
    try:
        kinesis_url, redis_url, token = "", "", None
        if args.sink == "kinesis":
            helpers.append(servers.start_kinesis())
            kinesis_url = "http://127.0.0.1:%d" % helpers[-1].port
        if args.redis == "auto" and servers.gateway_has_redis(python):
            helpers.append(servers.start_redis(workdir))
            redis_url = "redis://127.0.0.1:%d/0" % helpers[-1].port
            token = servers.create_key(python, redis_url)
            notes.append("access control on: real redis-server, one key, Authorization: Bearer")
        else:
            notes.append("access control off: the gateway has no --redis flag" if args.redis == "auto"
                         else "access control off (--redis off)")
        label = "sluice-%s" % ("pypy" if implementation == "PyPy" else "cpython")
        # Sluice cases: (name, worker count); peers: (name, 0).
        servers_run = [(label if n == 1 else "%s-w%d" % (label, n), n) for n in worker_counts]
        if args.no_pin:
            notes.append("--no-pin: nothing pinned (servers and load generator share every core)")
        if any(n > 1 for n in worker_counts):
            notes.append("sluice-*-wN: sluice serve --workers N, nothing pinned (the workers and the load "
                         "generator share every core); GC and allocation columns are the supervisor's: "
                         "left out")
        for mix in mixes:
            for mode in modes:
                for name, workers in servers_run + [(p, 0) for p in peers]:
                    case_dir = os.path.join(workdir, "%s-%s-%s" % (name, mix, mode))
                    os.makedirs(case_dir)
                    probe_file = os.path.join(case_dir, "probe.json")
                    try:
                        vmprof = (os.path.join(out, os.path.basename(case_dir) + ".vmprof")
                                  if args.vmprof else "")
                        server = _start(name, workers, python, args, case_dir, probe_file, kinesis_url,
                                        redis_url, vmprof)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        notes.append("%s %s %s not run: %s" % (name, mix, mode, str(exc).splitlines()[0]))
                        print("bench.load: %s" % notes[-1], file=sys.stderr, flush=True)
                        continue
                    try:
                        print("bench.load: %s %s %s ..." % (name, mix, mode), file=sys.stderr, flush=True)
                        result = _run_case(args, server, mode, mix, warmup, case_dir,
                                           token if workers else None, bool(workers),
                                           pin=workers <= 1 and not args.no_pin)
                    finally:
                        server.stop()
                    probe = None
                    # With workers the probe sees only the idle supervisor.
                    if workers == 1 and os.path.exists(probe_file):
                        with open(probe_file) as f:
                            probe = json.load(f)
                    window = (result["window"][0], result["window"][1])
                    case = {"name": "%s-%s-%s" % (name, mix, mode), "server": name, "mix": mix, "mode": mode,
                            "sink": args.sink if workers else None, "workers": workers or None, **result,
                            "rss": report.rss_summary(result["rss_samples"], window),
                            "gc": report.gc_summary(probe, window),
                            "allocation": report.allocation_per_request(probe, window),
                            "gateway_statistics": probe.get("statistics") if probe else None,
                            "stalls": report.stall_summary(probe, window),
                            "stall_log": [s for s in ((probe or {}).get("stalls") or {}).get("stalls", [])
                                          if window[0] <= s[0] < window[1]][:50_000],
                            "heap": report.heap_summary(probe),
                            "young": (probe or {}).get("young"),
                            "gc_pauses": [p for p in (probe or {}).get("pauses", [])
                                          if window[0] <= p[0] < window[1]][:200_000]}
                    case["slow"] = report.slow_summary(case)
                    cases.append(case)
    finally:
        for helper in reversed(helpers):
            helper.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"python": python, "implementation": implementation, "sink": args.sink, "warmup_s": warmup,
            "duration_s": args.duration, "argv": sys.argv[1:] if argv is None else argv, "notes": notes,
            "nproc": os.cpu_count(), "workers": worker_counts, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f)
    table = report.markdown(cases)
    if args.profile == "seed":
        table += "\n" + report.seed_targets(cases, implementation, args.gateway_arg)
    table += report.details(cases)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# Load run %s\n\n%s\n\n%s\n" % (meta["started"], "\n".join("- " + n for n in notes), table))
    if not args.no_plots:
        _plots(args, out, notes)
    print(table)
    print("bench.load: results in %s" % out, file=sys.stderr)
    return 0


def _plots(args: argparse.Namespace, out: str, notes: List[str]) -> None:
    try:
        import matplotlib  # noqa: F401

        python = sys.executable
    except ImportError:
        python = os.path.join(args.cache, "venv", "bin", "python")
        if not os.path.exists(python):
            notes.append("no plots: matplotlib not installed (run once with a peer to create %s)" % python)
            return
    subprocess.run([python, "-m", "bench.load.plot", out], cwd=servers.ROOT, check=True, timeout=600,
                   env=dict(os.environ, PYTHONPATH=servers.ROOT))
