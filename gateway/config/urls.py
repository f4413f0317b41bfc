"""Checks of the URLs settings take: the Redis URL, and whether an endpoint is this machine.

Error messages never repeat a URL: it may hold a password.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse

from gateway.config.secrets import URL_PARSE_ERROR

__all__ = ["parse_redis_url", "is_loopback_url"]

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")
#: Query parameters of a Redis URL that name files the TLS setup reads.
_REDIS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def parse_redis_url(text: str) -> str:
    """A Redis URL as redis-py reads it, or empty (access control off).

    Error messages never repeat the URL: it may hold a password.
    """
    text = text.strip()
    if not text:
        return ""
    if not text.startswith(_REDIS_SCHEMES):
        raise ValueError("must start with one of %s" % ", ".join(_REDIS_SCHEMES))
    from redis.connection import parse_url

    try:
        options = parse_url(text.replace("+cluster", "", 1))
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
