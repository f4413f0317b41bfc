"""Figures of one case from its raw measurements, and the Markdown table of a run."""
from __future__ import annotations

import bisect
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["gc_summary", "rss_summary", "allocation_per_request", "markdown", "seed_targets",
           "stall_summary", "slow_summary", "heap_summary", "details"]

_UNITS = {"kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "b": 1}


def _size(text: Optional[str]) -> Optional[int]:
    """PyPy's reading of ``PYPY_GC_NURSERY`` ("4MB" is 4 * 1024 * 1024 there)."""
    if not text:
        return None
    t = text.strip().lower()
    for suffix in ("gb", "mb", "kb", "g", "m", "k", "b"):
        if t.endswith(suffix):
            power = " kmg".index(suffix[0]) if suffix[0] in "kmg" else 0
            return int(float(t[: -len(suffix)]) * 1024 ** power)
    return int(t)


def _pick(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def gc_summary(probe: Optional[Dict[str, Any]], window: Tuple[float, float]) -> Optional[Dict[str, Any]]:
    """Pauses inside ``window`` (wall-clock): count, p99, max, and total seconds."""
    if not probe:
        return None
    start, end = window
    events = 0
    durations: List[float] = []
    longest = 0.0
    total = 0.0
    for t, duration, _kind, count, longest_one in probe["pauses"]:
        if start <= t < end:
            events += count
            total += duration
            # A hook call covering `count` events is taken as `count` pauses of its mean length.
            durations.extend([duration / max(1, count)] * min(count, 1000))
            longest = max(longest, longest_one)
    durations.sort()
    return {"count": events, "p99_s": _pick(durations, 0.99), "max_s": longest if events else None,
            "total_s": total, "share": total / (end - start) if end > start else None}


def rss_summary(samples: Sequence[Tuple[float, int]], window: Tuple[float, float]) -> Dict[str, Any]:
    start, end = window
    inside = [rss for t, rss in samples if start + (end - start) / 2 <= t < end]
    return {"peak_bytes": max((rss for _, rss in samples), default=None),
            "steady_bytes": statistics.median(inside) if inside else None}


def allocation_per_request(probe: Optional[Dict[str, Any]],
                           window: Tuple[float, float]) -> Optional[Dict[str, Any]]:
    """PyPy: nursery bytes per request (minor collections x nursery size).
    CPython with tracemalloc: traced memory growth and peak over the window, per request."""
    if not probe or len(probe.get("marks", [])) < 2:
        return None
    first, last = probe["marks"][0], probe["marks"][-1]
    requests = last.get("requests", 0) - first.get("requests", 0)
    if requests <= 0:
        return None
    if probe["implementation"] == "PyPy":
        nursery = _size(probe.get("pypy_gc_nursery"))
        minors = sum(p[3] for p in probe["pauses"] if p[2] == "minor" and window[0] <= p[0] < window[1])
        if not nursery:
            return None
        return {"kind": "pypy nursery bytes/request", "bytes": minors * nursery / requests}
    if "traced_current" in last:
        return {"kind": "cpython tracemalloc retained bytes/request",
                "bytes": (last["traced_current"] - first["traced_current"]) / requests,
                "traced_peak_bytes": last["traced_peak"]}
    gen0 = last["gc_stats"][0]["collections"] - first["gc_stats"][0]["collections"]
    return {"kind": "cpython gen0 collections per 1k requests", "bytes": None,
            "gen0_per_1k": 1000 * gen0 / requests}


def _ms(x: Optional[float]) -> str:
    return "–" if x is None else ("%.2f" % (x * 1e3) if x < 0.1 else "%.0f" % (x * 1e3))


def _size_name(size: int) -> str:
    return "%d KiB" % (size // 1024) if size % 1024 == 0 else "%d KB" % (size // 1000)


def _mb(x: Optional[float]) -> str:
    return "–" if x is None else "%.0f" % (x / 1e6)


def markdown(cases: List[Dict[str, Any]]) -> str:
    """One row per case; ``×sluice`` is requests/s against Sluice's in the same mode and mix."""
    base: Dict[Tuple[str, str], float] = {}
    for c in cases:  # the first Sluice case of each mode and mix (--workers 1,2: one worker)
        if c["server"].startswith("sluice"):
            base.setdefault((c["mode"], c["mix"]), c["load"]["requests_per_s"])
    head = ("| server | mode | mix | req/s | ×sluice | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | CPU % "
            "| RSS peak MB | RSS steady MB | GC pauses | GC p99 ms | GC max ms | alloc/req | errors |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        load, lat = c["load"], c["load"]["latency_s"]
        ref = base.get((c["mode"], c["mix"]))
        ratio = "%.2f" % (load["requests_per_s"] / ref) if ref else "–"
        gc = c.get("gc") or {}
        alloc = c.get("allocation") or {}
        if alloc.get("bytes") is not None:
            alloc_text = "%.0f B (%s)" % (alloc["bytes"], alloc["kind"].split()[0])
        elif alloc.get("gen0_per_1k") is not None:
            alloc_text = "%.1f gen0/1k" % alloc["gen0_per_1k"]
        else:
            alloc_text = "–"
        mode = c["mode"] + (" %g/s" % load["rate"] if load.get("rate") else " c%d" % load["connections"])
        errors = sum(load["errors"].values())
        row = "| %s" * 3 + " | %.0f | %s | %.1f" + " | %s" * 4 + " | %.0f" + " | %s" * 6 + " | %d |"
        rows.append(row % (
            c["server"], mode, c["mix"], load["requests_per_s"], ratio, load["mb_per_s"], _ms(lat["p50"]),
            _ms(lat["p99"]), _ms(lat["p99.9"]), _ms(lat["max"]), c["cpu_percent"],
            _mb(c["rss"]["peak_bytes"]), _mb(c["rss"]["steady_bytes"]),
            gc.get("count", "–"), _ms(gc.get("p99_s")), _ms(gc.get("max_s")), alloc_text, errors))
    return "\n".join(rows) + "\n"


#: The design load's targets (``--profile seed``), per interpreter.
SEED_CPU_PERCENT = {"PyPy": 10.0, "CPython": 30.0}
SEED_RSS_BYTES = {"PyPy": 128 * 1024 * 1024, "CPython": 80 * 1024 * 1024}
#: p99 above the client's own floor (nginx in the same run), --ack received.
SEED_P99_OVER_FLOOR_S = 0.0005
SEED_MAX_LATENCY_S = 0.010
SEED_CPYTHON_P99_S = 0.006
SEED_MAX_GC_PAUSE_S = 0.002
#: --ack kinesis: p99 within the linger plus this.
SEED_ACK_P99_OVER_LINGER_S = 0.005
#: RSS over the last 8 of 10 minutes stays within this fraction of its median.
SEED_RSS_FLATNESS = 0.05


def _flatness(samples: Sequence[Tuple[float, int]], window: Tuple[float, float]) -> Optional[float]:
    """Largest deviation from the median RSS over the window's last 80%, as a fraction."""
    start, end = window
    inside = [rss for t, rss in samples if start + 0.2 * (end - start) <= t < end]
    if not inside:
        return None
    middle = statistics.median(inside)
    return max(abs(rss - middle) for rss in inside) / middle


def seed_targets(cases: List[Dict[str, Any]], implementation: str, gateway_args: Sequence[str]) -> str:
    """The ``--profile seed`` targets, each marked met or missed, from one run's cases."""
    floor = next((c for c in cases if c["server"] == "nginx"), None)
    ack = "kinesis" if any(a.replace(" ", "=") == "--ack=kinesis" for a in gateway_args) else "received"
    linger = 0.010
    rows = ["| target | measured | met |", "|---|---|---|"]

    def row(name: str, value: str, ok: Optional[bool]) -> None:
        rows.append("| %s | %s | %s |" % (name, value, "–" if ok is None else ("met" if ok else "missed")))

    for c in cases:
        if not c["server"].startswith("sluice"):
            continue
        lat = c["load"]["latency_s"]
        cpu_limit = SEED_CPU_PERCENT.get(implementation, 30.0)
        row("%s CPU ≤ %.0f%% of a core" % (c["server"], cpu_limit), "%.1f%%" % c["cpu_percent"],
            c["cpu_percent"] <= cpu_limit)
        if ack == "kinesis":
            row("p99 ≤ linger (%.0f ms) + 5 ms" % (linger * 1e3), _ms(lat["p99"]) + " ms",
                lat["p99"] <= linger + SEED_ACK_P99_OVER_LINGER_S)
        elif implementation == "PyPy":
            if floor is not None:
                limit = floor["load"]["latency_s"]["p99"] + SEED_P99_OVER_FLOOR_S
                row("p99 ≤ nginx p99 + 0.5 ms (%s ms)" % _ms(limit), _ms(lat["p99"]) + " ms",
                    lat["p99"] <= limit)
            else:
                row("p99 ≤ nginx p99 + 0.5 ms", _ms(lat["p99"]) + " ms (no nginx in this run)", None)
            slow = c.get("slow")
            row("no request over 10 ms", "max %s ms%s" % (
                _ms(lat["max"]), "; %d over 10 ms" % slow["count"] if slow else ""),
                lat["max"] <= SEED_MAX_LATENCY_S)
        else:
            row("p99 ≤ 6 ms", _ms(lat["p99"]) + " ms", lat["p99"] <= SEED_CPYTHON_P99_S)
        gc = c.get("gc") or {}
        if gc.get("max_s") is not None:
            row("no GC pause over 2 ms", "max %s ms over %d pauses" % (_ms(gc["max_s"]), gc["count"]),
                gc["max_s"] <= SEED_MAX_GC_PAUSE_S)
        else:
            row("no GC pause over 2 ms", "no pause recorded", True if gc.get("count") == 0 else None)
        stalls = c.get("stalls")
        if stalls:
            sink = stalls["groups"]["sink"]
            row("no loop stall over %.0f ms from the sink (its code, or the JIT compiling it)" % (
                stalls["threshold_s"] * 1e3),
                "%s; %d with JIT work" % (
                    "%d (longest %s ms)" % (sink["code_or_jit"], _ms(sink["max_code_or_jit_s"]))
                    if sink["code_or_jit"] else "0", sink["with_jit"]), sink["code_or_jit"] == 0)
        steady = c["rss"]["steady_bytes"]
        rss_limit = SEED_RSS_BYTES.get(implementation, SEED_RSS_BYTES["CPython"])
        row("steady RSS ≤ %s MB" % _mb(rss_limit), "%s MB" % _mb(steady),
            None if steady is None else steady <= rss_limit)
        flat = _flatness(c["rss_samples"], (c["window"][0], c["window"][1]))
        row("RSS flat (last 80%% of the window within ±%.0f%%)" % (100 * SEED_RSS_FLATNESS),
            "–" if flat is None else "±%.1f%%" % (100 * flat),
            None if flat is None else flat <= SEED_RSS_FLATNESS)
    for c in cases:
        if not c["server"].startswith("sluice"):
            lat = c["load"]["latency_s"]
            rows.append("| %s (same run) | CPU %.1f%%, p99 %s ms, max %s ms, RSS %s MB | |" % (
                c["server"], c["cpu_percent"], _ms(lat["p99"]), _ms(lat["max"]),
                _mb(c["rss"]["steady_bytes"])))
    return "\n".join(rows) + "\n"


#: Groups of Sluice's tasks a stall is charged to (bench.load.stalls.group_of).
_GROUPS = ("sink", "access", "connection", "other")


def _group_of(task_name: str) -> str:
    from .stalls import group_of

    return group_of(task_name)


def stall_summary(probe: Optional[Dict[str, Any]], window: Tuple[float, float]) -> Optional[Dict[str, Any]]:
    """Loop stalls inside ``window`` by group of task: how many, how many with the
    collector's and the JIT's time taken out, how many had JIT work inside,
    and the longest of each kind."""
    if not probe or not probe.get("stalls"):
        return None
    doc = probe["stalls"]
    start, end = window
    threshold = doc["threshold_s"]
    groups: Dict[str, Dict[str, Any]] = {
        g: {"stalls": 0, "max_s": 0.0, "without_gc": 0, "max_without_gc_s": 0.0, "with_jit": 0,
            "max_jit_s": 0.0, "code_or_jit": 0, "max_code_or_jit_s": 0.0, "tasks": {}}
        for g in _GROUPS}
    # A stall is the task's own when its CPU time less the GC and JIT time
    # inside reaches the threshold; "tasks" counts where those steps ended.
    for row in doc["stalls"]:
        t, duration, cpu_s, gc_s = row[:4]
        # Documents written before JIT time was recorded have no jit_s.
        jit_s = row[4] if len(row) == 7 else 0.0
        task, place = row[-2:]
        if not start <= t < end:
            continue
        g = groups[_group_of(task)]
        g["stalls"] += 1
        g["max_s"] = max(g["max_s"], duration)
        if jit_s > 0:
            g["with_jit"] += 1
            g["max_jit_s"] = max(g["max_jit_s"], jit_s)
        # The task's own work: its thread's CPU time, less the collector's
        # and the JIT's (time preempted by the machine or waiting for the
        # GIL is not its).
        held = min(duration, cpu_s) - gc_s
        if held >= threshold:
            # The task's code or the JIT compiling it: what the task caused.
            g["code_or_jit"] += 1
            g["max_code_or_jit_s"] = max(g["max_code_or_jit_s"], held)
        own = held - jit_s
        if own >= threshold:
            g["without_gc"] += 1
            g["max_without_gc_s"] = max(g["max_without_gc_s"], own)
            g["tasks"][place] = g["tasks"].get(place, 0) + 1
    for g in groups.values():
        g["tasks"] = sorted(g["tasks"].items(), key=lambda kv: -kv[1])[:5]
    return {"threshold_s": threshold, "steps": doc["steps"], "dropped": doc["dropped"], "groups": groups,
            "busy": _busy(probe, window), "compiled": _compiled(doc.get("compiled") or [], window)}


def _compiled(rows: List[List[Any]], window: Tuple[float, float]) -> Dict[str, Dict[str, Any]]:
    """What the JIT compiled inside ``window``, by the group of the task whose
    step it was in ("between steps" when none): loops, bridges, and where
    the most frequent traces start."""
    start, end = window
    found: Dict[str, Dict[str, Any]] = {}
    for t, task, kind, where, _ in rows:
        if not start <= t < end:
            continue
        g = found.setdefault(_group_of(task) if task else "between steps",
                             {"loops": 0, "bridges": 0, "starts": {}})
        g["bridges" if kind == "bridge" else "loops"] += 1
        g["starts"][where] = g["starts"].get(where, 0) + 1
    for g in found.values():
        g["starts"] = sorted(g["starts"].items(), key=lambda kv: -kv[1])[:5]
    return found


def _busy(probe: Dict[str, Any], window: Tuple[float, float]) -> List[Tuple[str, float, int]]:
    """Seconds each task spent in its steps between the first and the last mark,
    and its steps, busiest first."""
    marks = [m for m in probe.get("marks", []) if "busy" in m]
    if len(marks) < 2:
        return []
    first, last = marks[0]["busy"], marks[-1]["busy"]
    rows = []
    for name, (seconds, steps) in last.items():
        before = first.get(name, [0.0, 0])
        rows.append((name, seconds - before[0], int(steps - before[1])))
    rows.sort(key=lambda r: -r[1])
    return rows


def busy_by_task(rows: List[Tuple[str, float, int]]) -> List[Tuple[str, float, int]]:
    """:func:`_busy`'s rows (``task @ where``) added up per task."""
    tasks: Dict[str, List[float]] = {}
    for name, seconds, steps in rows:
        task = name.split(" @ ", 1)[0]
        entry = tasks.setdefault(task, [0.0, 0])
        entry[0] += seconds
        entry[1] += steps
    return sorted(((t, v[0], int(v[1])) for t, v in tasks.items()), key=lambda r: -r[1])


def heap_summary(probe: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The interpreter's memory accounting and the heap census at the window's end."""
    marks = (probe or {}).get("marks") or []
    if len(marks) < 2:
        return None
    first, last = marks[0].get("jit"), marks[-1].get("jit")
    jit = None
    if first and last:
        # What the JIT did inside the window: in a steady state, little.
        jit = {name: last[name] - first.get(name, 0) for name in last}
    return {"memory": marks[-1].get("memory"), "census": marks[-1].get("census"), "jit": jit}


def slow_summary(case: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What the gateway was doing while each request over the client's
    ``SLOW_S`` waited: the largest cause among the loop stalls (task steps of
    1 ms or more, from ``--stalls``) and GC pauses that overlap it.

    Causes: ``jit`` and ``gc`` (inside steps, or a pause of 1 ms or more
    between them), ``preempted`` (a step's wall time beyond its thread's CPU
    time: the machine ran something else, or the step waited for the GIL),
    the step's own code by task group (``code:sink``...), or ``none`` when no
    recorded stall or pause overlaps the request.
    """
    slow = case["load"].get("slow_requests")
    if slow is None:
        return None
    # (start, end, {cause: seconds}) of every recorded stall and pause.
    spans: List[Tuple[float, float, Dict[str, float]]] = []
    for row in case.get("stall_log") or []:
        t, duration, cpu_s, gc_s = row[:4]
        jit_s = row[4] if len(row) == 7 else 0.0
        spans.append((t - duration, t, {
            "jit": jit_s, "gc": gc_s, "preempted": max(0.0, duration - cpu_s),
            "code:" + _group_of(row[-2]): max(0.0, min(duration, cpu_s) - gc_s - jit_s)}))
    in_steps = sorted((a, b) for a, b, _ in spans)
    for t, duration, *_ in case.get("gc_pauses") or []:
        if duration >= 0.001 and not _inside(in_steps, t - duration, t):
            spans.append((t - duration, t, {"gc": duration}))
    spans.sort(key=lambda span: span[0])
    starts = [a for a, _, _ in spans]
    longest_span = max((b - a for a, b, _ in spans), default=0.0)
    causes: Dict[str, int] = {}
    for began, latency, _size in slow:
        end = began + latency
        totals: Dict[str, float] = {}
        for a, b, parts in spans[bisect.bisect_left(starts, began - longest_span):
                                 bisect.bisect_left(starts, end)]:
            overlap = min(b, end) - max(a, began)
            if overlap <= 0:
                continue
            for cause, seconds in parts.items():
                totals[cause] = totals.get(cause, 0.0) + seconds * overlap / (b - a)
        cause = max(totals, key=lambda k: totals[k]) if totals else "none"
        causes[cause] = causes.get(cause, 0) + 1
    return {"count": len(slow), "longest_s": max((lat for _, lat, _ in slow), default=0.0),
            "causes": sorted(causes.items(), key=lambda kv: -kv[1])}


def _inside(spans: List[Tuple[float, float]], a: float, b: float) -> bool:
    """Whether ``[a, b]`` lies within one of the sorted ``spans`` (a step holds its GC pauses)."""
    i = bisect.bisect_right(spans, (a, float("inf")))
    return i > 0 and spans[i - 1][1] >= b - 1e-6


def details(cases: List[Dict[str, Any]]) -> str:
    """Stalls by task group and the memory breakdown of each Sluice case, when measured."""
    out: List[str] = []
    sized = [c for c in cases if (c.get("load") or {}).get("latency_by_size_s")]
    if sized:
        sizes = sorted({int(s) for c in sized for s in c["load"]["latency_by_size_s"]})
        out.append("\n### Latency by body size (p50 / p99 / max ms)\n")
        out.append("| server | " + " | ".join("%s (%d)" % (
            _size_name(s), sized[0]["load"]["latency_by_size_s"].get(str(s), {}).get("count", 0))
            for s in sizes) + " |")
        out.append("|---|" + "---|" * len(sizes))
        for c in sized:
            by_size = c["load"]["latency_by_size_s"]
            out.append("| %s | " % c["name"] + " | ".join(
                "%s / %s / %s" % (_ms(by_size[str(s)]["p50"]), _ms(by_size[str(s)]["p99"]),
                                  _ms(by_size[str(s)]["max"])) if str(s) in by_size else "–"
                for s in sizes) + " |")
    for c in cases:
        stalls, heap, slow = c.get("stalls"), c.get("heap"), c.get("slow")
        if slow and slow["count"] and stalls:
            out.append("\n### %s: requests over 10 ms\n" % c["name"])
            out.append("%d requests (longest %s ms); the largest overlapping cause of each: %s.\n" % (
                slow["count"], _ms(slow["longest_s"]),
                ", ".join("%s %d" % tuple(kv) for kv in slow["causes"])))
        if stalls:
            out.append("\n### %s: event-loop stalls (task steps of %.0f ms or more)\n" % (
                c["name"], stalls["threshold_s"] * 1e3))
            out.append("%d task steps timed.\n" % stalls["steps"])
            busy = stalls.get("busy") or []
            if busy:
                span = c["window"][1] - c["window"][0]
                out.append("Loop time in task steps over the window: %.1f%% of a core; busiest: %s.\n" % (
                    100 * sum(r[1] for r in busy) / span,
                    ", ".join("%s %.1f%% (%d steps)" % (name, 100 * seconds / span, steps)
                              for name, seconds, steps in busy_by_task(busy)[:6])))
                out.append("Busiest steps by where they ended: %s.\n" % ", ".join(
                    "%s %.2f%%" % (name.split(".")[-1], 100 * seconds / span)
                    for name, seconds, _ in busy[:12]))
            out.append("| tasks | stalls (wall) | longest ms | with JIT work | longest JIT ms | "
                       "own (CPU less GC and JIT) | longest own ms | where own stalls ended |")
            out.append("|---|---|---|---|---|---|---|---|")
            for name, g in stalls["groups"].items():
                out.append("| %s | %d | %s | %d | %s | %d | %s | %s |" % (
                    name, g["stalls"], _ms(g["max_s"]) if g["stalls"] else "–", g.get("with_jit", 0),
                    _ms(g["max_jit_s"]) if g.get("with_jit") else "–", g["without_gc"],
                    _ms(g["max_without_gc_s"]) if g["without_gc"] else "–",
                    ", ".join("%s ×%d" % tuple(kv) for kv in g["tasks"]) or "–"))
            for name, g in (stalls.get("compiled") or {}).items():
                out.append("\nJIT compiled in %s steps: %d loops, %d bridges; traces starting in %s." % (
                    name, g["loops"], g["bridges"], ", ".join("%s ×%d" % tuple(kv) for kv in g["starts"])))
        young = c.get("young")
        if young:
            out.append("\n### %s: objects born in %.1f s and still alive (what young collections keep)\n" % (
                c["name"], young.get("span_s", 0.5)))
            out.append("%d of %d objects. By type: %s.\n" % (young["new"], young["objects"], ", ".join(
                "%s %d" % tuple(kv) for kv in young["top_types"])))
            out.append("Coroutines, generators and frames by code: %s.\n" % (", ".join(
                "%s %d" % tuple(kv) for kv in young["top_code"]) or "none"))
        if heap and heap.get("memory"):
            memory = heap["memory"]
            out.append("\n### %s: memory at the window's end\n" % c["name"])
            out.append(", ".join("%s %s" % (k, _mb(v) + " MB" if isinstance(v, int) and k != "total_gc_time"
                                             else v) for k, v in memory.items() if k != "resident"))
            if memory.get("resident"):
                out.append("\nResident by mapping: " + ", ".join(
                    "%s %s MB" % (k, _mb(v))
                    for k, v in sorted(memory["resident"].items(), key=lambda kv: -kv[1])))
            jit = heap.get("jit")
            if jit:
                out.append("\nPyPy's JIT inside the window: %d loops and %d bridges compiled, %d traces "
                           "aborted, %.0f ms tracing and %.0f ms compiling." % (
                               jit.get("TOTAL_COMPILED_LOOPS", 0), jit.get("TOTAL_COMPILED_BRIDGES", 0),
                               sum(v for k, v in jit.items() if k.startswith("ABORT_")),
                               1e3 * jit.get("TRACING_s", 0.0), 1e3 * jit.get("BACKEND_s", 0.0)))
            census = heap.get("census")
            if census:
                out.append("\nHeap: %d objects, %d weak references, %d weakly referenced, %d with "
                           "finalizers." % (census["objects"], census["weakrefs"],
                                            census["weakly_referenced"], census["finalized"]))
                out.append("With finalizers: " + ", ".join(
                    "%s %d" % tuple(kv) for kv in census["top_finalized"]))
                out.append("\nWeakly referenced: " + ", ".join(
                    "%s %d" % tuple(kv) for kv in census["top_weakly_referenced"]))
                if census.get("top_cdata"):
                    out.append("\ncffi objects: " + ", ".join(
                        "%s %d" % tuple(kv) for kv in census["top_cdata"]))
                if census.get("top_packages"):
                    out.append("\nModules imported, by package: " + ", ".join(
                        "%s %d" % tuple(kv) for kv in census["top_packages"]))
    return "\n".join(out) + ("\n" if out else "")
