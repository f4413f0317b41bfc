"""``--ack spool`` across ``kill -9``: a gateway process killed under load and started again.

Every record that got a ``202`` must reach the sink after the restart; a
record may arrive twice only if its confirmation was not yet written to the
spool when the process died.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import threading
import time
from typing import Dict, List, Set

from sinks.envelope import split_record
from sinks.file import read_records
from sinks.spool.layout import acked_name, list_segments, parse_acks, record_id_of, scan_segment, segment_name
from tests.support.gateway import GatewayProcess, RawConnection, post_request, wait_for_records

#: Client threads, and the 202s to collect before the kill: enough that
#: records are in every state (waiting for a group commit, spooled, shipped,
#: written by the file sink, confirmed).
CLIENTS = 4
ACCEPTED_BEFORE_KILL = 400
#: Bounds of the load: it stops by itself even if the gateway never answers.
LOAD_SECONDS = 20.0


def unconfirmed_ids(spool_dir: str) -> Set[str]:
    """Ids of the records the spool holds without a written confirmation."""
    found: Set[str] = set()
    for sequence in list_segments(spool_dir):
        with open(os.path.join(spool_dir, segment_name(sequence)), "rb") as f:
            data = f.read()
        acked: Set[int] = set()
        path = os.path.join(spool_dir, acked_name(sequence))
        if os.path.exists(path):
            with open(path, "rb") as f:
                acked = parse_acks(f.read())
        for frame in scan_segment(data).frames:
            if frame.offset not in acked:
                start = frame.offset + 12 + frame.pk_len + frame.hk_len
                found.add(record_id_of(data[start:start + 40]))
    return found


def stored_ids(data_dir: str) -> List[str]:
    return [split_record(record)[0]["id"] for record in read_records(data_dir)]


def load(address, accepted: Dict[str, bytes], lock: threading.Lock, stop: threading.Event,
         seed: int) -> None:
    """Post records on keep-alive connections until ``stop`` or the gateway dies."""
    rng = random.Random(seed)
    deadline = time.monotonic() + LOAD_SECONDS
    conn = None
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = RawConnection(address, timeout=5)
            body = b"%d:" % seed + bytes(rng.getrandbits(8) for _ in range(rng.randrange(50, 3000)))
            conn.send(post_request(body))
            response = conn.read_response()
            if response.status == 202:
                with lock:
                    accepted[response.json()["id"]] = body
            else:
                conn.close()
                conn = None
    except (OSError, AssertionError):
        pass  # killed: an answer not received counts as not acknowledged
    finally:
        if conn is not None:
            conn.close()


def test_kill_9_under_load_loses_no_acknowledged_record(tmp_path):
    spool_dir, data_dir = str(tmp_path / "spool"), str(tmp_path / "data")
    # A file sink that holds records for a while, so some are spooled and
    # shipped but not yet stored when the process dies.
    flags = ["--ack", "spool", "--spool-dir", spool_dir, "--flush-interval", "100ms",
             "--spool-size", "64MiB", "--ring-size", "8MiB"]
    first = GatewayProcess(flags, data_dir=data_dir, python=sys.executable).start()
    accepted: Dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(first.address, accepted, lock, stop, n))
               for n in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + LOAD_SECONDS
        while len(accepted) < ACCEPTED_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        first.stop()
    assert len(accepted) >= ACCEPTED_BEFORE_KILL, first.stderr
    pending_at_kill = unconfirmed_ids(spool_dir)
    stored_at_kill = collections.Counter(stored_ids(data_dir)) if os.path.isdir(data_dir) else {}

    second = GatewayProcess(flags, data_dir=data_dir, python=sys.executable).start()
    try:
        records = wait_for_records(data_dir, accepted)
        deadline = time.monotonic() + 20
        while unconfirmed_ids(spool_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert second.stop() == 0, second.stderr
    lost = set(accepted) - set(records)
    assert not lost, "%d acknowledged records lost" % len(lost)
    assert all(records[i][1] == body for i, body in accepted.items())
    counts = collections.Counter(stored_ids(data_dir))
    duplicated = {i for i, n in counts.items() if n > 1}
    # Sent again only what the spool had not recorded as stored.
    assert duplicated <= pending_at_kill, sorted(duplicated - pending_at_kill)[:5]
    assert all(counts[i] <= stored_at_kill.get(i, 0) + 1 for i in counts)
    assert unconfirmed_ids(spool_dir) == set()
    # Some records were in flight at the kill, and all of them went out again.
    assert pending_at_kill
    print("accepted %d, unconfirmed at kill %d, duplicates %d"
          % (len(accepted), len(pending_at_kill), len(duplicated)))
