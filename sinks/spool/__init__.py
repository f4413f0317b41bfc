"""``--ack spool``: a write-ahead log on local disk in front of another sink."""
