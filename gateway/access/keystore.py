"""API keys and tenants in Redis: the layout, admin operations, the check edge.

Redis key layout (``T`` is the tenant name; ``{T}`` is its cluster hash tag,
so everything the check script touches for one tenant is on one slot)::

    sluice:{T}:key:<sha256 hex>   HASH key_id, created, [revoked]   one per API key
    sluice:{T}:keys               HASH key_id -> sha256 hex         index for list/revoke
    sluice:{T}:tenant             HASH enabled (1/0), rps, burst, bps, burst_bytes,
                                       monthly_records, monthly_bytes (0 = unlimited)
    sluice:{T}:gcra               HASH req, bytes: GCRA theoretical arrival times
                                       (no TTL: one small hash per limited tenant)
    sluice:{T}:usage:<YYYYMM>     HASH records, bytes used in that UTC month; its
                                       TTL (set when created) ends 400 days after
                                       the month does
    sluice:tenants                SET of tenant names (admin listing only)

API keys look like ``sluice1.<tenant>.<secret>`` (see :mod:`gateway.access.limiter`);
the key itself is never stored, only the SHA-256 of the whole string.  A key
id (12 hex digits, random) names a key in listings and logs.

Connecting: ``redis://`` and ``rediss://`` (TLS) URLs as redis-py reads them,
TLS options included as query parameters (``?ssl_ca_certs=/path/ca.pem``).
Redis Cluster is chosen by ``cluster=True`` (the CLI's ``--redis-cluster``)
or by the URL forms ``redis+cluster://`` and ``rediss+cluster://`` naming any
one node.  Admin operations here are plain sync redis-py calls.
:class:`RedisEdge` is the sync half of the gateway's hot path: it runs
batches of check scripts for :class:`gateway.access.control.AccessControl`, which
calls it from worker threads.
"""

from __future__ import annotations

import functools
import math
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from gateway.access.lease import LEASE_SCRIPT
from gateway.access.limiter import (
    API_KEY_PREFIX,
    CHECK_SCRIPT,
    TENANTS_SET,
    ScriptCall,
    TenantLimits,
    UsageDelta,
    check_command,
    key_index_name,
    key_record_name,
    month_id,
    next_month_start,
    parse_api_key,
    tenant_name,
    usage_commands,
    usage_name,
    valid_tenant,
)
from gateway.config.secrets import URL_PARSE_ERROR, redacted_url

