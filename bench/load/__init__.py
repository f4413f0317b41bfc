"""End-to-end load harness: ``python -m bench.load --help``.

Starts a server pinned to core 0 (the gateway, or a peer for comparison),
drives it from core 1 with an open-loop or closed-loop load generator, samples
the server's CPU time and RSS from ``/proc``, and writes JSON, a Markdown
table and PNG plots to a results directory.  See ``bench/README.md``.
"""
