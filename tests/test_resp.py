"""RESP2 without sockets: commands as Redis reads them, replies in any split."""

from __future__ import annotations

from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.access.resp import (
    MAX_DEPTH,
    NEED_DATA,
    ProtocolError,
    ReplyError,
    ReplyReader,
    pack_command,
)


def test_command_is_an_array_of_bulk_strings() -> None:
    out = bytearray()
    pack_command(out, ("EVALSHA", b"ab", 2, 1.5, "é"))
    assert bytes(out) == b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$3\r\n1.5\r\n$2\r\n\xc3\xa9\r\n"


def test_arguments_other_than_strings_and_numbers_are_refused() -> None:
    with pytest.raises(TypeError):
        pack_command(bytearray(), ("SET", True))
    with pytest.raises(TypeError):
        pack_command(bytearray(), ("SET", None))  # type: ignore[arg-type]


def _replies(data: bytes, chunk: int) -> List[Any]:
    reader = ReplyReader()
    replies: List[Any] = []
    for start in range(0, len(data), chunk):
        reader.feed(data[start:start + chunk])
        while True:
            reply = reader.next_reply()
            if reply is NEED_DATA:
                break
            replies.append(reply)
    assert reader.buffered == 0
    return replies


SCRIPT_REPLY = (b"*7\r\n$2\r\nok\r\n$12\r\n0123456789ab\r\n$11\r\n0 0 0 0 0 0\r\n"
                b":9\r\n$3\r\n0.1\r\n:1\r\n:1024\r\n")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_replies_of_a_pipeline_in_any_split(chunk: int) -> None:
    data = (SCRIPT_REPLY + b"+OK\r\n-NOSCRIPT No matching script.\r\n:-3\r\n$-1\r\n*-1\r\n$0\r\n\r\n"
            b"*2\r\n*1\r\n:1\r\n*0\r\n")
    replies = _replies(data, chunk)
    assert replies[0] == [b"ok", b"0123456789ab", b"0 0 0 0 0 0", 9, b"0.1", 1, 1024]
    assert replies[1] == b"OK"
    assert isinstance(replies[2], ReplyError) and replies[2].code == "NOSCRIPT"
    assert replies[3:] == [-3, None, None, b"", [[1], []]]


@pytest.mark.parametrize("data", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcd\r\n", b"*-2\r\n",
                                  b"$99999999999\r\n", b"*1\r\n" * (MAX_DEPTH + 2)])
def test_bytes_that_are_not_resp_raise(data: bytes) -> None:
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next_reply()


_VALUES = st.recursive(
    st.one_of(st.binary(max_size=40), st.integers(-2**63, 2**63 - 1), st.none(),
              st.text(alphabet="ABCDEFGHIJ abc", min_size=1, max_size=20).map(ReplyError)),
    lambda inner: st.lists(inner, max_size=5), max_leaves=20)


def _encode(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, ReplyError):
        return b"-%s\r\n" % value.message.encode()
    return b"*%d\r\n" % len(value) + b"".join(_encode(v) for v in value)


def _plain(value: Any) -> Any:
    if isinstance(value, ReplyError):
        return ("error", value.message)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@given(st.lists(_VALUES, min_size=1, max_size=6), st.integers(1, 64))
def test_every_reply_comes_back_whole_in_any_split(values: List[Any], chunk: int) -> None:
    data = b"".join(_encode(v) for v in values)
    assert [_plain(r) for r in _replies(data, chunk)] == [_plain(v) for v in values]
