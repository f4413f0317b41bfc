"""Configuration: defaults, environment, flags, and every refusal naming its setting."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.config.settings import (
    ACCESS_SETTINGS,
    SETTINGS,
    Config,
    ConfigError,
    KiB,
    MiB,
    from_args,
    parse_duration,
    parse_listen,
    parse_redis_url,
    parse_size,
    parse_switch,
)
from gateway.http.connection import DEFAULT_MAX_HEAD
from sinks.envelope import MAX_ENVELOPE_BYTES


def test_defaults():
    config = from_args([], {})
    assert config == Config(
        listen=("127.0.0.1", 8080),
        sink="file",
        data_dir="./sluice-data",
        ring_size=32 * MiB,
        max_body=1 * MiB,
        max_head=DEFAULT_MAX_HEAD,
        head_timeout=10.0,
        body_timeout=60.0,
        idle_timeout=75.0,
        max_connections=0,
        ring_wait=1.0,
        shutdown_timeout=30.0,
        segment_size=128 * MiB,
        flush_interval=0.05,
    )
    assert config.max_record == MiB + MAX_ENVELOPE_BYTES
    assert config.describe() == "listening on http://127.0.0.1:8080, sink file (./sluice-data)"


def test_every_setting_has_a_flag_and_an_env_var():
    names = {s.name for s in SETTINGS}
    assert names == set(Config.__dataclass_fields__)
    # The Redis URL's variable is the one the keys and tenants commands read too.
    renamed = {"redis": "SLUICE_REDIS_URL"}
    for setting in SETTINGS:
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.env == renamed.get(setting.name, "SLUICE_" + setting.name.upper())


def test_environment_sets_values():
    env = {
        "SLUICE_LISTEN": "[::1]:9000",
        "SLUICE_SINK": "null",
        "SLUICE_DATA_DIR": "/var/lib/sluice",
        "SLUICE_RING_SIZE": "64MiB",
        "SLUICE_MAX_BODY": "256k",
        "SLUICE_MAX_HEAD": "8KiB",
        "SLUICE_HEAD_TIMEOUT": "500ms",
        "SLUICE_BODY_TIMEOUT": "2m",
        "SLUICE_IDLE_TIMEOUT": "1h",
        "SLUICE_MAX_CONNECTIONS": "10",
        "SLUICE_RING_WAIT": "0",
        "SLUICE_SHUTDOWN_TIMEOUT": "1.5",
        "SLUICE_SEGMENT_SIZE": "1g",
        "SLUICE_FLUSH_INTERVAL": "5ms",
    }
    config = from_args([], env)
    assert config == Config(
        listen=("::1", 9000), sink="null", data_dir="/var/lib/sluice", ring_size=64 * MiB,
        max_body=256 * KiB, max_head=8 * KiB, head_timeout=0.5, body_timeout=120.0,
        idle_timeout=3600.0, max_connections=10, ring_wait=0.0, shutdown_timeout=1.5,
        segment_size=1024 * MiB, flush_interval=0.005,
    )
    assert config.describe() == "listening on http://[::1]:9000, sink null"


def test_flags_beat_the_environment():
    env = {"SLUICE_MAX_BODY": "2MiB", "SLUICE_SINK": "null", "SLUICE_RING_WAIT": "3s"}
    config = from_args(["--max-body", "512KiB", "--sink=file"], env)
    assert config.max_body == 512 * KiB
    assert config.sink == "file"
    assert config.ring_wait == 3.0  # not given as a flag: the environment's


def test_unrelated_environment_is_ignored():
    assert from_args([], {"SLUICE": "x", "RING_SIZE": "bad", "sluice_ring_size": "bad"}) == from_args([], {})


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576),
    ("0", 0),
    ("10b", 10),
    ("10B", 10),
    ("64k", 64 * KiB),
    ("64K", 64 * KiB),
    ("64kb", 64 * KiB),
    ("64KiB", 64 * KiB),
    ("32MiB", 32 * MiB),
    ("32m", 32 * MiB),
    ("2g", 2048 * MiB),
    ("1GiB", 1024 * MiB),
    (" 7 MiB ", 7 * MiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5MiB", "10 x", "5tb", "MiB", "1 2"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("10s", 10.0), ("10", 10.0), ("1.5", 1.5), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
    ("0", 0.0), ("250MS", 0.25), (" 3 s ", 3.0),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "-1s", "1d", "10 minutes", "1e3", ".5s", "1,5"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:443", ("::1", 443)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8080", ":8080", "host:", "host:http", "host:65536", "host:-1"])
def test_parse_listen_refuses(text):
    with pytest.raises(ValueError):
        parse_listen(text)


BAD_VALUES = [
    ("listen", "nowhere"),
    ("listen", "host:99999"),
    ("sink", "kafka"),
    ("ring_size", "big"),
    ("ring_size", "1KiB"),  # under the minimum
    ("max_body", "-5"),
    ("max_body", "1.5k"),
    ("max_head", "100"),  # under 1 KiB
    ("head_timeout", "0"),
    ("head_timeout", "soon"),
    ("body_timeout", "-1s"),
    ("idle_timeout", "0ms"),
    ("max_connections", "0"),
    ("max_connections", "1.5"),
    ("max_connections", "many"),
    ("ring_wait", "1d"),
    ("shutdown_timeout", "x"),
    ("segment_size", "1KiB"),
    ("flush_interval", "0"),
    ("flush_interval", ""),
]


@pytest.mark.parametrize("name, text", BAD_VALUES)
def test_bad_flag_value_names_the_flag(name, text):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as info:
        from_args([flag + "=" + text], {})
    assert str(info.value).startswith(flag + ": ")


@pytest.mark.parametrize("name, text", BAD_VALUES)
def test_bad_env_value_names_the_env_var(name, text):
    env = "SLUICE_" + name.upper()
    with pytest.raises(ConfigError) as info:
        from_args([], {env: text})
    assert str(info.value).startswith(env + ": ")


def test_good_flag_hides_a_bad_env_value():
    config = from_args(["--max-body", "2KiB"], {"SLUICE_MAX_BODY": "junk"})
    assert config.max_body == 2 * KiB


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_option():
    with pytest.raises(ConfigError) as info:
        from_args(["--ring-sise", "1MiB"], {})
    assert str(info.value).startswith("--ring-sise")


@pytest.mark.parametrize("flags, env", [
    (["--ring-size", "1MiB"], {}),  # 1 MiB body + envelope does not fit twice
    ([], {"SLUICE_RING_SIZE": "2MiB"}),  # exactly 2 x 1 MiB: no room for the envelopes
    (["--max-body", "20MiB", "--ring-size", "32MiB"], {}),  # 32 MiB ring < 2 x 20 MiB
])
def test_ring_too_small_for_two_largest_records(flags, env):
    with pytest.raises(ConfigError) as info:
        from_args(flags, env)
    assert str(info.value).startswith("--ring-size: ")


def test_ring_of_exactly_two_largest_records_is_accepted():
    max_body = 100 * KiB
    ring = 2 * (max_body + MAX_ENVELOPE_BYTES)
    config = from_args(["--max-body", str(max_body), "--ring-size", str(ring)], {})
    assert config.ring_size == ring
    with pytest.raises(ConfigError):
        from_args(["--max-body", str(max_body), "--ring-size", str(ring - 1)], {})


def test_config_is_frozen():
    config = from_args([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ring_size = 1  # type: ignore[misc]


# -- access control ------------------------------------------------------------------


def test_access_control_is_off_by_default():
    config = from_args([], {})
    assert not config.access_control and config.redis == ""
    assert (config.on_redis_failure, config.redis_timeout, config.key_cache_ttl) == ("closed", 0.25, 5.0)


def test_access_settings_from_flags_and_environment():
    config = from_args(["--redis", "redis://:pw@10.0.0.5:6380/2", "--redis-cluster",
                        "--on-redis-failure", "open", "--redis-timeout", "100ms",
                        "--key-cache-ttl", "2s", "--stale-key-ttl", "10m", "--instance-count", "4"], {})
    assert config.access_control and config.redis_cluster
    assert (config.on_redis_failure, config.redis_timeout, config.key_cache_ttl,
            config.stale_key_ttl, config.instance_count) == ("open", 0.1, 2.0, 600.0, 4)
    assert "pw" not in repr(config)
    config = from_args([], {"SLUICE_REDIS_URL": "rediss+cluster://127.0.0.1:7000",
                            "SLUICE_REDIS_CLUSTER": "false", "SLUICE_INSTANCE_COUNT": "2"})
    assert config.redis == "rediss+cluster://127.0.0.1:7000"
    assert not config.redis_cluster and config.instance_count == 2


@pytest.mark.parametrize("name", ACCESS_SETTINGS)
def test_access_settings_without_redis_are_refused(name):
    setting = {s.name: s for s in SETTINGS}[name]
    value = "true" if setting.switch else setting.default
    with pytest.raises(ConfigError) as info:
        from_args([], {setting.env: value})
    assert str(info.value).startswith(setting.env + ": needs --redis")


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_parse_switch(text, expected):
    assert parse_switch(text) is expected


@pytest.mark.parametrize("text", [
    "redis://127.0.0.1:6379/0", "rediss://user:pw@redis.internal:6380/1",
    "redis+cluster://127.0.0.1:7000", "unix:///run/redis.sock?db=1", "",
])
def test_parse_redis_url(text):
    assert parse_redis_url(text) == text


@pytest.mark.parametrize("text", [
    "http://127.0.0.1", "127.0.0.1:6379", "redis://:secret@host:port/0",
    "redis://h/0?socket_timeout=soon", "rediss://h/0?ssl_ca_certs=/no/such/file.pem",
])
def test_parse_redis_url_refuses_without_repeating_the_url(text):
    with pytest.raises(ValueError) as info:
        parse_redis_url(text)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:4566", "http://localhost:4566",
                                 "http://[::1]:4566", "http://127.8.9.10/", "https://kinesis.example",
                                 "HTTPS://kinesis.example"])
def test_endpoint_url_https_or_loopback(url):
    flags = ["--sink", "kinesis", "--stream", "s", "--endpoint-url", url]
    assert from_args(flags, {}).endpoint_url == url


@pytest.mark.parametrize("url", ["http://kinesis.example", "http://10.0.0.5:4566",
                                 "HTTP://192.0.2.1", "http://127.0.0.1.example"])
def test_a_plain_http_endpoint_elsewhere_needs_allow_insecure_endpoint(url):
    flags = ["--sink", "kinesis", "--stream", "s", "--endpoint-url", url]
    with pytest.raises(ConfigError, match="--endpoint-url.*--allow-insecure-endpoint"):
        from_args(flags, {})
    assert from_args(flags + ["--allow-insecure-endpoint"], {}).allow_insecure_endpoint
    assert from_args(flags, {"SLUICE_ALLOW_INSECURE_ENDPOINT": "true"}).endpoint_url == url
