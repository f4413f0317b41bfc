"""The fast head path against h11, the reference, on plain bytes.

The differential tests feed the same head to :func:`gateway.http.fasthead.scan`
and to h11: whenever the fast path accepts a head, h11 must accept it too and
read every field the gateway uses the same way (method, target, path,
Content-Length, Content-Type, Content-Encoding, keep-alive, every header's
value, the API key).  Heads come from a grammar of agent-like heads with odd
parts, then mutated (bytes inserted, deleted or replaced, case flipped,
lines duplicated), and are placed in a buffer between unrelated bytes, which
the scanner must not read.  Fallbacks are not checked against h11 here:
tests/test_http_fuzz.py serves every input with both engines and compares.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.access.limiter import api_key_from_headers
from gateway.http.connection import RequestHead, _head_end
from gateway.http.fasthead import MAX_HEADERS, FastHead, scan

DIFFERENTIAL = settings(max_examples=400, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Names whose values the differential tests compare, besides every name in the head.
LOOKED_UP = (b"host", b"content-length", b"content-type", b"content-encoding", b"authorization",
             b"x-api-key", b"x-partition-key", b"connection", b"x-missing")


def _scan(head: bytes, before: bytes = b"", after: bytes = b"") -> Optional[FastHead]:
    """The fast path's reading of ``head`` placed in a buffer between other bytes, or None."""
    buf = bytearray(before + head + after)
    end = _head_end(buf, len(before), len(before) + len(head))
    if end < 0:
        return None
    fast = FastHead(buf)
    return fast if scan(buf, len(before), end, fast) else None


def _h11(head: bytes) -> Tuple[h11.Request, h11.Connection]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert type(event) is h11.Request, event
    return event, conn


def _assert_same_as_h11(head: bytes, fast: FastHead) -> None:
    try:
        event, conn = _h11(head)
    except h11.RemoteProtocolError as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError("the fast path accepted a head h11 refuses: %r (%s)" % (head, exc)) from exc
    reference = RequestHead(event)
    assert fast.method == reference.method
    assert fast.target == reference.target
    assert fast.path == reference.path
    assert fast.http_version == reference.http_version
    assert fast.content_length == reference.content_length
    assert fast.chunked is reference.chunked is False
    assert fast.expect_continue is reference.expect_continue is False
    assert fast.content_type == reference.content_type
    assert fast.content_encoding == reference.content_encoding
    assert fast.keep_alive == conn._cstate.keep_alive
    assert not conn.client_is_waiting_for_100_continue
    assert fast.headers == list(event.headers)
    for name in set(LOOKED_UP) | {name for name, _ in event.headers}:
        assert fast.header(name) == reference.header(name), name
    assert api_key_from_headers(fast.credential_headers) == api_key_from_headers(reference.headers)


# -- the grammar ---------------------------------------------------------------------


def _usually(usual, *odd):
    """``usual`` most of the time, else one of ``odd``."""
    return st.sampled_from([usual] * (4 * len(odd)) + list(odd))


def _cases(text: bytes) -> st.SearchStrategy[bytes]:
    return _usually(text, text.lower(), text.upper(), text.title())


# Mostly ordinary bytes and names, so that many heads take the fast path and
# the odd parts come one or two at a time.
_VALUE_BYTES = st.sampled_from(list(b"aZ09-_./;=,+ \t\"()") * 40
                               + [0x00, 0x01, 0x0B, 0x0C, 0x7F, 0x80, 0xA0, 0xFF])
_NAMES = [b"Content-Type", b"Content-Encoding", b"Authorization", b"X-API-Key", b"Connection",
          b"User-Agent", b"Accept", b"X-Partition-Key"] * 4 + [
          b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"TE", b"Content-Length ",
          b"X_Odd~Name", b"X(bad)", b"", b"\xffName"]


