"""Observability: structured logs, in-process telemetry, Prometheus metrics, memory settings."""
