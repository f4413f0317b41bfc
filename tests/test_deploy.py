"""The deployment files (``deploy/``) and the operations guide (``docs/operations.md``) against the code.

None of these files runs here (no systemd, no image build), so the tests
check what can go stale: the commands they run are real ``sluice`` commands
whose settings load (``sluice config check`` in a real child process), the
files a recipe copies exist, the limits they set fit the settings they run
with, every ``SLUICE_*`` variable and every flag the guide names exists, the
IAM actions are those the sinks call, and the guide's shard arithmetic follows
``sinks/aws/limits.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Tuple

import pytest

from gateway.cli.main import PYPY_GC_SETTINGS
from gateway.config import settings as _config
from gateway.server import MAX_REFUSING
from sinks.aws.limits import SHARD_WRITE_BYTES_PER_SECOND, SHARD_WRITE_RECORDS_PER_SECOND

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
GUIDE = os.path.join(ROOT, "docs", "operations.md")
#: Where deploy/sluice.toml and deploy/sluice.env are installed (the guide's steps).
INSTALLED = {"/etc/sluice/sluice.toml": os.path.join(DEPLOY, "sluice.toml"),
             "/etc/sluice/sluice.env": os.path.join(DEPLOY, "sluice.env")}
#: Descriptors a gateway process uses besides client connections: the
#: listener, the event loop, segment or spool files, AWS and Redis
#: connections, the worker pipes; generous, since running out refuses clients.
FD_HEADROOM = 256
#: Seconds a `sluice config check` child may take (a cold PyPy start is about one).
CHECK_TIMEOUT = 60
#: Flags of other programs that the guide's commands use (curl, docker,
#: systemd-run, systemctl, useradd).  Everything else must be a sluice flag.
OTHER_FLAGS = {
    "--header", "--fail-with-body", "--silent", "--show-error", "--retry", "--retry-connrefused",
    "--retry-max-time", "--data-binary", "--insecure",  # curl
    "--stop-timeout", "--rm",  # docker run
    "--pipe", "--wait", "--quiet", "--uid", "--gid",  # systemd-run
    "--now",  # systemctl enable
    "--system", "--user-group", "--home-dir", "--shell",  # useradd
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_ENV_NAME = re.compile(r"\bSLUICE_[A-Z0-9_]+\b")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# -- parsing the files ------------------------------------------------------------


def _unit(path: str) -> Dict[str, Dict[str, List[str]]]:
    """A systemd unit: section -> key -> values (a key may repeat)."""
    sections: Dict[str, Dict[str, List[str]]] = {}
    current: Dict[str, List[str]] = {}
    for raw in _read(path).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, "not KEY=VALUE: %r" % raw
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _env_file(path: str) -> Dict[str, str]:
    """An EnvironmentFile: VARIABLE=value lines; comments and blank lines skipped."""
    values = {}
    for raw in _read(path).splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, "not VARIABLE=value: %r" % raw
            values[name.strip()] = value.strip()
    return values


def _instructions(path: str) -> List[Tuple[str, str]]:
    """A Containerfile: (INSTRUCTION, arguments), continuation lines joined."""
    found: List[Tuple[str, str]] = []
    pending = ""
    for raw in _read(path).splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        found.append((word.upper(), rest.strip()))
    return found


def _duration(text: str) -> float:
    match = re.match(r"^(\d+)(s|min)?$", text)
    assert match, "not a systemd time span used here: %r" % text
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def _setting_envs() -> set:
    return {s.env for s in _config.SETTINGS} | {_config.CONFIG_FILE_ENV}


# -- running the configuration the way the service does -----------------------------


def _installed_here(argv: List[str]) -> List[str]:
    """``argv`` with installed paths of the example files replaced by the repository's."""
    return [INSTALLED.get(arg, arg) for arg in argv]


def _load(argv: List[str], environ: Mapping[str, str]) -> _config.Config:
    """What `sluice serve ARGV` loads in ``environ``, parsed as the CLI parses."""
    parser = argparse.ArgumentParser(prog="sluice serve")
    _config.add_arguments(parser)
    return _config.load(vars(parser.parse_args(argv)), environ)


