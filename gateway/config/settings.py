"""Configuration: every setting, its default, its bound and where it comes from.

Each setting is one row of :data:`SETTINGS`: a flag (``--ring-size``), the
matching environment variable (``SLUICE_RING_SIZE``), a key of the settings
file (``ring_size``, :mod:`gateway.config.settings_file`), a parser for its text form, a
default, and the reason for the default.  Flags win over environment
variables, which win over the file (``--config``, ``SLUICE_CONFIG``), which
wins over defaults.  :func:`load` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message starts with the flag, variable or file key
it is about, so the CLI can print it as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gateway.config.errors import ConfigError
from gateway.config.settings_file import read_settings_file
from gateway.config.urls import is_loopback_url, parse_redis_url
from gateway.http.capacity import parse_connections
from gateway.http.connection import DEFAULT_MAX_HEAD
from gateway.http.tls import CertificateError, server_context
from sinks.aws.limits import (
    FIREHOSE_MAX_RECORD_BYTES,
    KINESIS_DEFAULT_MAX_RECORD_BYTES,
    KINESIS_LARGE_MAX_RECORD_BYTES,
    NAME_PATTERN,
    PUT_RECORDS_LARGE_MAX_REQUEST_BYTES,
    PUT_RECORDS_MAX_RECORDS,
    STREAM_ARN_MAX_CHARS,
    STREAM_NAME_MAX_CHARS,
)
from sinks.aws.partition_keys import parse_key_setting
from sinks.envelope import MAX_ENVELOPE_BYTES

__all__ = ["Config", "ConfigError", "SETTINGS", "ACCESS_SETTINGS", "load", "add_arguments", "parse_size",
           "parse_duration", "parse_switch", "parse_redis_url", "CONFIG_FILE_ENV", "Origin",
           "load_with_origins", "parse_workers", "MAX_WORKERS", "parse_connections"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from ``"32MiB"``, ``"64k"``, ``"1048576"`` (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("not a size: %r (use e.g. 1048576, 64KiB, 32MiB)" % text)
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


#: ``auto`` for a size: decided from the sink (see `_resolve_record_sizes`).
AUTO_SIZE = "auto"


def parse_size_or_auto(text: str) -> Optional[int]:
    """`parse_size`, or None for ``auto``."""
    if text.strip().lower() == AUTO_SIZE:
        return None
    return parse_size(text)


def parse_duration(text: str) -> float:
    """Seconds from ``"10s"``, ``"500ms"``, ``"2m"``, ``"1.5"``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("not a duration: %r (use e.g. 10s, 500ms, 2m)" % text)
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "").lower()]


def _linger(text: str) -> Optional[float]:
    """``auto`` (None: chosen by the ack mode) or a duration."""
    if text.strip().lower() == "auto":
        return None
    return parse_duration(text)


def parse_listen(text: str) -> Tuple[str, int]:
    """``(host, port)`` from ``"127.0.0.1:8080"`` or ``"[::1]:8080"``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError("not HOST:PORT: %r" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError("port out of range: %d" % number)
    return host, number


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("must be one of %s, not %r" % (", ".join(choices), text))
        return text
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not a whole number: %r" % text) from None


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]*$")


def _header_name(text: str) -> str:
    if not _HEADER_NAME.match(text):
        raise ValueError("not a header name: %r" % text)
    return text


_STREAM = re.compile(r"^(?:%s|arn:aws\S*:(?:kinesis|firehose):\S+)$" % NAME_PATTERN)


def _stream_name(text: str) -> str:
    """A stream name or ARN (empty: not set)."""
    if text and (not _STREAM.match(text) or len(text) > STREAM_ARN_MAX_CHARS
                 or (not text.startswith("arn:") and len(text) > STREAM_NAME_MAX_CHARS)):
        raise ValueError("not a stream name (1 to %d of [a-zA-Z0-9_.-]) or ARN: %r"
                         % (STREAM_NAME_MAX_CHARS, text))
    return text


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def parse_switch(text: str) -> bool:
    """A yes/no setting: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("must be true or false, not %r" % text)


