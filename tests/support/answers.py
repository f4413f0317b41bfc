"""What the socket tests of the server expect of an answer, and the gateway they share."""

from __future__ import annotations

import json
import random
import re

import pytest

from tests.support.gateway import CurlTransfer, RawConnection, Response, post_request, running_gateway

__all__ = ["KiB", "MiB", "MAX_BODY", "ULID", "ERROR_REASONS", "blob", "accepted_id", "assert_error",
           "one_error_then_eof", "curl_id", "http_id", "hold_ring_slot", "shared"]

KiB = 1024
MiB = 1024 * KiB
MAX_BODY = 1 * MiB  # the default --max-body
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ERROR_REASONS = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    411: "length_required", 413: "payload_too_large", 431: "headers_too_large",
    501: "not_implemented", 503: "overloaded",
}


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") if size else b""


def accepted_id(response: Response) -> str:
    assert response.status == 202, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    doc = response.json()
    assert list(doc) == ["id"] and ULID.match(doc["id"]), doc
    return doc["id"]


def assert_error(response: Response, status: int) -> dict:
    """``response`` is the JSON error answer with ``status``, closing the connection."""
    assert response.status == status, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    assert response.header("connection") == "close"
    doc = response.json()
    assert doc["error"] == ERROR_REASONS[status], doc
    assert isinstance(doc["message"], str) and doc["message"], doc
    return doc


def one_error_then_eof(conn: RawConnection, status: int) -> dict:
    responses, ended = conn.read_to_end()
    assert ended == "eof", "the server reset the connection instead of closing it"
    assert len(responses) == 1, responses
    return assert_error(responses[0], status)


def curl_id(transfer: CurlTransfer) -> str:
    assert transfer.status == 202, transfer.body
    doc = json.loads(transfer.body)
    assert ULID.match(doc["id"]), doc
    return doc["id"]


def http_id(status: int, body: bytes) -> str:
    assert status == 202, body
    doc = json.loads(body)
    assert ULID.match(doc["id"]), doc
    return doc["id"]


def hold_ring_slot(address, body: bytes) -> RawConnection:
    """A connection whose upload has a ring slot and is not finished (the 100 proves it)."""
    conn = RawConnection(address)
    conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
    assert conn.read_response().status == 100
    conn.send(body[:100])
    return conn


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A gateway with default settings, shared by the tests that do not stop or tune it."""
    with running_gateway(data_dir=str(tmp_path_factory.mktemp("shared-data"))) as gateway:
        yield gateway