def _config_check(argv: List[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`sluice config check ARGV` in a child, with only ``environ``'s SLUICE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(environ)
    return subprocess.run([sys.executable, "-m", "gateway", "config", "check", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)


# -- systemd ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> Dict[str, Dict[str, List[str]]]:
    return _unit(os.path.join(DEPLOY, "sluice.service"))


@pytest.fixture(scope="module")
def service(unit) -> Dict[str, str]:
    """The [Service] section, one value per key (repeated keys are not used there)."""
    section = unit["Service"]
    for key, values in section.items():
        assert len(values) == 1, "%s given %d times" % (key, len(values))
    return {key: values[0] for key, values in section.items()}


def _unit_command(service) -> Tuple[List[str], Dict[str, str]]:
    argv = shlex.split(service["ExecStart"])
    env_file = service["EnvironmentFile"].lstrip("-")
    assert env_file in INSTALLED, env_file
    return argv, _env_file(INSTALLED[env_file])


def test_unit_runs_sluice_serve_with_settings_that_load(service):
    argv, environ = _unit_command(service)
    assert argv[:2] == ["/opt/sluice/bin/sluice", "serve"]
    done = _config_check(_installed_here(argv[2:]), environ)
    assert done.returncode == 0, done.stderr
    # Each setting's origin is shown: the file, the environment file, or the default.
    assert re.search(r'^sink = "kinesis"  # file .*sluice\.toml$', done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^redis = .*# env SLUICE_REDIS_URL$", done.stdout, re.MULTILINE), done.stdout
    assert "change-me" not in done.stdout  # the password is masked


def test_unit_limits_fit_its_settings(service):
    argv, environ = _unit_command(service)
    config = _load(_installed_here(argv[2:]), environ)
    # SIGKILL only after a graceful stop had its time: drain plus a Kinesis call in progress.
    assert _duration(service["TimeoutStopSec"]) > config.shutdown_timeout + config.call_timeout
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the supervisor signals its workers itself
    assert int(service["LimitNOFILE"]) >= config.max_connections + MAX_REFUSING + FD_HEADROOM
    writable = service["ReadWritePaths"].split()
    state = "/var/lib/" + service["StateDirectory"]
    for path in [config.data_dir, config.spool_dir]:
        if path:
            assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable + [state]), path
    if config.metrics_dir:
        assert config.metrics_dir.startswith("/run/%s/" % service["RuntimeDirectory"])
    assert service["WorkingDirectory"] in writable + [state]


def test_unit_is_unprivileged_and_lets_the_jit_run(service):
    assert service["User"] not in ("", "root", "0")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    # PyPy's JIT maps memory writable, then executable.
    assert "MemoryDenyWriteExecute" not in service
    # Every PyPy GC setting sluice serve would make: with PYPY_GC_NURSERY set it
    # makes none, so one missing here would run with PyPy's own.
    assert dict(item.split("=", 1) for item in shlex.split(service["Environment"])) == PYPY_GC_SETTINGS
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # sluice's exit status for a refused configuration


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # The binary must exist for verify to pass: check a copy that runs /bin/true.
    text = _read(os.path.join(DEPLOY, "sluice.service")).replace("/opt/sluice/bin/sluice", "/bin/true")
    copy = tmp_path / "sluice.service"
    copy.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=CHECK_TIMEOUT, check=False)
    # Unknown keys and bad values are only warned about, with exit status 0.
    assert done.returncode == 0 and done.stderr == "", done.stderr


# -- container ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe() -> List[Tuple[str, str]]:
    return _instructions(os.path.join(DEPLOY, "Containerfile"))


def _only(recipe, instruction: str) -> str:
    (args,) = [a for i, a in recipe if i == instruction]
    return args


def _container_env(recipe) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for instruction, args in recipe:
        if instruction == "ENV":
            for word in shlex.split(args):
                name, sep, value = word.partition("=")
                assert sep, "ENV without '=': %r" % word
                env[name] = value
    return env


def test_container_copies_what_the_project_needs(recipe):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    copied = set()
    for instruction, args in recipe:
        if instruction in ("COPY", "ADD"):
            assert instruction == "COPY"
            words = shlex.split(args)
            for source in words[:-1]:
                assert not source.startswith("--"), "no --from or --chown stages here"
                assert os.path.exists(os.path.join(ROOT, source)), "%s does not exist" % source
                copied.add(source.rstrip("/"))
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    needed = packages | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, needed - copied


def test_container_base_user_and_signals(recipe):
    assert _only(recipe, "FROM").startswith("debian:bookworm")
    installs = " ".join(a for i, a in recipe if i == "RUN" and "apt-get install" in a).split()
    assert {"pypy3", "pypy3-venv", "ca-certificates"} <= set(installs)
    assert _only(recipe, "USER") not in ("root", "0")
    assert _only(recipe, "STOPSIGNAL") == "SIGTERM"
    venv = re.search(r"pypy3 -m venv (\S+)", " ".join(a for i, a in recipe if i == "RUN"))
    assert venv is not None
    entry = json.loads(_only(recipe, "ENTRYPOINT"))
    assert entry == [venv.group(1) + "/bin/sluice"]


def test_container_command_and_environment_load(recipe):
    env = _container_env(recipe)
    assert set(n for n in env if n.startswith("SLUICE_")) <= _setting_envs()
    command = json.loads(_only(recipe, "CMD"))
    assert command[0] == "serve"
    settings = {k: v for k, v in env.items() if k.startswith("SLUICE_")}
    config = _load(command[1:], settings)
    assert config.listen[0] == "0.0.0.0"
    assert config.workers == 1
    assert config.data_dir.startswith(shlex.split(_only(recipe, "VOLUME"))[0] + "/")
    port = config.listen[1]
    assert _only(recipe, "EXPOSE") == str(port)
    health = _only(recipe, "HEALTHCHECK")
    assert "http://127.0.0.1:%d/healthz" % port in health
    assert {k: v for k, v in env.items() if k.startswith("PYPY_GC_")} == PYPY_GC_SETTINGS
    done = _config_check(command[1:], settings)
    assert done.returncode == 0, done.stderr


# -- IAM --------------------------------------------------------------------------------


def _called_actions() -> set:
    """``service:Operation`` of every call the sinks make, from their source."""
    from sinks.aws import limits

    prefixes = {"KINESIS_TARGET_PREFIX": "kinesis", "FIREHOSE_TARGET_PREFIX": "firehose"}
    assert limits.KINESIS_TARGET_PREFIX.startswith("Kinesis_")
    assert limits.FIREHOSE_TARGET_PREFIX.startswith("Firehose_")
    call = re.compile(r'(KINESIS_TARGET_PREFIX|FIREHOSE_TARGET_PREFIX) \+ "\.(\w+)"')
    found = set()
    for path in sorted(pathlib.Path(ROOT, "sinks").rglob("*.py")):
        for prefix, operation in call.findall(_read(str(path))):
            found.add("%s:%s" % (prefixes[prefix], operation))
    return found


def test_iam_policy_allows_exactly_what_the_sinks_call():
    with open(os.path.join(DEPLOY, "iam-policy.json")) as f:
        policy = json.load(f)
    assert policy["Version"] == "2012-10-17"
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = set(statement["Action"])
        allowed |= actions
        services = {a.split(":")[0] for a in actions}
        assert len(services) == 1, statement
        resource = statement["Resource"]
        pattern = {"kinesis": r"arn:aws:kinesis:[a-z0-9-]+:\d{12}:stream/[\w.-]+",
                   "firehose": r"arn:aws:firehose:[a-z0-9-]+:\d{12}:deliverystream/[\w.-]+",
                   "kms": r"arn:aws:kms:[a-z0-9-]+:\d{12}:key/[0-9a-f-]+"}[services.pop()]
        assert re.fullmatch(pattern, resource), resource
    called = _called_actions()
    assert called == {"kinesis:PutRecords", "kinesis:DescribeStreamSummary", "firehose:PutRecordBatch"}
    assert allowed == called | {"kms:GenerateDataKey"}


# -- the guide --------------------------------------------------------------------------


def _sluice_flags() -> set:
    """Every flag of every ``sluice`` command, and of ``python -m bench.load``."""
    from bench.load.cli import _parser as bench_parser
    from gateway.cli.main import _parser as sluice_parser

    flags: set = set()
    pending = [sluice_parser(), bench_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return flags


def _github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_guide_names_only_settings_that_exist():
    texts = {GUIDE: _read(GUIDE)}
    for name in os.listdir(DEPLOY):
        if not name.endswith(".pyc") and os.path.isfile(os.path.join(DEPLOY, name)):
            texts[name] = _read(os.path.join(DEPLOY, name))
    known_env = _setting_envs()
    for where, text in texts.items():
        unknown = set(_ENV_NAME.findall(text)) - known_env
        assert not unknown, "%s names unknown variables %s" % (where, sorted(unknown))
    flags = set(_FLAG.findall(texts[GUIDE]))
    unknown = flags - _sluice_flags() - OTHER_FLAGS
    assert not unknown, "the guide names unknown flags %s" % sorted(unknown)


def test_guide_shard_arithmetic_follows_the_limits():
    guide = _read(GUIDE)
    overhead = 145 + 26  # envelope line and a record id as partition key (sinks/envelope.py)

    def shards(records_per_second: int, body: int) -> int:
        by_bytes = math.ceil(records_per_second * (body + overhead) / SHARD_WRITE_BYTES_PER_SECOND)
        by_records = math.ceil(records_per_second / SHARD_WRITE_RECORDS_PER_SECOND)
        return max(by_bytes, by_records)

    assert "**%d shards**" % shards(3000, 4096) in guide
    assert "**%d shards**" % shards(20000, 300) in guide
    assert "+ %d) / %s" % (overhead, format(SHARD_WRITE_BYTES_PER_SECOND, ",")) in guide