#: Most worker processes ``--workers`` takes.  Each holds its own ring and (on
#: PyPy) about 100 MB idle, so a larger count is a typo rather than a plan;
#: nginx users rarely go past the core count either.
MAX_WORKERS = 256


def parse_workers(text: str) -> int:
    """Worker processes: a whole number, or ``auto`` for the number of CPUs (``os.cpu_count()``)."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _int(text)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number: %r (use e.g. 0.001)" % text) from None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value.

    A ``switch`` is a flag without a value (``--redis-cluster``); its
    environment twin takes ``true``/``false``.  ``env_name`` overrides the
    ``SLUICE_<NAME>`` twin where another name is already established.
    """

    name: str
    parse: Callable[[str], object]
    default: str
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    switch: bool = False
    env_name: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.env_name or "SLUICE_" + self.name.upper()


SETTINGS: List[Setting] = [
    Setting("listen", parse_listen, "127.0.0.1:8080",
            "address to listen on, HOST:PORT (port 0 picks a free port)"),
    Setting("sink", _choice("file", "null", "kinesis", "firehose"), "file",
            "where records go: file (segment files in --data-dir), kinesis (--stream), "
            "firehose (--delivery-stream) or null (dropped)"),
    Setting("data_dir", str, "./sluice-data", "directory of the file sink's segments"),
    Setting("ring_size", parse_size_or_auto, "auto",
            "bytes preallocated for bodies in flight; at least twice the largest record; auto: "
            "32MiB, or four of the largest records when more (pages are resident only once used)",
            minimum=64 * KiB),
    Setting("ring_trim", parse_duration, "10s",
            "the ring's pages unused for this long go back to the kernel, at most 4MiB every "
            "this long, so a ring that filled in a burst or an outage shrinks back; 0: never",
            minimum=0),
    Setting("max_body", parse_size_or_auto, "auto",
            "largest body accepted; larger ones get 413 before they are read; auto: 1MiB, or with "
            "--sink kinesis/firehose the record limit less the envelope line and partition key "
            "(a value can only lower that)", minimum=0),
    Setting("max_head", parse_size, str(DEFAULT_MAX_HEAD),
            "largest request head (request line + headers); larger gets 431 (h11 and node.js: 16KiB)",
            minimum=1 * KiB),
    Setting("http", _choice("auto", "h11"), "auto",
            "request-head parser: auto (a fast path for the head shape agents send, h11 for any "
            "other head) or h11 (h11, the reference, for every head)"),
    Setting("head_timeout", parse_duration, "10s",
            "time allowed for a new connection's first byte, and for a request head once its "
            "first byte arrived (then 408)", minimum=0.001),
    Setting("body_timeout", parse_duration, "60s",
            "time allowed for a whole body once its head arrived; then 408 (nginx: 60s)",
            minimum=0.001),
    Setting("idle_timeout", parse_duration, "75s",
            "keep-alive connections idle this long after an answer are closed; keep it above a "
            "load balancer's idle timeout (nginx: 75s)", minimum=0.001),
    Setting("min_body_rate", parse_size, "4KiB",
            "bytes per second a body must average after a 3s grace, else 408 and its ring space is "
            "freed (0: no minimum; nginx and Envoy time the gaps between reads instead)", minimum=0),
    Setting("send_timeout", parse_duration, "60s",
            "time allowed for sending one answer; a client that stops reading its answers is "
            "disconnected after it (nginx send_timeout: 60s)", minimum=0.001),
    Setting("max_connections", parse_connections, "auto",
            "open connections at most; auto: from the file-descriptor limit, raised to the hard "
            "limit at start, less a reserve; when full, the longest-waiting connection is closed "
            "to admit a new one, and only with none waiting are new ones refused with 503"),
    Setting("ring_wait", parse_duration, "1s",
            "how long a request waits for ring space before 503 + Retry-After", minimum=0),
    Setting("tenant_ring_share", _fraction, "0.5",
            "with --redis: the fraction of the ring one tenant's requests may hold at once; "
            "beyond it they get 503 + Retry-After while other tenants are served (1: no limit)",
            minimum=0.01, maximum=1),
    # Worker processes (gateway/cli/supervisor.py): above 1, a supervising parent
    # starts them, each with its own socket on --listen (SO_REUSEPORT).
    Setting("workers", parse_workers, "auto",
            "gateway processes sharing --listen (SO_REUSEPORT) under a supervising parent that "
            "restarts them and reloads on SIGHUP; auto: one per CPU; 1: a single process, no parent",
            minimum=1, maximum=MAX_WORKERS),
    Setting("malloc_trim", _choice("on", "off"), "on",
            "on: after each major garbage collection, hand malloc's free pages back to the "
            "kernel (glibc's malloc_trim), which keeps tens of MB of PyPy's freed heap from "
            "staying resident; off: leave them to malloc"),
    Setting("shutdown_timeout", parse_duration, "30s",
            "on SIGTERM/SIGINT, how long in-flight requests may take before they are cut",
            minimum=0),
    Setting("segment_size", parse_size, "128MiB",
            "file sink: a segment file is closed and a new one started past this size",
            minimum=64 * KiB),
    Setting("flush_interval", parse_duration, "50ms",
            "file sink: queued records are written at least this often", minimum=0.001),
    # TLS termination (gateway/http/tls.py): both files or neither.
    Setting("tls_cert", str, "",
            "PEM file of the certificate (chain) served to clients: turns TLS on, with --tls-key"),
    Setting("tls_key", str, "", "PEM file of --tls-cert's private key (not encrypted)"),
    # Logs (gateway/observe/logs.py): events on stderr, never per request unless sampled.
    Setting("log_format", _choice("json", "text"), "json",
            "stderr lines: json (one object per line) or text (ts level event key=value)"),
    Setting("access_log_sample", _fraction, "0",
            "fraction of requests logged as access events, 0 (off) to 1 (all); e.g. 0.001",
            minimum=0, maximum=1),
    # Metrics (gateway/observe/metrics.py): GET /metrics, one registry per process unless this is set.
    Setting("metrics_dir", str, "",
            "directory of multiprocess metrics (prometheus-client's PROMETHEUS_MULTIPROC_DIR "
            "format); its *.db files are deleted at start if Sluice created or marked it "
            "(a new or empty directory, or one holding only metric files, is marked; any other "
            "is refused); /metrics then reports every process writing there"),
    # Kinesis and Firehose sinks.  Bounds: sinks/aws/limits.py.
    Setting("stream", _stream_name, "", "kinesis sink: the data stream's name or ARN"),
    Setting("delivery_stream", _stream_name, "", "firehose sink: the delivery stream's name"),
    Setting("region", str, "",
            "kinesis/firehose: AWS region (default: botocore's chain, e.g. AWS_DEFAULT_REGION or "
            "the profile)"),
    Setting("endpoint_url", str, "",
            "kinesis/firehose: endpoint URL (default: botocore's, e.g. AWS_ENDPOINT_URL_KINESIS); "
            "https, or http to a loopback address"),
    Setting("allow_insecure_endpoint", parse_switch, "false",
            "kinesis/firehose: accept an http:// --endpoint-url to a host that is not loopback "
            "(records and signed requests then cross the network unencrypted)", switch=True),
    Setting("ack", _choice("kinesis", "received", "spool"), "kinesis",
            "when 202 is sent: kinesis/firehose: once the service stored the record (kinesis) or "
            "once it is in memory (received); any sink: once it is fsynced to --spool-dir (spool)"),
    Setting("partition_key", parse_key_setting, "random",
            "kinesis: partition key: random (the record id), tenant, or header:NAME"),
    Setting("explicit_hash_key_header", _header_name, "",
            "kinesis: request header whose value is sent as ExplicitHashKey"),
    Setting("max_record_size", parse_size_or_auto, "auto",
            "kinesis/firehose: largest record (envelope + body + partition key); larger gets 413; "
            "auto: the stream's MaxRecordSizeInKiB (1MiB to 10MiB, read at start and every minute), "
            "Firehose 1000KiB; a value lowers it, and one above the stream's is refused at start",
            minimum=1 * KiB, maximum=KINESIS_LARGE_MAX_RECORD_BYTES),
    Setting("batch_records", _int, str(PUT_RECORDS_MAX_RECORDS),
            "kinesis/firehose: records per request (service limit: 500)",
            minimum=1, maximum=PUT_RECORDS_MAX_RECORDS),
    Setting("batch_bytes", parse_size, "5MiB",
            "kinesis/firehose: bytes per request (Kinesis: 5MiB, 10MiB for large records; "
            "Firehose: 4MiB at most)", minimum=1 * KiB, maximum=PUT_RECORDS_LARGE_MAX_REQUEST_BYTES),
    Setting("linger", _linger, "auto",
            "kinesis/firehose: how long a batch that is not full waits for more records; auto: "
            "10ms with --ack kinesis (clients wait for the call), 200ms with --ack received or "
            "spool (fewer, larger calls)"),
    Setting("aws_http", _choice("trio", "threads"), "trio",
            "kinesis/firehose: how calls are sent: trio (signed by botocore, sent on the event "
            "loop's own connections) or threads (botocore's HTTP session in worker threads; "
            "also used whenever HTTPS_PROXY applies)"),
    Setting("sink_jit", _choice("auto", "pause", "compile"), "auto",
            "kinesis/firehose with --aws-http trio, on PyPy: pause keeps the JIT compiler from "
            "tracing the calls' own code (signing, h11, streams), which at a few calls a second "
            "held the event loop for up to 20 ms at a time, until the JIT settles "
            "(--jit-settle), whose thresholds keep it out from then on; compile lets PyPy "
            "compile it like the rest (and, with --jit-settle 0, keeps --jit thresholds given "
            "to pypy), which at tens of calls a second costs less CPU; auto: pause when "
            "--linger is 100ms or more (--ack received or spool), else compile"),
    Setting("jit_settle", _int, "20000",
            "on PyPy: once this many requests are accepted, the JIT compiles only code that "
            "runs 100 times as often as it asked before, so paths few requests take are no "
            "longer traced minutes later, inside a request (0: never settle, and keep "
            "pypy --jit thresholds of your own)", minimum=0),
    Setting("max_in_flight", _int, "4",
            "kinesis/firehose: requests in progress at once (each holds a preallocated body)",
            minimum=1, maximum=64),
    Setting("retry_deadline", parse_duration, "30s",
            "kinesis/firehose: a record not stored this long after arrival is given up (503) "
            "(Kinesis Producer Library RecordTtl: 30s)", minimum=0.001),
    Setting("call_timeout", parse_duration, "6s",
            "kinesis/firehose: connect and read timeout of one request, then it is retried "
            "(Kinesis Producer Library RequestTimeout: 6s)", minimum=0.001),
    Setting("aggregation", _choice("off", "kpl"), "off",
            "kinesis: kpl packs records that share a partition key into KPL aggregated records "
            "(unpacked by KCL, the Lambda deaggregation libraries and Firehose); off sends one "
            "Kinesis record per record"),
    Setting("aggregation_max_bytes", parse_size, "50KiB",
            "kinesis with --aggregation kpl: an aggregate closes at this many bytes (partition key "
            "+ data) or at the stream's record limit, whichever is lower (Kinesis Producer Library "
            "AggregationMaxSize: 51200)", minimum=1 * KiB, maximum=KINESIS_LARGE_MAX_RECORD_BYTES),
    # The write-ahead spool (sinks/spool/): --ack spool.
    Setting("spool_dir", str, "",
            "--ack spool: directory of the spool's segment files (required with --ack spool)"),
    Setting("spool_size", parse_size, "1GiB",
            "--ack spool: most bytes the spool may hold on disk; past it requests get 503",
            minimum=64 * KiB),
    Setting("spool_sync_interval", parse_duration, "5ms",
            "--ack spool: requests arriving within this long share one fsync (group commit); "
            "it adds up to this much latency", minimum=0, maximum=1.0),
    # Access control (gateway/access/).  Off unless --redis is given; the
    # other settings of this group need it.  SLUICE_REDIS_URL is also what the
    # keys and tenants commands read, so one variable serves both.
    Setting("redis", parse_redis_url, "",
            "Redis holding API keys, limits and usage: turns access control on (redis://, "
            "rediss:// for TLS, redis+cluster:// or --redis-cluster for Redis Cluster)",
            env_name="SLUICE_REDIS_URL"),
    Setting("redis_cluster", parse_switch, "false",
            "the --redis URL names one node of a Redis Cluster", switch=True),
    Setting("on_redis_failure", _choice("closed", "open"), "closed",
            "while Redis cannot answer: closed (503 for every ingest request) or open (keys "
            "Redis confirmed within --stale-key-ttl are admitted at the rate limit and the "
            "quota left divided by --instance-count, tenants over a limit stay refused; usage "
            "is added to Redis once it is back)"),
    Setting("admission", _choice("lease", "exact"), "lease",
            "how requests are admitted: lease (each gateway leases slices of a tenant's rates "
            "and quotas from Redis and spends them in memory: at most 20 Redis calls per tenant "
            "per second, revocations show within 1s) or exact (one Redis script call per "
            "request, batched)"),
    Setting("redis_timeout", parse_duration, "250ms",
            "longest an access check waits for Redis, then 503 (or the open-mode answer); a "
            "pipelined check takes about a millisecond", minimum=0.001, maximum=30.0),
    Setting("key_cache_ttl", parse_duration, "5s",
            "unknown, revoked and disabled keys are refused from memory this long; revocations, "
            "re-enabled tenants and raised quotas show within it", minimum=0, maximum=3600.0),
    Setting("stale_key_ttl", parse_duration, "5m",
            "open mode: during an outage, keys Redis confirmed within this long are admitted "
            "(longer rides out longer outages, but a key revoked or a tenant disabled just "
            "before one keeps working that long)", minimum=0),
    Setting("instance_count", _int, "1",
            "open mode: gateways sharing the Redis; each admits 1/N of a tenant's rates during "
            "an outage", minimum=1, maximum=10000),
]

