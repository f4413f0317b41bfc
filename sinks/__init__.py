"""Where records go once their body is in the ring: file, null, Kinesis and Firehose, the spool."""
