"""Partition keys and explicit hash keys decided from a request head (sinks/aws/partition_keys.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.aws.partition_keys import KeyPolicy, check_partition_key, key_bytes, parse_key_setting
from sinks.aws.putrecords import PutRecordsBatch, RecordRejected
from sinks.aws.services import profile_for
from sinks.errors import InvalidRecordKey
from tests.support.batches import add

RID = "01M8BECG8YTGDXTWT500000001"


def headers(**values):
    table = {name.replace("_", "-").lower().encode(): value for name, value in values.items()}
    return table.get


@pytest.mark.parametrize("text", ["random", "tenant", "header:X-Tenant", "header:x_y"])
def test_settings_accepted(text):
    assert parse_key_setting(text) == text


@pytest.mark.parametrize("text", ["", "Random", "header:", "header:a b", "hdr:X", "header:X:"])
def test_settings_refused(text):
    with pytest.raises(ValueError):
        parse_key_setting(text)


def test_random_is_the_record_id():
    assert KeyPolicy("random").keys(RID, b"acme", headers()) == (RID, None, 26)


def test_tenant_mode_uses_the_tenant_and_falls_back_to_random_without_one():
    policy = KeyPolicy("tenant")
    assert policy.keys(RID, b"acme", headers()) == ("acme", None, 4)
    assert policy.keys(RID, None, headers()) == (RID, None, 26)


def test_header_mode_reads_the_header_case_insensitively():
    policy = KeyPolicy("header:X-Route")
    assert policy.keys(RID, None, headers(x_route=b"eu-1")) == ("eu-1", None, 4)
    # Missing or empty: the record id, as in random mode.
    assert policy.keys(RID, None, headers()) == (RID, None, 26)
    assert policy.keys(RID, None, headers(x_route=b"")) == (RID, None, 26)


def test_key_of_256_characters_passes_and_257_is_a_bad_request():
    policy = KeyPolicy("header:X-Key")
    assert policy.keys(RID, None, headers(x_key=b"k" * 256))[2] == 256
    with pytest.raises(InvalidRecordKey, match="257 characters"):
        policy.keys(RID, None, headers(x_key=b"k" * 257))


def test_non_ascii_header_bytes_count_as_latin_1_characters_and_utf_8_bytes():
    policy = KeyPolicy("header:X-Key")
    key, _, size = policy.keys(RID, None, headers(x_key=b"\xe9" * 256))
    assert key == "\xe9" * 256 and size == 512
    with pytest.raises(InvalidRecordKey):
        policy.keys(RID, None, headers(x_key=b"\xe9" * 257))


@pytest.mark.parametrize("value", [b"0", b"1", b"%d" % (2**128 - 1), b"123456789"])
def test_explicit_hash_keys_accepted(value):
    policy = KeyPolicy("random", "X-Hash")
    assert policy.keys(RID, None, headers(x_hash=value))[1] == value.decode()


@pytest.mark.parametrize("value", [b"", b"01", b"-1", b"1.0", b"%d" % 2**128, b"1" * 40, b"abc", b" 1"])
def test_invalid_explicit_hash_keys_are_bad_requests(value):
    policy = KeyPolicy("random", "X-Hash")
    with pytest.raises(InvalidRecordKey, match="explicit hash key"):
        policy.keys(RID, None, headers(x_hash=value))


def test_no_hash_key_header_means_none():
    assert KeyPolicy("random", "X-Hash").keys(RID, None, headers())[1] is None
    assert KeyPolicy("random").keys(RID, None, headers(x_hash=b"5"))[1] is None


# -- one rule for the head and the body -----------------------------------------

_BATCH = PutRecordsBatch("logs")


@settings(max_examples=200, deadline=None)
@given(key=st.one_of(st.text(max_size=300), st.text(alphabet="\U0001F600é\ud800x", max_size=140)))
def test_the_head_check_and_the_body_builder_apply_the_same_key_rule(key):
    _BATCH.reset()
    try:
        size = check_partition_key(key)
    except InvalidRecordKey:
        with pytest.raises(RecordRejected):
            add(_BATCH, b"x", key)
    else:
        assert add(_BATCH, b"x", key)
        assert size == key_bytes(key) and _BATCH.payload_bytes == 1 + size


@pytest.mark.parametrize("service, keyed", [("kinesis", True), ("firehose", False)])
def test_each_service_says_whether_records_carry_keys(service, keyed):
    profile = profile_for(service)
    assert profile.keyed is keyed and profile.name == service
    assert profile.key_bytes("é") == (2 if keyed else 0)