#: Settings that mean nothing without --redis: giving one alone is a mistake.
ACCESS_SETTINGS = ("redis_cluster", "on_redis_failure", "admission", "redis_timeout", "key_cache_ttl",
                   "stale_key_ttl", "instance_count", "tenant_ring_share")

_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """The effective configuration of one gateway process."""

    listen: Tuple[str, int]
    sink: str
    data_dir: str
    ring_size: int
    max_body: int
    max_head: int
    head_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    ring_wait: float
    shutdown_timeout: float
    segment_size: int
    flush_interval: float
    send_timeout: float = 60.0
    http: str = "auto"
    min_body_rate: int = 4 * KiB
    tenant_ring_share: float = 0.5
    stream: str = ""
    delivery_stream: str = ""
    region: str = ""
    endpoint_url: str = ""
    allow_insecure_endpoint: bool = False
    ack: str = "kinesis"
    partition_key: str = "random"
    explicit_hash_key_header: str = ""
    #: 0: auto, the stream's own limit (sinks.aws.record_limit.AUTO).
    max_record_size: int = 0
    batch_records: int = PUT_RECORDS_MAX_RECORDS
    batch_bytes: int = 5 * MiB
    linger: Optional[float] = None  # auto
    aws_http: str = "trio"
    sink_jit: str = "auto"
    max_in_flight: int = 4
    retry_deadline: float = 30.0
    call_timeout: float = 6.0
    aggregation: str = "off"
    aggregation_max_bytes: int = 50 * KiB
    spool_dir: str = ""
    spool_size: int = 1 * GiB
    spool_sync_interval: float = 0.005
    # Out of repr: the URL may hold a password.
    redis: str = dataclasses.field(default="", repr=False)
    redis_cluster: bool = False
    on_redis_failure: str = "closed"
    admission: str = "lease"
    redis_timeout: float = 0.25
    key_cache_ttl: float = 5.0
    stale_key_ttl: float = 300.0
    instance_count: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    log_format: str = "json"
    access_log_sample: float = 0.0
    metrics_dir: str = ""
    malloc_trim: str = "on"
    ring_trim: float = 10.0
    jit_settle: int = 20000
    # As the setting's default, auto: one per CPU.
    workers: int = dataclasses.field(default_factory=lambda: parse_workers("auto"))

    @property
    def access_control(self) -> bool:
        """Whether requests need an API key (``--redis`` given)."""
        return bool(self.redis)

    @property
    def tls(self) -> bool:
        """Whether connections are TLS (``--tls-cert`` and ``--tls-key`` given)."""
        return bool(self.tls_cert)

    @property
    def max_record(self) -> int:
        """Largest record a body of ``max_body`` can make (envelope included)."""
        return self.max_body + MAX_ENVELOPE_BYTES

    def describe(self) -> str:
        """One line for the startup message."""
        host, port = self.listen
        where = "[%s]" % host if ":" in host else host
        sink = self.sink
        if sink == "file":
            sink = "file (%s)" % self.data_dir
        elif sink == "kinesis":
            sink = "kinesis (stream %s)" % self.stream
        elif sink == "firehose":
            sink = "firehose (delivery stream %s)" % self.delivery_stream
        return "listening on http://%s:%d, sink %s" % (where, port, sink)


