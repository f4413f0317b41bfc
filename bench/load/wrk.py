"""Closed-loop runs with ``wrk`` (one thread on core 1), POST bodies from a Lua script.

The script builds one request per size of the mix with ``wrk.format`` and
cycles through them; its ``done`` hook prints one JSON line with the counts
and latency percentiles, which :func:`run` parses.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any, Dict, List, Optional

from .bodies import sizes_for
from .servers import CLIENT_CORE, pinned, unpinned

__all__ = ["available", "run"]

_LUA = """
local sizes = {%(sizes)s}
local requests = {}
local index = 0
local function filler(n)
  local prefix, suffix = '{"msg":"', '"}'
  if n < 10 then return string.rep("x", n) end
  local unit = "abcdefghijklmnopqrstuvwxyz0123456789"
  local s = string.rep(unit, math.floor((n - 10) / 36) + 1)
  return prefix .. string.sub(s, 1, n - 10) .. suffix
end
init = function(args)
  local headers = {["Content-Type"] = "application/json"%(auth)s}
  for i, n in ipairs(sizes) do
    requests[i] = wrk.format("POST", "/v1/logs", headers, filler(n))
  end
end
request = function()
  index = index %% #requests + 1
  return requests[index]
end
done = function(summary, latency, requests)
  io.write(string.format(
    '{"completed":%%d,"bytes":%%d,"duration_us":%%d,"errors":{"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d},"p50":%%d,"p99":%%d,"p999":%%d,"max":%%d,"mean":%%f}\\n',
    summary.requests, summary.bytes, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def run(port: int, mix: str, connections: int, duration: float, workdir: str,
        token: Optional[str] = None, *, pin: bool = True) -> Dict[str, Any]:
    sizes: List[int] = sizes_for(mix)
    script = os.path.join(workdir, "wrk-%s.lua" % mix)
    auth = ', ["Authorization"] = "Bearer %s"' % token if token else ""
    with open(script, "w") as f:
        f.write(_LUA % {"sizes": ", ".join(str(s) for s in sizes), "auth": auth})
    seconds = max(1, int(round(duration)))
    command = (pinned if pin else unpinned)(CLIENT_CORE, [
        "wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--timeout", "10s", "-s", script,
        "http://127.0.0.1:%d/v1/logs" % port])
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith('{"completed"')), None)
    if line is None:
        raise RuntimeError("wrk gave no result: %s %s" % (done.stdout[-500:], done.stderr[-500:]))
    doc = json.loads(line)
    elapsed = doc["duration_us"] / 1e6
    body_bytes = sum(sizes) / len(sizes) * doc["completed"]  # cyclic, so exact up to one cycle
    errors = {k: v for k, v in doc["errors"].items() if v}
    return {
        "generator": "wrk",
        "mode": "closed",
        "mix": mix,
        "rate": None,
        "connections": connections,
        "duration_s": elapsed,
        "completed": doc["completed"],
        "body_bytes": body_bytes,
        "requests_per_s": doc["completed"] / elapsed,
        "mb_per_s": body_bytes / elapsed / 1e6,
        "latency_s": {"p50": doc["p50"] / 1e6, "p99": doc["p99"] / 1e6, "p99.9": doc["p999"] / 1e6,
                      "max": doc["max"] / 1e6, "mean": doc["mean"] / 1e6},
        "latency_samples_s": [],
        "errors": errors,
        "statuses": {},
        "overloaded": False,
    }