__all__ = [
    "DEFAULT_REDIS_URL",
    "LIMIT_FIELDS",
    "split_redis_url",
    "redacted_url",
    "connect",
    "new_api_key",
    "CreatedKey",
    "KeyInfo",
    "TenantInfo",
    "Usage",
    "create_key",
    "revoke_key",
    "revoke_key_id",
    "list_keys",
    "list_tenants",
    "get_tenant",
    "set_limits",
    "set_enabled",
    "get_usage",
    "EdgeUnavailable",
    "edge_failure",
    "RedisEdge",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# TenantLimits field -> tenant hash field (the names the check script reads).
LIMIT_FIELDS = {
    "requests_per_second": "rps",
    "burst": "burst",
    "bytes_per_second": "bps",
    "burst_bytes": "burst_bytes",
    "monthly_records": "monthly_records",
    "monthly_bytes": "monthly_bytes",
}
# Key ids are 48 random bits: collisions within one tenant are retried, and
# this many attempts failing means something else is wrong.
_KEY_ID_ATTEMPTS = 8


def split_redis_url(url: str, cluster: bool = False) -> Tuple[str, bool]:
    """The redis-py URL and whether it names a cluster."""
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return url.replace("+cluster", "", 1), True
    return url, cluster


def connect(url: str = DEFAULT_REDIS_URL, *, cluster: bool = False,
            socket_timeout: Optional[float] = 5.0,
            socket_connect_timeout: Optional[float] = 5.0,
            retries: int = 0) -> Any:
    """A sync redis-py client (``Redis`` or ``RedisCluster``) for ``url``.

    ``retries`` is redis-py's own retry count on connection errors; the
    gateway keeps it 0 and does its own backoff.  A cluster client contacts
    the cluster here to learn the slot map, so this blocks and may raise.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    url, cluster = split_redis_url(url, cluster)
    options: Dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": Retry(NoBackoff(), retries),
    }
    try:
        if cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(url, **options)
        return redis.Redis.from_url(url, **options)
    except ValueError:
        raise ValueError(URL_PARSE_ERROR) from None


def new_api_key(tenant: str) -> str:
    """A fresh API key for ``tenant`` (shown once, never stored)."""
    if not valid_tenant(tenant):
        raise ValueError("tenant names are 1-64 of A-Z a-z 0-9 _ -")
    return "%s.%s.%s" % (API_KEY_PREFIX, tenant, secrets.token_urlsafe(32))


@dataclass(frozen=True)
class CreatedKey:
    """A newly created key; ``api_key`` stays out of ``repr``."""

    tenant: str
    key_id: str
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class KeyInfo:
    tenant: str
    key_id: str
    created: float
    revoked: float = 0.0

    @property
    def active(self) -> bool:
        return not self.revoked


@dataclass(frozen=True)
class TenantInfo:
    tenant: str
    enabled: bool
    limits: TenantLimits


@dataclass(frozen=True)
class Usage:
    tenant: str
    month: str
    records: int
    bytes: int
    limits: TenantLimits
    resets_at: int


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_tenant(tenant: str) -> None:
    if not valid_tenant(tenant):
        raise ValueError("tenant names are 1-64 of A-Z a-z 0-9 _ -")


def _limits_from(fields: Dict[Any, Any]) -> TenantLimits:
    values = {_s(k): _s(v) for k, v in fields.items()}
    return TenantLimits(
        float(values.get("rps", 0) or 0), int(values.get("burst", 0) or 0),
        float(values.get("bps", 0) or 0), int(values.get("burst_bytes", 0) or 0),
        int(values.get("monthly_records", 0) or 0),
        int(values.get("monthly_bytes", 0) or 0))


def get_tenant(client: Any, tenant: str) -> Optional[TenantInfo]:
    """The tenant's settings, or None if it does not exist."""
    _check_tenant(tenant)
    fields = client.hgetall(tenant_name(tenant))
    if not fields:
        return None
    enabled = _s(fields.get(b"enabled", fields.get("enabled", b"0"))) == "1"
    return TenantInfo(tenant, enabled, _limits_from(fields))


def set_limits(client: Any, tenant: str, **changes: Optional[float]) -> TenantInfo:
    """Change some limits (None leaves one as it is); creates the tenant.

    A rate set without a burst gets one second's worth as its burst, so a
    new limit never leaves a zero allowance.
    """
    _check_tenant(tenant)
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise TypeError("unknown limits: %s" % ", ".join(sorted(unknown)))
    wanted = {k: v for k, v in changes.items() if v is not None}
    for name, value in wanted.items():
        if value < 0 or not math.isfinite(value):
            raise ValueError("%s must be a finite number >= 0" % name)
    current = get_tenant(client, tenant)
    limits = current.limits if current else TenantLimits()
    merged = {name: getattr(limits, name) for name in LIMIT_FIELDS}
    merged.update(wanted)
    for rate, burst in (("requests_per_second", "burst"), ("bytes_per_second", "burst_bytes")):
        if merged[rate] > 0 and burst not in wanted and merged[burst] < 1:
            merged[burst] = max(1, int(math.ceil(merged[rate])))
    mapping: Dict[str, str] = {}
    for name, value in merged.items():
        if name in ("requests_per_second", "bytes_per_second"):
            mapping[LIMIT_FIELDS[name]] = repr(float(value))
        else:
            mapping[LIMIT_FIELDS[name]] = str(int(value))
    if current is None:
        mapping["enabled"] = "1"
    client.hset(tenant_name(tenant), mapping=mapping)
    client.sadd(TENANTS_SET, tenant)
    info = get_tenant(client, tenant)
    assert info is not None
    return info


def set_enabled(client: Any, tenant: str, enabled: bool) -> bool:
    """Enable or disable a tenant; False if there is no such tenant."""
    _check_tenant(tenant)
    if not client.exists(tenant_name(tenant)):
        return False
    client.hset(tenant_name(tenant), "enabled", "1" if enabled else "0")
    return True


def create_key(client: Any, tenant: str, now: float, **limits: Optional[float]) -> CreatedKey:
    """Create an API key for ``tenant`` (and the tenant, if new).

    ``limits`` (TenantLimits field names) are applied to the tenant first.
    """
    set_limits(client, tenant, **limits)
    for _ in range(_KEY_ID_ATTEMPTS):
        key_id = secrets.token_hex(6)
        api_key = new_api_key(tenant)
        parsed = parse_api_key(api_key)
        assert parsed is not None
        if client.hsetnx(key_index_name(tenant), key_id, parsed.key_hash):
            break
    else:
        raise RuntimeError("could not find a free key id")
    client.hset(key_record_name(tenant, parsed.key_hash),
                mapping={"key_id": key_id, "created": repr(float(now))})
    return CreatedKey(tenant, key_id, api_key)


def _revoke_record(client: Any, tenant: str, key_hash: str, now: float) -> Optional[str]:
    record = key_record_name(tenant, key_hash)
    key_id = client.hget(record, "key_id")
    if key_id is None:
        return None
    client.hsetnx(record, "revoked", repr(float(now)))
    return _s(key_id)


def revoke_key(client: Any, api_key: str, now: float) -> Optional[str]:
    """Revoke a key given in full; its key id, or None if unknown."""
    parsed = parse_api_key(api_key)
    if parsed is None:
        return None
    return _revoke_record(client, parsed.tenant, parsed.key_hash, now)


def revoke_key_id(client: Any, tenant: str, key_id: str, now: float) -> bool:
    """Revoke a key by its id; False if the tenant has no such key."""
    _check_tenant(tenant)
    key_hash = client.hget(key_index_name(tenant), key_id)
    if key_hash is None:
        return False
    return _revoke_record(client, tenant, _s(key_hash), now) is not None


def list_tenants(client: Any) -> List[str]:
    return sorted(_s(t) for t in client.smembers(TENANTS_SET))


def list_keys(client: Any, tenant: Optional[str] = None) -> List[KeyInfo]:
    """Key ids of one tenant, or of all; never the keys themselves."""
    tenants = [tenant] if tenant is not None else list_tenants(client)
    infos: List[KeyInfo] = []
    for name in tenants:
        _check_tenant(name)
        for key_id, key_hash in sorted(client.hgetall(key_index_name(name)).items()):
            fields = client.hmget(key_record_name(name, _s(key_hash)), "created", "revoked")
            if fields[0] is None:
                continue
            infos.append(KeyInfo(name, _s(key_id), float(_s(fields[0])),
                                 float(_s(fields[1])) if fields[1] is not None else 0.0))
    return infos


def get_usage(client: Any, tenant: str, now: float, month: Optional[str] = None) -> Usage:
    """Records and bytes used by ``tenant`` in ``month`` (default: ``now``'s)."""
    _check_tenant(tenant)
    month = month or month_id(now)
    records, nbytes = client.hmget(usage_name(tenant, month), "records", "bytes")
    info = get_tenant(client, tenant)
    limits = info.limits if info else TenantLimits()
    return Usage(tenant, month, int(records or 0), int(nbytes or 0), limits,
                 next_month_start(now))


class EdgeUnavailable(Exception):
    """Redis could not be reached or did not answer (translated once, here)."""


def _exceptions() -> Any:
    """redis-py's exceptions, imported only where a redis-py client is used.

    The serving process reaches Redis through its own client
    (`gateway.access.redis_trio`) and never imports redis-py.
    """
    import redis.exceptions

    return redis.exceptions


@functools.cache
def _edge_errors() -> Tuple[Type[BaseException], ...]:
    """The redis-py exceptions that mean Redis could not be reached or answer."""
    e = _exceptions()
    return (e.ConnectionError, e.TimeoutError, e.ClusterError, e.RedisClusterException,
            e.BusyLoadingError, OSError)


def edge_failure(exc: BaseException) -> str:
    """What failed in reaching Redis, without anything that could hold a secret.

    A refused TLS certificate says which check failed (host name, issuer,
    expiry): otherwise every failure is its exception's class name.
    """
    seen = exc
    for _ in range(8):  # the chain redis-py builds is two or three deep
        if isinstance(seen, ssl.SSLCertVerificationError):
            return "TLS certificate not accepted: %s" % (seen.verify_message or seen.reason)
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        # redis-py keeps only the text of the ssl error; this part of it names
        # the failed check (it holds host and port, never the password).
        return "TLS certificate not accepted: %s" % text[text.index("certificate verify failed"):] \
            if "certificate verify failed" in text else "TLS certificate not accepted"
    return type(exc).__name__


class RedisEdge:
    """The Redis side, sync, called from worker threads.

    :meth:`run_checks` writes one pipeline of EVALSHAs (plus usage to add) to
    each node involved, then reads the replies: one round trip per node, the
    nodes in parallel.  It returns one reply or exception per call, the
    number of node pipelines sent, and the number of SCRIPT LOADs it did (a
    NOSCRIPT reply loads the script and sends those calls again).

    The pipelining is done here on redis-py connections rather than with
    redis-py's pipelines: its cluster pipeline asks a node for the keys of
    every EVALSHA (COMMAND GETKEYS), a round trip per check.  A MOVED or ASK
    reply (slots being moved) fails that check and refreshes the slot map.
    """

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout: float = 1.0) -> None:
        self._url, self._cluster = split_redis_url(url, cluster)
        self._socket_timeout = socket_timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = connect(
                    self._url, cluster=self._cluster, socket_timeout=self._socket_timeout,
                    socket_connect_timeout=self._socket_timeout)
            return self._client

    def probe(self) -> None:
        """Connect if needed, PING and load the scripts; raise EdgeUnavailable."""
        try:
            client = self._get_client()
            client.ping()
            client.script_load(CHECK_SCRIPT)
            client.script_load(LEASE_SCRIPT)
        except _edge_errors() as exc:
            raise EdgeUnavailable(edge_failure(exc)) from exc
        except _exceptions().ResponseError as exc:
            # Redis answered but refused (an ACL without EVALSHA, a missing
            # database): the reply says why and holds no secret.
            raise EdgeUnavailable("%s: %s" % (type(exc).__name__, exc)) from exc

    def run_checks(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]] = ()
                   ) -> Tuple[List[object], int, int]:
        """Replies to ``calls``; ``usage`` pairs a delta with its hash's TTL."""
        # (key that routes it, command): the key picks the cluster node.  The
        # usage goes first, so bytes charged to a rate count in these checks.
        commands: List[Tuple[Any, tuple]] = []
        for delta, ttl in usage:
            commands += [(command[1] if command[0] != "EVAL" else command[3], command)
                         for command in usage_commands(delta, ttl)]
        skip = len(commands)
        commands += [(call.keys[0], check_command(call)) for call in calls]
        exceptions, edge_errors = _exceptions(), _edge_errors()
        try:
            client = self._get_client()
            results, pipelines = self._send(client, commands)
            loads = 0
            missing = [i for i in range(skip, len(commands))
                       if isinstance(results[i], exceptions.NoScriptError)]
            if missing:
                client.script_load(CHECK_SCRIPT)
                client.script_load(LEASE_SCRIPT)
                again, more = self._send(client, [commands[i] for i in missing])
                for i, reply in zip(missing, again):
                    results[i] = reply
                pipelines += more
                loads = 1
            if self._cluster and any(isinstance(r, exceptions.AskError) for r in results):
                client.nodes_manager.initialize()
        except edge_errors as exc:
            raise EdgeUnavailable(edge_failure(exc)) from exc
        for reply in results:
            # A node still loading its data or a cluster without quorum.
            if isinstance(reply, edge_errors):
                raise EdgeUnavailable(type(reply).__name__) from reply
        return results[skip:], pipelines, loads

    def _send(self, client: Any, commands: Sequence[Tuple[str, tuple]]) -> Tuple[List[object], int]:
        """Write every node's commands, then read every node's replies."""
        groups: Dict[str, Tuple[Any, List[int]]] = {}
        if self._cluster:
            for i, (key, _) in enumerate(commands):
                node = client.get_node_from_key(key)
                group = groups.get(node.name)
                if group is None:
                    group = groups[node.name] = (client.get_redis_connection(node), [])
                group[1].append(i)
        else:
            groups[""] = (client, list(range(len(commands))))
        results: List[object] = [None] * len(commands)
        taken: List[Tuple[Any, Any]] = []
        response_error = _exceptions().ResponseError
        try:
            for node_client, indexes in groups.values():
                pool = node_client.connection_pool
                conn = pool.get_connection()
                taken.append((pool, conn))
                conn.send_packed_command(conn.pack_commands([commands[i][1] for i in indexes]))
            for (_, conn), (_, indexes) in zip(taken, groups.values()):
                for i in indexes:
                    try:
                        results[i] = conn.read_response()
                    except response_error as exc:
                        results[i] = exc
        except BaseException:
            # Replies may be left unread: such a connection cannot be reused.
            for _, conn in taken:
                conn.disconnect()
            raise
        finally:
            for pool, conn in taken:
                pool.release(conn)
        return results, len(groups)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