#: The variable naming the settings file when ``--config`` is not given.
CONFIG_FILE_ENV = "SLUICE_CONFIG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and a flag for every setting; defaults stay None so env and file can fill in."""
    parser.add_argument("--config", dest="config", default=None, metavar="FILE",
                        help="TOML file of settings, keys as the flags in snake_case (ring_size = "
                             "\"256MiB\"); flags and SLUICE_* variables win over it (env %s)"
                             % CONFIG_FILE_ENV)
    for setting in SETTINGS:
        text = "%s (env %s, default %s)" % (setting.help, setting.env, setting.default or "none")
        if setting.switch:
            parser.add_argument(setting.flag, dest=setting.name, default=None, action="store_const",
                                const="true", help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None,
                                metavar=setting.name.split("_")[-1].upper(), help=text)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: ``source`` is ``flag``, ``env``, ``file`` or
    ``default``; ``where`` the flag, the variable or ``FILE: key`` (the flag for a default)."""

    text: str
    source: str
    where: str


def _settings_file(flags: Mapping[str, Optional[str]], environ: Mapping[str, str]):
    """The settings file ``--config`` (or ``SLUICE_CONFIG``) names, read and checked, or None."""
    path, given_by = flags.get("config"), "--config"
    if not path:
        path, given_by = environ.get(CONFIG_FILE_ENV), CONFIG_FILE_ENV
    if not path:
        return None
    return read_settings_file(path, [s.name for s in SETTINGS], given_by=given_by)


def _origin(setting: Setting, flags: Mapping[str, Optional[str]], environ: Mapping[str, str],
            file) -> Origin:
    text = flags.get(setting.name)
    if text is not None:
        return Origin(text, "flag", setting.flag)
    text = environ.get(setting.env)
    if text is not None:
        return Origin(text, "env", setting.env)
    if file is not None:
        text = file.get(setting.name)
        if text is not None:
            return Origin(text, "file", file.where(setting.name))
    return Origin(setting.default, "default", setting.flag)


def load(flags: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> Config:
    """The configuration from flag values (by setting name), the environment and the settings file."""
    return load_with_origins(flags, environ)[0]


def load_with_origins(flags: Mapping[str, Optional[str]],
                      environ: Mapping[str, str]) -> Tuple[Config, Dict[str, Origin]]:
    """:func:`load`, and where each setting's value came from (by setting name)."""
    file = _settings_file(flags, environ)
    values: Dict[str, object] = {}
    given: Dict[str, str] = {}  # setting name -> where it was given
    origins: Dict[str, Origin] = {}
    for setting in SETTINGS:
        origin = origins[setting.name] = _origin(setting, flags, environ, file)
        text, source = origin.text, origin.where
        if origin.source != "default":
            given[setting.name] = source
        try:
            value = setting.parse(text)
        except ValueError as exc:
            raise ConfigError("%s: %s" % (source, exc)) from None
        if value is None:  # auto: resolved below, once every setting is read
            values[setting.name] = value
            continue
        if setting.minimum is not None and value < setting.minimum:  # type: ignore[operator]
            raise ConfigError("%s: must be at least %s, got %r" % (source, setting.minimum, text))
        if setting.maximum is not None and value > setting.maximum:  # type: ignore[operator]
            raise ConfigError("%s: must be at most %s, got %r" % (source, setting.maximum, text))
        values[setting.name] = value
    body_auto = values["max_body"] is None
    _resolve_record_sizes(values)
    config = Config(**values)  # type: ignore[arg-type]
    _check(config, stream_decides=body_auto and config.sink == "kinesis" and not config.max_record_size)
    _check_access(config, given)
    _check_spool(config, given)
    _check_tls(config, given)
    return config, origins


