"""Checks of the URLs settings take: the Redis URL, and whether an endpoint is this machine.

Error messages never repeat a URL: it may hold a password.

`redis_url_options` reads a Redis URL by redis-py's rules (``parse_url``)
without importing redis-py: the serving process talks to Redis through its
own client, and importing redis-py (with the asyncio package it pulls in)
kept about 27,000 objects, 7 MB of PyPy's heap, alive for nothing.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from typing import Any, Callable, Dict

from gateway.config.secrets import URL_PARSE_ERROR

__all__ = ["parse_redis_url", "redis_url_options", "is_loopback_url"]

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")
#: Query parameters of a Redis URL that name files the TLS setup reads.
_REDIS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


_FALSE_STRINGS = ("0", "F", "FALSE", "N", "NO")


def _to_bool(value: str) -> bool:
    # Never empty: parse_qs drops blank values.
    return value.upper() not in _FALSE_STRINGS


#: redis-py's typed query parameters; any other is kept as text.
_QUERY_PARSERS: Dict[str, Callable[[str], Any]] = {
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _to_bool,
    "retry_on_timeout": _to_bool,
    "retry_on_error": list,
    "max_connections": int,
    "health_check_interval": int,
    "ssl_check_hostname": _to_bool,
    "timeout": float,
}


def redis_url_options(url: str) -> Dict[str, Any]:
    """The connection options of a ``redis://``, ``rediss://`` or ``unix://`` URL.

    The keys and values are redis-py's ``parse_url``'s (``host``, ``port``,
    ``db``, ``username``, ``password``, ``path`` and the query's options),
    except that ``tls`` (``rediss://``) and ``unix`` (``unix://``) are
    booleans where redis-py names a connection class.  Raises `ValueError`
    for what redis-py refuses.
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("Redis URL must specify one of the following schemes "
                         "(redis://, rediss://, unix://)")
    parts = urllib.parse.urlparse(url)
    options: Dict[str, Any] = {}
    for name, values in urllib.parse.parse_qs(parts.query).items():
        if values:
            value = urllib.parse.unquote(values[0])
            parser = _QUERY_PARSERS.get(name)
            if parser is None:
                options[name] = value
                continue
            try:
                options[name] = parser(value)
            except (TypeError, ValueError):
                raise ValueError("Invalid value for '%s' in connection URL." % name) from None
    if parts.username:
        options["username"] = urllib.parse.unquote(parts.username)
    if parts.password:
        options["password"] = urllib.parse.unquote(parts.password)
    if parts.scheme == "unix":
        if parts.path:
            options["path"] = urllib.parse.unquote(parts.path)
        options["unix"] = True
        return options
    if parts.hostname:
        options["host"] = urllib.parse.unquote(parts.hostname)
    if parts.port:  # raises ValueError for a port out of range, as in redis-py
        options["port"] = int(parts.port)
    if parts.path and "db" not in options:
        try:
            options["db"] = int(urllib.parse.unquote(parts.path).replace("/", ""))
        except ValueError:
            pass
    if parts.scheme == "rediss":
        options["tls"] = True
    return options


def parse_redis_url(text: str) -> str:
    """A Redis URL as redis-py reads it, or empty (access control off).

    Error messages never repeat the URL: it may hold a password.
    """
    text = text.strip()
    if not text:
        return ""
    if not text.startswith(_REDIS_SCHEMES):
        raise ValueError("must start with one of %s" % ", ".join(_REDIS_SCHEMES))
    try:
        options = redis_url_options(text.replace("+cluster", "", 1))
    except ValueError:
        raise ValueError(URL_PARSE_ERROR) from None
    for name in _REDIS_FILE_OPTIONS:
        path = options.get(name)
        if isinstance(path, str) and not os.path.exists(path):
            raise ValueError("%s: no such file or directory: %s" % (name, path))
    return text


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine (localhost, 127.0.0.0/8, ::1)."""
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
