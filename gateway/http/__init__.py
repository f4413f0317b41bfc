"""HTTP/1.1 for the ingest server: the sans-I/O connection, its byte transports, TLS."""