def _check_tls(config: Config, given: Mapping[str, str]) -> None:
    """Both TLS files or neither; readable, and a certificate with its key."""
    if not config.tls_cert and not config.tls_key:
        return
    if not config.tls_key:
        raise ConfigError("--tls-key: needed with %s (the certificate's private key)" % given["tls_cert"])
    if not config.tls_cert:
        raise ConfigError("--tls-cert: needed with %s (the certificate of that key)" % given["tls_key"])
    try:
        server_context(config.tls_cert, config.tls_key, cert_name=given["tls_cert"],
                       key_name=given["tls_key"])
    except CertificateError as exc:
        raise ConfigError(str(exc)) from None


#: Settings that mean nothing without --ack spool.
SPOOL_SETTINGS = ("spool_dir", "spool_size", "spool_sync_interval")


def _check_spool(config: Config, given: Mapping[str, str]) -> None:
    if config.ack != "spool":
        for name in SPOOL_SETTINGS:
            if name in given:
                raise ConfigError("%s: needs --ack spool (SLUICE_ACK=spool)" % given[name])
        return
    if not config.spool_dir:
        raise ConfigError("--spool-dir: required with --ack spool (the directory records are "
                          "spooled to before the 202)")
    if config.sink == "file" and os.path.abspath(config.spool_dir) == os.path.abspath(config.data_dir):
        raise ConfigError("--spool-dir: must not be the file sink's --data-dir")
    # A frame adds a 12-byte header and keys to the record; 2 KiB covers both.
    if config.spool_size < 2 * (config.max_record + 2 * KiB):
        raise ConfigError("--spool-size: must hold at least two of the largest records (2 x %d "
                          "bytes), got %d" % (config.max_record + 2 * KiB, config.spool_size))


