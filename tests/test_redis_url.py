"""The serving process reads Redis URLs by redis-py's rules without importing redis-py."""
from __future__ import annotations

import subprocess
import sys
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import parse_url

from gateway.config.urls import redis_url_options

# The query options both supported redis-py majors parse the same way.
_OPTIONS = ("db", "socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry_on_timeout",
            "max_connections", "health_check_interval", "ssl_check_hostname", "timeout",
            "ssl_cert_reqs", "ssl_ca_certs", "client_name")
_VALUES = st.sampled_from(["0", "1", "7", "-3", "2.5", "yes", "No", "false", "F", "x", "1e3",
                           "none", "required", "/etc/ca.pem", "%2Ftmp%2Fca.pem", "nan"])
_TEXT = st.text(alphabet="abcAZ09-_.%:@/", max_size=8)


def _redis_py(url: str):
    """redis-py's reading, with its connection class told as our booleans."""
    options = parse_url(url)
    kind = options.pop("connection_class", None)
    if kind is not None:
        options["unix" if kind.__name__ == "UnixDomainSocketConnection" else "tls"] = True
    return options


def _same(url: str) -> None:
    try:
        expected = _redis_py(url)
    except ValueError:
        with pytest.raises(ValueError):
            redis_url_options(url)
        return
    # By repr: a float option may be nan, which equals nothing.
    assert sorted((k, repr(v)) for k, v in redis_url_options(url).items()) == \
        sorted((k, repr(v)) for k, v in expected.items())


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://localhost", "redis://h:6380", "redis://h/3",
    "rediss://user:p%40ss@redis.internal:6380/1?ssl_cert_reqs=none&ssl_check_hostname=false",
    "redis://:secret@h/0?socket_timeout=0.5&db=4", "redis://h/x", "redis://h/0?socket_timeout=soon",
    "redis://h:99999/0", "redis://h:port/0", "unix:///run/redis.sock?db=1",
    "unix://u:pw@/run/redis.sock", "http://127.0.0.1", "redis://h/0?max_connections=many",
    "redis://h/0?retry_on_timeout=&db=", "redis://[::1]:6379/2",
])
def test_reads_urls_as_redis_py_does(url):
    _same(url)


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["redis", "rediss", "unix"]), user=_TEXT, password=_TEXT,
       host=st.sampled_from(["", "h", "127.0.0.1", "[::1]", "redis.internal"]),
       port=st.sampled_from(["", ":6379", ":0", ":70000", ":x"]), path=_TEXT,
       query=st.lists(st.tuples(st.sampled_from(_OPTIONS), _VALUES), max_size=4))
def test_any_url_is_read_as_redis_py_reads_it(scheme, user, password, host, port, path, query):
    auth = ""
    if user or password:
        auth = urllib.parse.quote(user, safe="") + (":" + urllib.parse.quote(password, safe="")
                                                     if password else "") + "@"
    url = "%s://%s%s%s/%s" % (scheme, auth, host, port, path)
    if query:
        url += "?" + "&".join("%s=%s" % pair for pair in query)
    _same(url)


def test_the_serving_modules_leave_redis_py_unimported():
    code = (
        "import sys\n"
        "import gateway.cli.main, gateway.cli.serve, gateway.cli.worker, gateway.server\n"
        "import gateway.access.control, gateway.assembly\n"
        "from gateway.config.settings import from_args\n"
        "from gateway.access.redis_trio import AsyncRedisEdge\n"
        "from_args(['--redis', 'rediss://u:p@h:1/2?ssl_cert_reqs=none'], {})\n"
        "AsyncRedisEdge('rediss://u:p@h:1/2?ssl_cert_reqs=none')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'asyncio')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
