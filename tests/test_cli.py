"""The ``sluice`` command as an operator runs it: ``python -m gateway ...`` in a child process.

Bad settings must stop the process at start with one line that names the
flag (or the SLUICE_* variable) to fix; ``sluice read`` must say plainly what
is wrong with a directory.  Children run on the interpreter running the tests.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import zlib
from typing import Mapping, Optional

import pytest

from gateway import __version__
from gateway.config.settings import SETTINGS
from sinks.envelope import envelope
from sinks.file import FRAME_HEADER, SEGMENT_MAGIC
from tests.support import gateway as _support
from tests.support.gateway import GatewayProcess, http_post, stored

# The fixture, bound here so tests can ask for it by name.
start_gateway = _support.start_gateway

#: A child that should have failed at start but serves instead is killed here.
RUN_TIMEOUT = 60.0


def sluice(*args: str, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``python -m gateway ARGS`` to completion, without the caller's SLUICE_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          timeout=RUN_TIMEOUT, env=environ, check=False)


def _one_line_error(result: subprocess.CompletedProcess, prefix: str = "sluice: error: ") -> str:
    """The single line of a refused start (exit status non-zero, no traceback)."""
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0, stderr
    assert result.stdout == b""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


def _post(gateway: GatewayProcess, body: bytes):
    status, _, answer = http_post(gateway.address, body, {"Content-Type": "text/plain"})
    return status, answer


# -- version -------------------------------------------------------------------


def test_version_prints_the_version_and_the_interpreter():
    result = sluice("--version")
    assert result.returncode == 0 and result.stderr == b""
    line = result.stdout.decode()
    assert line.startswith("sluice %s (" % __version__) and line.endswith(")\n"), line
    assert platform.python_implementation() in line and platform.python_version() in line


# -- help ----------------------------------------------------------------------


def test_help():
    result = sluice("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("usage: sluice") and "serve" in text and "read" in text

    result = sluice("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    for setting in SETTINGS:
        assert setting.flag in text and setting.env in text, setting.name

    result = sluice("read", "--help")
    assert result.returncode == 0 and b"--body" in result.stdout


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "sluice")
    if not os.path.exists(script):
        pytest.skip("no sluice script beside %s" % sys.executable)
    result = subprocess.run([script, "--help"], capture_output=True, timeout=RUN_TIMEOUT, check=False)
    assert result.returncode == 0 and result.stdout.startswith(b"usage: sluice")


# -- bad settings ------------------------------------------------------------------

BAD_VALUES = [
    ("--listen", "localhost"),
    ("--listen", "127.0.0.1:65536"),
    ("--listen", "127.0.0.1:http"),
    ("--sink", "s3"),
    ("--ring-size", "lots"),
    ("--ring-size", "1KiB"),
    ("--ring-size", "64KiB"),  # below two of the largest records at the default --max-body
    ("--max-body", "-1"),
    ("--max-body", "1.5MiB"),
    ("--max-head", "512"),
    ("--head-timeout", "0"),
    ("--body-timeout", "forever"),
    ("--idle-timeout", "10 minutes"),
    ("--max-connections", "0"),
    ("--max-connections", "1.5"),
    ("--ring-wait", "-1s"),
    ("--shutdown-timeout", "soon"),
    ("--segment-size", "1k"),
    ("--flush-interval", "0"),
]


def _env_name(flag: str) -> str:
    return "SLUICE_" + flag[2:].upper().replace("-", "_")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every start with a bad setting, by ``(source, flag, value)``: ``(result, data dir)``.

    Each is an interpreter start (two on PyPy, which restarts itself with a
    smaller nursery), so they run side by side.  A start that serves instead
    of refusing is killed after RUN_TIMEOUT and its result is the timeout.
    """
    base = tmp_path_factory.mktemp("refusals")
    jobs = {}
    for n, (flag, value) in enumerate(BAD_VALUES):
        data_dir = str(base / ("flag-%d" % n))
        jobs[("flag", flag, value)] = (data_dir, ["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
                                                  "%s=%s" % (flag, value)], None)
        data_dir = str(base / ("env-%d" % n))
        args = ["serve", "--data-dir", data_dir] + ([] if flag == "--listen" else ["--listen", "127.0.0.1:0"])
        jobs[("env", flag, value)] = (data_dir, args, {_env_name(flag): value})

    def run(data_dir, args, env):
        try:
            return sluice(*args, env=env), data_dir
        except subprocess.TimeoutExpired as exc:
            return exc, data_dir

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(run, *job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _refusal(refusals, key) -> subprocess.CompletedProcess:
    result, data_dir = refusals[key]
    assert not isinstance(result, subprocess.TimeoutExpired), "started instead of refusing: %s" % (
        result.stderr or b"").decode()
    assert not os.path.exists(data_dir)
    return result


@pytest.mark.parametrize("flag, value", BAD_VALUES, ids=["%s=%s" % pair for pair in BAD_VALUES])
def test_bad_flag_value_refused_at_start(refusals, flag, value):
    line = _one_line_error(_refusal(refusals, ("flag", flag, value)))
    assert line.startswith("sluice: error: %s: " % flag), line


@pytest.mark.parametrize("flag, value", BAD_VALUES, ids=["%s=%s" % pair for pair in BAD_VALUES])
def test_bad_environment_value_refused_at_start(refusals, flag, value):
    line = _one_line_error(_refusal(refusals, ("env", flag, value)))
    # The line names what to fix: the variable, or for a bound that depends
    # on another setting (--ring-size against --max-body), the flag it twins.
    assert line.startswith("sluice: error: %s: " % _env_name(flag)) or line.startswith(
        "sluice: error: %s: " % flag), line


def test_flags_win_over_environment(start_gateway):
    gateway = start_gateway("--max-body", "2KiB", env={"SLUICE_MAX_BODY": "not a size"})
    assert _post(gateway, b"x" * 2048)[0] == 202
    assert _post(gateway, b"x" * 2049)[0] == 413


def test_environment_twins_apply(start_gateway):
    gateway = start_gateway(env={"SLUICE_MAX_BODY": "1KiB", "SLUICE_SINK": "null"})
    assert gateway.started["sink"] == "null"
    assert _post(gateway, b"y" * 1024)[0] == 202
    status, body = _post(gateway, b"y" * 1025)
    assert status == 413 and json.loads(body)["error"] == "payload_too_large"


def test_unknown_flag_refused(tmp_path):
    result = sluice("serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path), "--no-such-flag", "1")
    assert result.returncode != 0
    assert b"--no-such-flag" in result.stderr and b"Traceback" not in result.stderr


def test_listen_on_a_port_in_use(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = sluice("serve", "--listen", "127.0.0.1:%d" % port, "--data-dir", str(tmp_path / "data"))
    line = _one_line_error(result)
    assert line.startswith("sluice: error: --listen 127.0.0.1:%d: " % port), line
    assert "in use" in line


def test_listen_on_an_unknown_host(tmp_path):
    line = _one_line_error(sluice("serve", "--listen", "no-such-host.invalid:0", "--data-dir", str(tmp_path)))
    assert line.startswith("sluice: error: --listen no-such-host.invalid:0: "), line


# -- sinks -------------------------------------------------------------------------


def test_null_sink_accepts_and_stores_nothing(start_gateway, tmp_path):
    data_dir = str(tmp_path / "never-written")
    gateway = start_gateway("--sink", "null", data_dir=data_dir)
    assert gateway.started["sink"] == "null"
    for size in (0, 1, 64 * 1024):
        status, body = _post(gateway, b"z" * size)
        assert status == 202 and len(json.loads(body)["id"]) == 26
    assert gateway.stop() == 0, gateway.stderr
    assert not os.path.exists(data_dir) or os.listdir(data_dir) == []
    result = sluice("read", data_dir) if os.path.exists(data_dir) else None
    assert result is None or result.stdout == b""


def test_file_sink_names_its_directory(start_gateway, tmp_path):
    data_dir = str(tmp_path / "segments")
    gateway = start_gateway(data_dir=data_dir)
    assert gateway.started["sink"] == "file (%s)" % os.path.abspath(data_dir)


# -- sluice read --------------------------------------------------------------------


def _segment(*records: bytes, bad_crc_at: int = -1, cut_last: int = 0) -> bytes:
    out = SEGMENT_MAGIC
    for n, record in enumerate(records):
        crc = zlib.crc32(record) ^ (1 if n == bad_crc_at else 0)
        out += FRAME_HEADER.pack(len(record), crc) + record
    return out[:len(out) - cut_last]


def _record(record_id: str, body: bytes) -> bytes:
    return envelope(record_id, None, 1732600000000, b"text/plain", None) + body


def test_read_empty_directory(tmp_path):
    for args in (("read", str(tmp_path)), ("read", "--body", str(tmp_path))):
        result = sluice(*args)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.parametrize("what", ["missing", "file"])
def test_read_not_a_directory(tmp_path, what):
    path = tmp_path / "nothing-here"
    if what == "file":
        path.write_bytes(b"")
    line = _one_line_error(sluice("read", str(path)), prefix="sluice read: ")
    assert str(path) in line


def test_read_segments(tmp_path):
    first = _record("01JDQ2AAAAAAAAAAAAAAAAAAAA", b"line one\nline two\n")
    second = _record("01JDQ2BBBBBBBBBBBBBBBBBBBB", b"")
    third = _record("01JDQ2CCCCCCCCCCCCCCCCCCCC", b"\x00\xff binary!")
    (tmp_path / "0000000000000000.seg").write_bytes(_segment(first, second))
    # The newest segment ends in a frame cut short, as a crash mid-write leaves it.
    (tmp_path / "0000000000000001.seg").write_bytes(_segment(third, first, cut_last=3))
    (tmp_path / "notes.txt").write_text("not a segment")

    result = sluice("read", "--body", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == first + b"\n" + second + b"\n" + third + b"\n"

    result = sluice("read", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(m["id"], m["body_bytes"], m["content_type"]) for m in lines] == [
        ("01JDQ2AAAAAAAAAAAAAAAAAAAA", 18, "text/plain"),
        ("01JDQ2BBBBBBBBBBBBBBBBBBBB", 0, "text/plain"),
        ("01JDQ2CCCCCCCCCCCCCCCCCCCC", 10, "text/plain"),
    ]
    assert list(stored(str(tmp_path))) == [m["id"] for m in lines]


@pytest.mark.parametrize("damage", ["crc", "magic"])
def test_read_reports_a_damaged_segment(tmp_path, damage):
    record = _record("01JDQ2AAAAAAAAAAAAAAAAAAAA", b"body")
    segment = tmp_path / "0000000000000000.seg"
    if damage == "crc":
        segment.write_bytes(_segment(record, record, bad_crc_at=1))
    else:
        segment.write_bytes(b"NOTASEGMENT" + _segment(record)[len(SEGMENT_MAGIC):])
    result = sluice("read", str(tmp_path))
    stderr = result.stderr.decode()
    assert result.returncode != 0 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("sluice read: %s: " % segment), stderr
    assert ("CRC mismatch" if damage == "crc" else "not a sluice segment") in stderr


def test_read_skips_crafted_records_and_segments_one_by_one(tmp_path):
    """Damage costs only what is damaged: no traceback, every good record shown, status 1."""
    good = [_record("01JDQ2%sAAAAAAAAAAAAAAAAAAA" % c, b"ok") for c in "ABC"]
    crafted = [b"not json at all\nbody", b"[1, 2]\nbody", b"no newline anywhere"]
    first = _segment(good[0], crafted[0], good[0], bad_crc_at=2) + _segment(crafted[1])[len(SEGMENT_MAGIC):]
    # A frame that claims 4 GB: never allocated, the segment just ends there.
    first += FRAME_HEADER.pack(0xFFFFFFFF, 0) + b"x" * 64
    (tmp_path / "0000000000000000.seg").write_bytes(first)
    (tmp_path / "0000000000000001.seg").write_bytes(b"GARBAGE" * 10)
    (tmp_path / "0000000000000002.seg").write_bytes(_segment(good[1], crafted[2], good[2]))
    result = sluice("read", str(tmp_path))
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    ids = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    assert ids == [_record_id(good[0]), _record_id(good[1]), _record_id(good[2])]
    problems = stderr.splitlines()
    assert len(problems) == 5, stderr  # 3 envelopes, a CRC, a file that is no segment
    assert sum("(skipped)" in line for line in problems) == 5
    result = sluice("read", "--body", str(tmp_path))
    assert result.returncode == 1 and b"Traceback" not in result.stderr


def _record_id(record: bytes) -> str:
    return json.loads(record.partition(b"\n")[0])["id"]


@pytest.mark.skipif(platform.python_implementation() != "PyPy",
                    reason="only PyPy's sluice serve restarts with GC settings")
def test_pypy_gateway_runs_with_every_gc_setting(tmp_path):
    from gateway.cli.main import PYPY_GC_SETTINGS

    proc = GatewayProcess((), data_dir=str(tmp_path / "data"))
    for name in list(proc.env):
        if name.startswith("PYPY_GC_"):
            del proc.env[name]
    proc.start()
    try:
        # After the restart (an exec: same process), its environment is the new one.
        with open("/proc/%d/environ" % proc.pid, "rb") as f:
            environ = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)
    finally:
        proc.stop()
    assert {k: v for k, v in environ.items() if k.startswith("PYPY_GC_")} == PYPY_GC_SETTINGS


def test_pypy_restart_moves_a_redis_password_out_of_the_command_line():
    from gateway.cli.main import argv_without_secrets
    from gateway.cli.serve import SECRET_FLAG_MARK

    url = "redis://:hunter2@127.0.0.1:6379/0"
    argv, env = argv_without_secrets(["serve", "--redis", url, "--listen", "127.0.0.1:0"])
    assert argv == ["serve", "--listen", "127.0.0.1:0"]
    assert env == {"SLUICE_REDIS_URL": url, SECRET_FLAG_MARK: "--redis"}
    argv, env = argv_without_secrets(["serve", "--redis=" + url])
    assert argv == ["serve"] and env["SLUICE_REDIS_URL"] == url
    plain = ["serve", "--redis", "redis://127.0.0.1:6379/0", "--redis-cluster"]
    assert argv_without_secrets(plain) == (plain, {})


def test_after_the_pypy_restart_the_url_is_a_flag_again_inside_the_process():
    from gateway.cli.main import _parser, _restore_secret_flag, argv_without_secrets
    from gateway.config import settings

    url = "redis://:hunter2@127.0.0.1:6379/0"
    argv, environ = argv_without_secrets(["serve", "--redis", url])
    args = _parser().parse_args(argv)
    _restore_secret_flag(args, environ)
    assert environ == {}
    config, origins = settings.load_with_origins(vars(args), environ)
    assert config.redis == url and origins["redis"].source == "flag"


def test_start_warns_of_a_password_on_the_command_line_and_of_root():
    import io

    from gateway.cli.serve import SECRET_FLAG_MARK, start_warnings
    from gateway.config import settings
    from gateway.observe import logs

    url = "redis://:hunter2@127.0.0.1:6379/0"
    stream = io.StringIO()
    logs.configure(stream=stream)
    try:
        config, origins = settings.load_with_origins({"redis": url}, {})
        start_warnings(config, origins, {}, euid=1000)
        config, origins = settings.load_with_origins({}, {"SLUICE_REDIS_URL": url})
        start_warnings(config, origins, {}, euid=1000)  # from the environment: fine
        environ = {SECRET_FLAG_MARK: "--redis"}  # moved there by the PyPy restart
        start_warnings(config, origins, environ, euid=0)
        assert environ == {}
    finally:
        logs.configure()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["secret_on_command_line", "secret_on_command_line", "running_as_root"]
    assert "hunter2" not in stream.getvalue()