@st.composite
def _value(draw, name: bytes) -> bytes:
    lower = name.lower().strip()
    if lower == b"content-length":
        return draw(st.sampled_from([b"0", b"3", b"1024", b"0001", b" 12 "] * 3 + [b"1,1", b"+1", b"-1", b"",
                                     b"1" * 18, b"9" * 19, b"9" * 21, b"0x10", b"1 2", b"\xb2"]))
    if lower == b"connection":
        return draw(st.sampled_from([b"close", b"Keep-Alive", b"keep-alive", b"CLOSE"] * 2
                                    + [b"close, keep-alive", b"upgrade", b"", b" close ", b"clos"]))
    if lower == b"authorization":
        return draw(st.sampled_from([b"Bearer sk.t1.abc", b"bearer  sk.t1.abc ", b"Basic x", b"Bearer",
                                     b"Bearer sk.t1.\xff"]))
    if lower in (b"host", b"content-type", b"x-api-key") and draw(st.booleans()):
        return draw(st.sampled_from([b"gateway:8080", b"application/x-ndjson", b"sk.t2.def", b"",
                                     b"a, b", b"text/plain; charset=utf-8"]))
    if draw(st.integers(0, 3)):
        return draw(st.sampled_from([b"fluent-bit/3.0", b"*/*", b"a", b"", b"x y", b"\xc3\xa9t\xc3\xa9"]))
    prefix = draw(st.sampled_from([b"", b" ", b"\t", b"  \t"]))
    suffix = draw(st.sampled_from([b"", b" ", b"\t "]))
    return prefix + bytes(draw(st.lists(_VALUE_BYTES, max_size=12))) + suffix


@st.composite
def _header(draw) -> bytes:
    name = draw(st.sampled_from(_NAMES).flatmap(_cases))
    colon = draw(_usually(b":", b" :", b"::", b""))
    return name + colon + draw(_value(name)) + draw(_usually(b"\r\n", b"\n", b"\r\r\n"))


@st.composite
def _head(draw) -> bytes:
    method = draw(_usually(b"POST", b"GET", b"HEAD", b"PUT", b"post", b"OPTIONS"))
    target = draw(_usually(b"/v1/logs", b"/v1/logs?tenant=a&x=?", b"/healthz", b"/", b"*",
                           b"http://h/v1/logs", b"/a#b", b"/\x7f", b"/\xc3\xa9", b"/a b", b""))
    version = draw(_usually(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "))
    sep = draw(_usually(b" ", b"  ", b"\t"))
    line = method + sep + target + sep + version + b"\r\n"
    headers: List[bytes] = []
    if draw(st.integers(0, 10)):
        headers.append(b"Host: gateway\r\n")
    if draw(st.integers(0, 4)):
        headers.append(b"Content-Length: %d\r\n" % draw(st.integers(0, 2 ** 20)))
    headers += draw(st.lists(_header(), max_size=4))
    headers = draw(st.permutations(headers))
    return line + b"".join(headers) + b"\r\n"


@st.composite
def _mutated(draw, head: bytes) -> bytes:
    out = bytearray(head)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        at = draw(st.integers(0, max(0, len(out) - 1)))
        operation = draw(st.sampled_from(["insert", "replace", "delete", "case", "duplicate"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 58, 0x41, 0x7F, 0x80, 0xFF]))
        if not out or operation == "insert":
            out[at:at] = bytes([byte])
        elif operation == "replace":
            out[at] = byte
        elif operation == "delete":
            del out[at]
        elif operation == "case":
            out[at] = out[at] ^ 0x20 if chr(out[at]).isalpha() else out[at]
        else:
            start = out.rfind(b"\n", 0, at) + 1
            stop = out.find(b"\n", at)
            if stop >= 0:
                out[stop + 1:stop + 1] = out[start:stop + 1]
    return bytes(out)


_AROUND = st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"\r\n\r\n", b"xx\r\n\r\n", b"\x00" * 40])


@DIFFERENTIAL
@given(head=_head().flatmap(_mutated), before=_AROUND, after=_AROUND)
def test_whatever_the_fast_path_accepts_h11_reads_the_same(head, before, after):
    fast = _scan(head, before, after)
    if fast is not None:
        # What follows the head (the next request, stale bytes) changes nothing.
        assert _scan(head) is not None
        _assert_same_as_h11(head[:_head_end(bytearray(head), 0, len(head))], fast)


@DIFFERENTIAL
@given(head=_head())
def test_grammar_heads_the_fast_path_accepts_read_as_h11_reads_them(head):
    fast = _scan(head)
    if fast is not None:
        _assert_same_as_h11(head, fast)


@DIFFERENTIAL
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(data):
    head = b"POST /v1/logs HTTP/1.1\r\nHost: h\r\n" + data + b"\r\n\r\n"
    fast = _scan(head)
    if fast is not None:
        _assert_same_as_h11(head[:_head_end(bytearray(head), 0, len(head))], fast)


# -- what the fast path takes, and what it leaves to h11 --------------------------------

AGENT = (b"POST /v1/logs HTTP/1.1\r\nHost: gateway:8080\r\nUser-Agent: fluent-bit/3.0\r\n"
         b"Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n"
         b"Authorization: Bearer sk.t1.secret\r\nX-Partition-Key: web-1\r\nContent-Length: 1024\r\n"
         b"Connection: keep-alive\r\n\r\n")