def _check_access(config: Config, given: Mapping[str, str]) -> None:
    if not config.redis:
        # Access control would be silently off: refuse rather than serve
        # without API keys when the operator evidently meant to require them.
        for name in ACCESS_SETTINGS:
            if name in given:
                raise ConfigError("%s: needs --redis (SLUICE_REDIS_URL); access control is off "
                                  "without it" % given[name])
        return
    if config.redis.startswith("unix://") and (config.redis_cluster or "+cluster" in config.redis):
        raise ConfigError("--redis-cluster: Redis Cluster needs a redis:// or rediss:// URL")


#: The ring's default size: room for many ordinary bodies in flight at once.
DEFAULT_RING_SIZE = 32 * MiB
#: With larger records, the default ring holds this many of the largest:
#: two being received while two more wait in requests to the sink.
DEFAULT_RING_RECORDS = 4
#: --max-body auto without a record limit (file and null sinks).
DEFAULT_MAX_BODY = 1 * MiB


def _resolve_record_sizes(values: Dict[str, object]) -> None:
    """Turn ``auto`` sizes into bytes: record limit, then body, then ring."""
    sink = values["sink"]
    record = values["max_record_size"]
    if record is None:
        values["max_record_size"] = record = 0
    assert isinstance(record, int)
    ceiling: Optional[int] = None
    if sink == "kinesis":
        # Until the stream is read, a record may be as large as any stream takes.
        ceiling = record or KINESIS_LARGE_MAX_RECORD_BYTES
    elif sink == "firehose":
        ceiling = min(record or FIREHOSE_MAX_RECORD_BYTES, FIREHOSE_MAX_RECORD_BYTES)
    if values["max_body"] is None:
        # The sink trims each request's body by its envelope line and key.
        values["max_body"] = ceiling if ceiling is not None else DEFAULT_MAX_BODY
    if values["ring_size"] is None:
        body = values["max_body"]
        assert isinstance(body, int)
        largest = body + MAX_ENVELOPE_BYTES
        values["ring_size"] = max(DEFAULT_RING_SIZE, -(-DEFAULT_RING_RECORDS * largest // MiB) * MiB)


def _check(config: Config, *, stream_decides: bool = False) -> None:
    if config.sink == "kinesis" and not config.stream:
        raise ConfigError("--stream: required with --sink kinesis (the data stream to put records to)")
    if config.sink == "firehose" and not config.delivery_stream:
        raise ConfigError("--delivery-stream: required with --sink firehose "
                          "(the delivery stream to put records to)")
    if config.sink == "firehose" and config.aggregation != "off":
        raise ConfigError("--aggregation: KPL aggregation is for --sink kinesis; Firehose takes "
                          "no aggregated records from a producer (leave it off)")
    if config.sink == "firehose" and config.delivery_stream.startswith("arn:"):
        raise ConfigError("--delivery-stream: give the delivery stream's name, not its ARN")
    if (config.endpoint_url.lower().startswith("http://") and not config.allow_insecure_endpoint
            and not is_loopback_url(config.endpoint_url)):
        raise ConfigError("--endpoint-url: http:// only to a loopback address; use https://, or "
                          "--allow-insecure-endpoint if the path is trusted")
    if stream_decides:
        # The stream's limit is read at start (Gateway.serve checks the ring
        # again then); every stream takes 1 MiB records at least.
        if config.ring_size < 2 * KINESIS_DEFAULT_MAX_RECORD_BYTES:
            raise ConfigError(
                "--ring-size: must hold at least two of the largest records (2 x %d bytes, the "
                "smallest record limit of a stream), got %d"
                % (KINESIS_DEFAULT_MAX_RECORD_BYTES, config.ring_size))
    elif config.ring_size < 2 * config.max_record:
        raise ConfigError(
            "--ring-size: must hold at least two of the largest records (2 x %d bytes for "
            "--max-body %d), got %d" % (config.max_record, config.max_body, config.ring_size))


def from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse ``argv`` (flags only) and ``environ``; a convenience for tests."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    namespace, extra = parser.parse_known_args(list(argv))
    if extra:
        raise ConfigError("%s: unknown option" % extra[0])
    return load(vars(namespace), environ)
