"""Admin commands: ``sluice keys ...`` and ``sluice tenants ...``.

:func:`add_admin_commands` registers the ``keys`` and ``tenants`` groups on
an argparse sub-parsers object; each leaf sets ``func``, a handler taking the
parsed arguments and returning the exit status.  ``python -m
gateway.cli.admin ...`` runs the same commands on their own (:func:`main`).

Every command takes ``--redis URL`` (default ``$SLUICE_REDIS_URL``, else
``redis://127.0.0.1:6379/0``; ``rediss://`` for TLS with options such as
``?ssl_ca_certs=/path/ca.pem``) and ``--redis-cluster`` (default
``$SLUICE_REDIS_CLUSTER``) for Redis Cluster, which the URL forms
``redis+cluster://`` / ``rediss+cluster://`` also select: the same
variables ``sluice serve`` reads.

``keys create`` prints the new key once, alone on the last line; nothing
else ever prints a key.  ``keys revoke -`` reads the key from stdin, which
keeps it out of shell history and process listings.  Exit status: 0 done,
1 not found or Redis unreachable, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from gateway.access import keystore
from gateway.access.limiter import TenantLimits, valid_tenant
from gateway.config.secrets import has_password

__all__ = ["REDIS_URL_ENV", "REDIS_CLUSTER_ENV", "add_admin_commands", "build_parser", "run", "main"]

REDIS_URL_ENV = "SLUICE_REDIS_URL"
REDIS_CLUSTER_ENV = "SLUICE_REDIS_CLUSTER"

_LIMIT_OPTIONS = (
    ("--requests-per-second", "requests_per_second", float, "request rate (0: unlimited)"),
    ("--burst", "burst", int, "requests allowed at once (default: one second's worth)"),
    ("--bytes-per-second", "bytes_per_second", float, "body byte rate (0: unlimited)"),
    ("--burst-bytes", "burst_bytes", int, "bytes allowed at once (default: one second's)"),
    ("--monthly-records", "monthly_records", int, "records per UTC month (0: unlimited)"),
    ("--monthly-bytes", "monthly_bytes", int, "body bytes per UTC month (0: unlimited)"),
)


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError("must be a finite number >= 0")
        return value
    parse.__name__ = kind.__name__
    return parse


def _tenant(text: str) -> str:
    if not valid_tenant(text):
        raise argparse.ArgumentTypeError("tenant names are 1-64 of A-Z a-z 0-9 _ -")
    return text


def _redis_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis", metavar="URL",
                        default=os.environ.get(REDIS_URL_ENV, keystore.DEFAULT_REDIS_URL),
                        help="Redis URL (default: $%s)" % REDIS_URL_ENV)
    common.add_argument("--redis-cluster", action="store_true",
                        default=os.environ.get(REDIS_CLUSTER_ENV, "").strip().lower()
                        in ("1", "true", "yes", "on"),
                        help="the URL names a node of a Redis Cluster (default: $%s)"
                        % REDIS_CLUSTER_ENV)
    return common


def _add_limits(parser: argparse.ArgumentParser) -> None:
    for flag, dest, kind, text in _LIMIT_OPTIONS:
        parser.add_argument(flag, dest=dest, type=_non_negative(kind), help=text)


def add_admin_commands(subparsers: Any) -> None:
    """Add the ``keys`` and ``tenants`` command groups to ``subparsers``."""
    common = _redis_options()

    keys = subparsers.add_parser("keys", help="create, revoke and list API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    keys_sub.required = True
    p = keys_sub.add_parser("create", parents=[common], help="create a key (printed once)")
    p.add_argument("--tenant", required=True, type=_tenant)
    _add_limits(p)
    p.set_defaults(func=keys_create)
    p = keys_sub.add_parser("revoke", parents=[common], help="revoke a key")
    p.add_argument("key", nargs="?", help="the key, or - to read it from stdin")
    p.add_argument("--tenant", type=_tenant, help="with --key-id: the key's tenant")
    p.add_argument("--key-id", help="revoke by key id instead of the key")
    p.set_defaults(func=keys_revoke)
    p = keys_sub.add_parser("list", parents=[common], help="list key ids and limits")
    p.add_argument("--tenant", type=_tenant)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=keys_list)
    p = keys_sub.add_parser("show-usage", parents=[common], help="a tenant's monthly usage")
    p.add_argument("--tenant", required=True, type=_tenant)
    p.add_argument("--month", help="YYYYMM (default: this UTC month)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=keys_show_usage)

    tenants = subparsers.add_parser("tenants", help="tenant limits and status")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", metavar="COMMAND")
    tenants_sub.required = True
    p = tenants_sub.add_parser("set-limits", parents=[common], help="change limits")
    p.add_argument("--tenant", required=True, type=_tenant)
    _add_limits(p)
    p.set_defaults(func=tenants_set_limits)
    for name, enabled in (("enable", True), ("disable", False)):
        p = tenants_sub.add_parser(name, parents=[common], help="%s a tenant" % name)
        p.add_argument("--tenant", required=True, type=_tenant)
        p.set_defaults(func=tenants_enable if enabled else tenants_disable)
    p = tenants_sub.add_parser("show", parents=[common], help="a tenant's status and limits")
    p.add_argument("--tenant", required=True, type=_tenant)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=tenants_show)
    p = tenants_sub.add_parser("list", parents=[common], help="tenant names")
    p.set_defaults(func=tenants_list)


def _client(args: argparse.Namespace) -> Any:
    return keystore.connect(args.redis, cluster=args.redis_cluster, retries=1)


def _limits_given(args: argparse.Namespace) -> Dict[str, Any]:
    return {dest: getattr(args, dest) for _, dest, _, _ in _LIMIT_OPTIONS}


def _limits_dict(limits: TenantLimits) -> Dict[str, Any]:
    return {dest: getattr(limits, dest) for _, dest, _, _ in _LIMIT_OPTIONS}


def _print_table(rows: List[List[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def keys_create(args: argparse.Namespace) -> int:
    created = keystore.create_key(_client(args), args.tenant, time.time(),
                                  **_limits_given(args))
    print("tenant: %s" % created.tenant)
    print("key id: %s" % created.key_id)
    print("Store this key now; it cannot be shown again:")
    print(created.api_key)
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    now = time.time()
    if args.key_id:
        if not args.tenant:
            print("error: --key-id needs --tenant", file=sys.stderr)
            return 2
        if not keystore.revoke_key_id(client, args.tenant, args.key_id, now):
            print("error: tenant %s has no key %s" % (args.tenant, args.key_id), file=sys.stderr)
            return 1
        print("revoked key %s of tenant %s" % (args.key_id, args.tenant))
        return 0
    if not args.key:
        print("error: give the key (or - for stdin), or --tenant and --key-id", file=sys.stderr)
        return 2
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    key_id = keystore.revoke_key(client, key, now)
    if key_id is None:
        print("error: no such key", file=sys.stderr)
        return 1
    print("revoked key %s" % key_id)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    client = _client(args)
    infos = keystore.list_keys(client, args.tenant)
    tenants = {t: keystore.get_tenant(client, t) for t in sorted({i.tenant for i in infos})}
    rows = [["TENANT", "KEY_ID", "STATUS", "CREATED", "REQ/S", "BURST", "BYTES/S",
             "BURST_BYTES", "MONTHLY_RECORDS", "MONTHLY_BYTES"]]
    for info in infos:
        tenant = tenants[info.tenant]
        limits = tenant.limits if tenant else TenantLimits()
        status = "revoked" if info.revoked else (
            "active" if tenant and tenant.enabled else "tenant-disabled")
        if args.json:
            print(json.dumps(dict(tenant=info.tenant, key_id=info.key_id, status=status,
                                  created=info.created, revoked=info.revoked or None,
                                  **_limits_dict(limits)), sort_keys=True))
            continue
        rows.append([info.tenant, info.key_id, status, _utc(info.created)]
                    + ["%g" % v for v in _limits_dict(limits).values()])
    if not args.json:
        _print_table(rows)
    return 0


def keys_show_usage(args: argparse.Namespace) -> int:
    usage = keystore.get_usage(_client(args), args.tenant, time.time(), args.month)
    fields = dict(tenant=usage.tenant, month=usage.month, records=usage.records,
                  bytes=usage.bytes, monthly_records=usage.limits.monthly_records,
                  monthly_bytes=usage.limits.monthly_bytes, resets_at=usage.resets_at)
    if args.json:
        print(json.dumps(fields, sort_keys=True))
        return 0
    limit = lambda n: "%d" % n if n else "unlimited"  # noqa: E731
    print("tenant %s, month %s" % (usage.tenant, usage.month))
    print("records: %d of %s" % (usage.records, limit(usage.limits.monthly_records)))
    print("bytes: %d of %s" % (usage.bytes, limit(usage.limits.monthly_bytes)))
    print("resets at: %s" % _utc(usage.resets_at))
    return 0


def tenants_set_limits(args: argparse.Namespace) -> int:
    info = keystore.set_limits(_client(args), args.tenant, **_limits_given(args))
    return _show(info, False)


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    if not keystore.set_enabled(_client(args), args.tenant, enabled):
        print("error: no tenant %s" % args.tenant, file=sys.stderr)
        return 1
    print("tenant %s %s" % (args.tenant, "enabled" if enabled else "disabled"))
    return 0


def tenants_enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


def tenants_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def _show(info: Optional[keystore.TenantInfo], as_json: bool) -> int:
    if info is None:
        print("error: no such tenant", file=sys.stderr)
        return 1
    fields = dict(tenant=info.tenant, enabled=info.enabled, **_limits_dict(info.limits))
    if as_json:
        print(json.dumps(fields, sort_keys=True))
    else:
        for name, value in fields.items():
            print("%s: %s" % (name, value))
    return 0


def tenants_show(args: argparse.Namespace) -> int:
    return _show(keystore.get_tenant(_client(args), args.tenant), args.json)


def tenants_list(args: argparse.Namespace) -> int:
    for tenant in keystore.list_tenants(_client(args)):
        print(tenant)
    return 0


def build_parser(prog: str = "sluice") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Sluice key and tenant admin")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_admin_commands(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed admin command, turning Redis failures into a message."""
    # Here, not at the top: `sluice serve` shares this module's parser and
    # never uses redis-py.
    import redis

    if has_password(args.redis) and args.redis != os.environ.get(REDIS_URL_ENV):
        print("warning: the Redis password given with --redis is visible to other local users "
              "(ps, shell history): give the URL in $%s instead" % REDIS_URL_ENV, file=sys.stderr)
    try:
        return args.func(args)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.RedisClusterException) as exc:
        print("error: cannot reach Redis at %s (%s)" % (keystore.redacted_url(args.redis),
                                                        keystore.edge_failure(exc)), file=sys.stderr)
        return 1
    except ValueError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