def test_the_head_agents_send_takes_the_fast_path():
    fast = _scan(AGENT)
    assert fast is not None
    assert (fast.method, fast.path, fast.content_length) == (b"POST", b"/v1/logs", 1024)
    assert fast.keep_alive
    assert (fast.content_type, fast.content_encoding) == (b"application/x-ndjson", b"gzip")
    assert fast.header(b"x-partition-key") == b"web-1"
    assert api_key_from_headers(fast.credential_headers) == b"sk.t1.secret"
    _assert_same_as_h11(AGENT, fast)


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    b"HEAD /readyz?x=1 HTTP/1.1\r\nhost:a\r\nconnection: CLOSE\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: \r\nContent-Length: 000\r\nX-Api-Key:  k1 \t\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nX-API-Key: k\r\nAuthorization: Basic x\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nX-Odd: a  b\tc\xff\x80\r\n"
    b"Content-Length: 999999999999999999\r\n\r\n",
])
def test_more_heads_the_fast_path_takes(head):
    fast = _scan(head)
    assert fast is not None
    _assert_same_as_h11(head, fast)


_BASE = b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"


@pytest.mark.parametrize("head", [
    _BASE + b"Transfer-Encoding: chunked\r\n\r\n",
    _BASE + b"Expect: 100-continue\r\n\r\n",
    _BASE + b"Upgrade: h2c\r\n\r\n",
    _BASE + b"Content-Length: 3\r\n\r\n",
    _BASE + b"Host: b\r\n\r\n",
    _BASE + b"Connection: keep-alive, close\r\n\r\n",
    _BASE + b"X-Fold: a\r\n b\r\n\r\n",
    _BASE + b"X-Ctl: a\x01b\r\n\r\n",
    _BASE + b"X-Del: a\x7f\r\n\r\n",
    _BASE + b"X-Bare: a\nY: b\r\n\r\n",
    _BASE + b"X-Space : a\r\n\r\n",
    _BASE + b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    _BASE + b"X-A: 1\r\n" * MAX_HEADERS + b"\r\n",
    b"POST /v1/logs HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
    b"POST /v1/logs HTTP/1.0\r\nContent-Length: 3\r\n\r\n",
    b"POST http://a/v1/logs HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST  /v1/logs HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /v1/logs HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999999999999999\r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\n\r\n",
    b"POST /v1/logs HTTP/1.1\r\nHost: a\r\n\n",
])
def test_heads_left_to_h11(head):
    assert _scan(head) is None


def test_header_values_are_read_only_while_the_head_is_current():
    fast = _scan(AGENT)
    assert fast is not None
    fast.current = False
    with pytest.raises(RuntimeError):
        fast.header(b"host")


def test_credential_headers_keep_their_order():
    head = b"GET / HTTP/1.1\r\nX-API-Key: k\r\nHost: a\r\nAuthorization: Bearer b\r\n\r\n"
    fast = _scan(head)
    assert fast is not None
    assert fast.credential_headers == [(b"x-api-key", b"k"), (b"authorization", b"Bearer b")]
    _assert_same_as_h11(head, fast)


def _pairs(head: bytes) -> List[Tuple[bytes, bytes]]:
    return list(_h11(head)[0].headers)


def test_headers_are_h11s_pairs():
    fast = _scan(AGENT)
    assert fast is not None and fast.headers == _pairs(AGENT)


def test_every_one_byte_change_of_an_agent_head():
    # Exhaustive near the usual shape: each byte replaced, each position given
    # an extra byte, each byte deleted, and each letter's case flipped.
    odd = b"\x00\t\n\r \",:;=\x7f\x80\xff"
    variants = set()
    for at in range(len(AGENT)):
        for byte in odd:
            variants.add(AGENT[:at] + bytes([byte]) + AGENT[at + 1:])
            variants.add(AGENT[:at] + bytes([byte]) + AGENT[at:])
        variants.add(AGENT[:at] + AGENT[at + 1:])
        variants.add(AGENT[:at] + AGENT[at:at + 1].swapcase() + AGENT[at + 1:])
    accepted = 0
    for head in variants:
        fast = _scan(head)
        if fast is not None:
            accepted += 1
            _assert_same_as_h11(head[:_head_end(bytearray(head), 0, len(head))], fast)
    assert accepted > len(variants) // 4  # the fast path is not vacuous here
