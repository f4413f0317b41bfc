"""The load-with-faults run (bench/faults), short: nothing acknowledged is lost, and the count adds up.

``python -m bench.faults --duration 12 --rate 100`` against a gateway
process on this interpreter: the sink goes away and comes back, the whole
gateway is SIGKILLed twice, one of its workers once (when it runs several),
and Redis once.  The long run is documented in docs/reliability.md ("Load with
faults").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from bench.faults.client import Outcome
from bench.faults.run import count, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The run itself takes 12 s plus gateway starts (about 2 s each on a cold
#: PyPy) and the drain; far more means it hangs.
RUN_TIMEOUT = 240


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_short_run_loses_nothing_and_its_count_adds_up(tmp_path):
    path = str(tmp_path / "faults.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    # The gateways it kills cannot remove their temporary files: keep them here.
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bench.faults", "--duration", "12", "--rate", "100",
                           "--json", path], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(path) as f:
        report = json.load(f)
    counts = report["counts"]
    assert counts["lost"] == 0 and counts["lost_sequences"] == []
    assert counts["sent"] == counts["acknowledged"] + counts["refused"]
    assert counts["refused"] == sum(counts["refused_by_status"].values())
    assert counts["stored"] == counts["acknowledged"] + counts["stored_not_acknowledged"]
    assert counts["stored_unsent"] == 0 and counts["duplicated"] <= counts["stored"]
    assert counts["acknowledged"] >= 300  # the load ran, around the faults
    # Every fault happened, in order, and the gateway ran three times.
    assert [e["event"] for e in report["events"]] == [
        "sink unreachable", "gateway SIGKILLed", "gateway restarted", "sink back",
        "Redis SIGKILLed", "Redis restarted", "one worker SIGKILLed", "gateway SIGKILLed",
        "gateway restarted"]
    assert [run["exit"] for run in report["gateway_runs"]] == [-9, -9, 0]
    # Clients saw the dead gateway.  Redis down (closed mode) answers 503
    # only to requests that need Redis then: with leased admission a short
    # outage can fall between two lease calls, so it may show or not.
    kinds = set(counts["refused_by_status"])
    assert "no answer (ConnectionRefusedError)" in kinds
    assert kinds <= {"503 access_unavailable", "503 overloaded", "503 sink_unavailable"} | {
        k for k in kinds if k.startswith("no answer")}, kinds
    assert sum(n for row in report["per_second"] for k, n in row.items() if k != "second") == counts["sent"]
    # The table printed is the count.
    assert "| lost (acknowledged, not stored)" in done.stdout
    assert "| acknowledged (202)" in done.stdout


def test_count_tells_lost_from_duplicated_and_unacknowledged():
    def outcome(sequence: int, status: int, record_id: str = "", error: str = "") -> Outcome:
        o = Outcome(sequence, 0.0)
        o.sent, o.status, o.record_id, o.error = 1.0, status, record_id, error
        return o

    outcomes = [outcome(1, 202, "a"), outcome(2, 202, "b"), outcome(3, 202, "c"),
                outcome(4, 503, error="overloaded"), outcome(5, 0, error="ConnectionRefusedError")]
    copies = {1: 1, 2: 2, 5: 1, 9: 1}
    ids = {1: "a", 2: "b", 5: "e", 9: "x"}
    counts = count(outcomes, copies, ids)  # type: ignore[arg-type]
    assert (counts["sent"], counts["acknowledged"], counts["refused"]) == (5, 3, 2)
    assert counts["refused_by_status"] == {"503 overloaded": 1, "no answer (ConnectionRefusedError)": 1}
    assert (counts["stored"], counts["stored_not_acknowledged"], counts["stored_unsent"]) == (3, 1, 1)
    assert (counts["duplicated"], counts["extra_copies"]) == (1, 1)
    assert (counts["lost"], counts["lost_sequences"]) == (1, [3])
    # A record stored under another id than its 202 named is not the acknowledged one.
    assert count(outcomes[:1], {1: 1}, {1: "other"})["lost"] == 1  # type: ignore[arg-type]
    assert re.search(r"^\| lost \(acknowledged, not stored\) +\| 1 \|$", table(counts), re.M)
