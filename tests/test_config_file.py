"""Settings files: TOML keys as setting names, precedence, refusals, and ``sluice config check``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Mapping, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.config.settings as config_module
from gateway.config.settings import (
    ACCESS_SETTINGS,
    CONFIG_FILE_ENV,
    SETTINGS,
    ConfigError,
    KiB,
    MiB,
    from_args,
    load_with_origins,
)
from gateway.config.settings_file import MAX_FILE_BYTES, read_settings_file
from gateway.config.view import masked, render_check, rows
from tests.support import gateway as _support
from tests.support.gateway import http_post

start_gateway = _support.start_gateway

#: A child that should have refused or finished at once is killed here.
RUN_TIMEOUT = 60.0


def write(tmp_path, text: str, name: str = "sluice.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refusal(flags, environ: Optional[Mapping[str, str]] = None) -> str:
    with pytest.raises(ConfigError) as caught:
        from_args(flags, environ or {})
    return str(caught.value)


# -- values ----------------------------------------------------------------------


def test_file_values_go_through_the_flag_parsers(tmp_path):
    as_text = from_args(["--config", write(tmp_path, 'ring_size = "256MiB"\nmax_body = "2MiB"\n')], {})
    as_int = from_args(["--config", write(tmp_path, "ring_size = 268435456\nmax_body = 2097152\n",
                                          "ints.toml")], {})
    assert as_text == as_int
    assert (as_text.ring_size, as_text.max_body) == (256 * MiB, 2 * MiB)


def test_every_kind_of_value(tmp_path):
    path = write(tmp_path, "\n".join([
        'listen = "[::1]:9000"',
        'sink = "null"',
        "max_connections = 10",
        "head_timeout = 2.5",           # a float: seconds
        'idle_timeout = "2m"',
        'redis = "redis://127.0.0.1:6379/0"',
        "redis_cluster = true",         # a switch takes a boolean
        'on_redis_failure = "open"',    # access-control settings load from the file too
        "instance_count = 3",
        'access_log_sample = 0.25',
        'log_format = "text"',
    ]) + "\n")
    config = from_args(["--config", path], {})
    assert config.listen == ("::1", 9000) and config.sink == "null"
    assert (config.max_connections, config.head_timeout, config.idle_timeout) == (10, 2.5, 120.0)
    assert config.redis_cluster is True and config.on_redis_failure == "open"
    assert config.instance_count == 3 and config.access_log_sample == 0.25
    assert config.log_format == "text"


def test_every_setting_is_a_file_key(tmp_path):
    text = "".join("%s = %s\n" % (s.name, json.dumps(s.default)) for s in SETTINGS)
    read = read_settings_file(write(tmp_path, text), [s.name for s in SETTINGS])
    assert read.values == {s.name: s.default for s in SETTINGS}
    # Settings that need no other, written with their defaults, give the defaults back.
    needing = set(ACCESS_SETTINGS) | set(getattr(config_module, "SPOOL_SETTINGS", ()))
    text = "".join("%s = %s\n" % (s.name, json.dumps(s.default)) for s in SETTINGS
                   if s.name not in needing)
    config, origins = load_with_origins({"config": write(tmp_path, text, "alone.toml")}, {})
    assert config == from_args([], {})
    assert {o.source for name, o in origins.items() if name not in needing} == {"file"}


# -- precedence --------------------------------------------------------------------

LAYERS = ("flag", "env", "file")
SIZES = {"flag": 2 * KiB, "env": 3 * KiB, "file": 4 * KiB}


@settings(max_examples=30, deadline=None)
@given(layers=st.sets(st.sampled_from(LAYERS)))
def test_flags_win_over_env_over_file_over_defaults(tmp_path_factory, layers):
    tmp_path = tmp_path_factory.mktemp("layers")
    path = write(tmp_path, "max_body = %d\n" % SIZES["file"] if "file" in layers else "")
    flags = {"config": path, "max_body": str(SIZES["flag"]) if "flag" in layers else None}
    environ = {"SLUICE_MAX_BODY": str(SIZES["env"])} if "env" in layers else {}
    config, origins = load_with_origins(flags, environ)
    winner = next((layer for layer in LAYERS if layer in layers), "default")
    assert config.max_body == SIZES.get(winner, MiB)
    origin = origins["max_body"]
    assert origin.source == winner
    assert origin.where == {"flag": "--max-body", "env": "SLUICE_MAX_BODY", "file": path + ": max_body",
                            "default": "--max-body"}[winner]


def test_config_flag_wins_over_the_variable(tmp_path):
    chosen = write(tmp_path, "max_body = 5000\n", "chosen.toml")
    other = write(tmp_path, "max_body = 6000\n", "other.toml")
    assert from_args(["--config", chosen], {CONFIG_FILE_ENV: other}).max_body == 5000
    assert from_args([], {CONFIG_FILE_ENV: other}).max_body == 6000


# -- refusals -----------------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, 'sink = "null"\nring_sise = "64MiB"\n')
    assert refusal(["--config", path]) == (
        "%s: unknown setting 'ring_sise' (see sluice serve --help for the settings)" % path)


def test_flag_spelling_is_refused_with_the_key_to_use(tmp_path):
    path = write(tmp_path, 'ring-size = "64MiB"\n')
    assert refusal(["--config", path]) == (
        "%s: unknown setting 'ring-size' (keys are snake_case: ring_size)" % path)


@pytest.mark.parametrize("text, kind", [
    ("max_body = [1, 2]\n", "array"),
    ("[max_body]\nvalue = 1\n", "table"),
    ("max_body = 1979-05-27\n", "date or time"),
])
def test_values_of_other_types_are_refused(tmp_path, text, kind):
    path = write(tmp_path, text)
    assert refusal(["--config", path]) == (
        "%s: max_body: must be a string, number or boolean, not a %s" % (path, kind))


@pytest.mark.parametrize("text, message", [
    ('max_body = "lots"\n', "max_body: not a size: 'lots'"),
    ('max_connections = 0\n', "max_connections: must be at least 1, got '0'"),
    ('sink = "s3"\n', "sink: must be one of file, null, kinesis, firehose, not 's3'"),
    ('redis_cluster = "maybe"\n', "redis_cluster: must be true or false, not 'maybe'"),
    ('ring_size = true\n', "ring_size: not a size: 'true'"),
])
def test_bad_values_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    assert refusal(["--config", path]).startswith("%s: %s" % (path, message))


def test_access_settings_from_the_file_need_redis(tmp_path):
    for name in ACCESS_SETTINGS:
        setting = next(s for s in SETTINGS if s.name == name)
        path = write(tmp_path, "%s = %s\n" % (name, json.dumps(setting.default)), name + ".toml")
        assert refusal(["--config", path]).startswith("%s: %s: needs --redis" % (path, name))


def test_not_toml(tmp_path):
    path = write(tmp_path, "max_body = \n")
    assert refusal(["--config", path]).startswith("%s: not valid TOML: " % path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    assert refusal(["--config", str(binary)]).startswith("%s: not UTF-8 text" % binary)


def test_missing_file_names_what_named_it(tmp_path):
    path = str(tmp_path / "absent.toml")
    assert refusal(["--config", path]) == "--config: cannot read %s: No such file or directory" % path
    assert refusal([], {CONFIG_FILE_ENV: path}) == (
        "%s: cannot read %s: No such file or directory" % (CONFIG_FILE_ENV, path))


def test_oversized_file(tmp_path):
    path = write(tmp_path, "#" * (MAX_FILE_BYTES + 1))
    assert refusal(["--config", path]).startswith("--config: %s is over" % path)


# -- what config check shows ------------------------------------------------------------


@pytest.mark.parametrize("name, text, shown", [
    ("redis", "redis://:s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis", "rediss://user:s3cret@host:6380/0?ssl_ca_certs=/ca.pem", "rediss://***@host:6380/0"
                                                                          "?ssl_ca_certs=/ca.pem"),
    ("redis", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("endpoint_url", "https://key:s3cret@kinesis.local", "https://***@kinesis.local"),
    ("aws_secret_access_key", "s3cret", "***"),
    ("ring_size", "32MiB", "32MiB"),
    ("redis", "", ""),
])
def test_secrets_are_masked(name, text, shown):
    assert masked(name, text) == shown


def test_rows_say_where_each_value_came_from(tmp_path):
    path = write(tmp_path, 'ring_size = "64MiB"\nredis = "redis://:pw@127.0.0.1:1/0"\n')
    _, origins = load_with_origins({"config": path, "sink": "null"}, {"SLUICE_MAX_BODY": "2KiB"})
    table = {row.name: row for row in rows(origins)}
    assert list(table) == [s.name for s in SETTINGS]
    assert table["sink"][1:] == ("null", "flag", "--sink")
    assert table["max_body"][1:] == ("2KiB", "env", "SLUICE_MAX_BODY")
    assert table["ring_size"][1:] == ("64MiB", "file", path + ": ring_size")
    assert table["redis"].value == "redis://***@127.0.0.1:1/0"
    assert table["listen"][1:] == ("127.0.0.1:8080", "default", "--listen")
    text = render_check(rows(origins))
    assert 'ring_size = "64MiB"  # file %s\n' % path in text
    assert 'max_body = "2KiB"  # env SLUICE_MAX_BODY\n' in text
    assert 'listen = "127.0.0.1:8080"  # default\n' in text
    assert "pw" not in text.replace("password", "")


# -- the command -----------------------------------------------------------------------


def sluice(*args: str, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          timeout=RUN_TIMEOUT, env=environ, check=False)


def test_config_check_prints_every_setting_and_exits_0(tmp_path):
    path = write(tmp_path, 'ring_size = "64MiB"\nredis = "redis://:hunter2@127.0.0.1:1/0"\n')
    result = sluice("config", "check", "--sink", "null", env={CONFIG_FILE_ENV: path,
                                                               "SLUICE_MAX_BODY": "2KiB"})
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    lines = result.stdout.decode().splitlines()
    assert [line.split(" = ")[0] for line in lines] == [s.name for s in SETTINGS]
    assert 'sink = "null"  # flag --sink' in lines
    assert 'max_body = "2KiB"  # env SLUICE_MAX_BODY' in lines
    assert 'ring_size = "64MiB"  # file %s' % path in lines
    assert 'redis = "redis://***@127.0.0.1:1/0"  # file %s' % path in lines
    assert b"hunter2" not in result.stdout


@pytest.mark.parametrize("text, error", [
    ("colour = 1\n", "unknown setting 'colour'"),
    ('max_body = "2MiB"\nring_size = "2MiB"\n', "--ring-size: must hold at least two"),
])
def test_config_check_exits_2_with_the_error(tmp_path, text, error):
    path = write(tmp_path, text)
    result = sluice("config", "check", "--config", path)
    stderr = result.stderr.decode()
    assert (result.returncode, result.stdout) == (2, b""), stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("sluice: error: "), stderr
    assert error in stderr


def test_serve_reads_the_file(start_gateway, tmp_path):
    path = write(tmp_path, 'max_body = "1KiB"\nsink = "null"\nmax_connections = 7\n')
    gateway = start_gateway("--config", path, "--max-connections", "8")
    started = gateway.started
    assert started["sink"] == "null"
    assert started["config"]["max_body"] == "1KiB" and started["config"]["max_connections"] == "8"
    assert http_post(gateway.address, b"x" * 1024)[0] == 202
    assert http_post(gateway.address, b"x" * 1025)[0] == 413
