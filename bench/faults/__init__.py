"""Load with faults: does a gateway with ``--ack spool`` lose an acknowledged record?  An exact count.

``python -m bench.faults --duration 60 --rate 200`` starts a gateway
process (``sluice serve --ack spool``) in front of a Kinesis-compatible
endpoint that records what it stored (bench/faults/endpoint.py; ``--sink
file`` uses the file sink instead), with access control on a
``redis-server`` of its own, and sends a steady rate of requests, each
with a sequence number in its body, never retried (bench/faults/client.py).
Meanwhile, at fixed fractions of ``--duration``:

| at | fault |
|---|---|
| 15 % | the sink becomes unreachable (connections refused or reset) |
| 30 % | the gateway is SIGKILLed and started again (the spool holds records the sink never got) |
| 40 % | the sink is back |
| 55 % | Redis is SIGKILLed, and started again 5 % later (at most 3 s) |
| 65 % | one worker is SIGKILLed (with ``--workers`` above 1; its supervisor starts another) |
| 75 % | the gateway is SIGKILLed and started again (records in every state) |

"The gateway is SIGKILLed" means every process of it at once (the
supervisor and its workers), as when its host or container dies; it is
started again on the same port with the same spool directory.

After the load it waits (``--drain-timeout``) for the sink to store every
acknowledged record, stops the gateway with SIGTERM, and counts: requests
sent, acknowledged (``202``), refused by status (or left without an answer
while the gateway was down), records stored, stored more than once, and
lost: acknowledged but not stored.  It prints the count as a table and
writes it, with the timeline of faults and the outcomes per second, as
JSON (``--json``, default ``bench/results/faults-TIME.json``).  Exit
status 1 when a record was lost.

``--faults sink,redis,kill,worker`` picks the faults; tests/test_fault_load.py
runs a 12-second version.
"""
