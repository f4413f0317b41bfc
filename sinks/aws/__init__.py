"""Kinesis Data Streams and Firehose: bodies built in place, signed by botocore, delivered with retries."""
