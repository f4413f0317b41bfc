"""Servers under test and their helpers, each a child process stopped by :meth:`Child.stop`.

Servers under test run pinned to core 0 (``taskset -c 0``): the gateway
(through :mod:`bench.load.probe`) and the peers (nginx, uvicorn, hypercorn,
FastAPI, and the standard-library ``discard`` stub).  Helpers (the Kinesis
discard endpoint, redis-server) run on core 1 beside the load generator.
Peers live in their own venv under the cache directory, never in the
gateway's environment.

``--python pypy`` and ``--python cpython`` name interpreters found by
:data:`PYTHONS` (the venvs ``./dev bench`` creates at the repository root,
else the system's), never a path of one machine; whichever interpreter runs
the gateway must import its dependencies (:func:`require_gateway_python`).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import abc
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = ["ROOT", "PYTHONS", "INTERPRETERS", "GATEWAY_IMPORTS", "InterpreterError", "require_gateway_python",
           "Child", "free_port", "pinned", "unpinned", "start_gateway", "start_peer",
           "start_kinesis", "start_redis", "gateway_has_redis", "create_key", "peers_python", "PEERS"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Where ``--python NAME`` looks, first usable one wins: the venvs ``./dev bench``
#: creates at the repository root (tox's py311 environment too), then the
#: system's interpreter on PATH.  Relative paths are under ROOT; bare names on PATH.
INTERPRETERS: Dict[str, Tuple[str, ...]] = {
    "pypy": (".venv-pypy/bin/python", "pypy3"),
    "cpython": (".venv-cpython/bin/python", ".tox/py311/bin/python", "python3"),
}
#: The implementation each name must be (``platform.python_implementation()``).
_IMPLEMENTATIONS = {"pypy": "PyPy", "cpython": "CPython"}
#: What the gateway needs to import: the modules of pyproject.toml's
#: ``[project] dependencies`` (tomli is added below Python 3.11).
GATEWAY_IMPORTS = ("trio", "h11", "redis", "botocore", "cffi", "prometheus_client")
_CHECK = """
import importlib, platform, sys
names = sys.argv[1:] + (["tomli"] if sys.version_info < (3, 11) else [])
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(platform.python_implementation())
print(" ".join(missing))
"""
_HOW = ("Run the harness through ./dev from the repository root, e.g. `./dev bench load --python pypy ...`: "
        "it installs the gateway's dependencies into .venv-pypy and .venv-cpython there.")
PEERS = ("nginx", "uvicorn", "hypercorn", "fastapi", "discard")
PEER_PACKAGES = ["uvicorn[standard]", "hypercorn", "trio", "fastapi", "matplotlib"]
SERVER_CORE, CLIENT_CORE = "0", "1"
#: Seconds for a server to listen (a cold PyPy takes about one).
START_TIMEOUT = 60.0
#: Seconds a SIGTERM'd server may take before SIGKILL.
STOP_TIMEOUT = 20.0
#: The gateway's startup event (a JSON line on stderr) and the address in it.
_LISTENING = re.compile(r'^\{.*"event":"started","url":"https?://(\[[^\]]*\]|[^:/"]+):(\d+)"')
#: With --workers N: the supervisor's, once every worker listens.
_SUPERVISED = re.compile(r'^\{.*"event":"supervisor_started","url":"https?://(\[[^\]]*\]|[^:/"]+):(\d+)"')


class InterpreterError(SystemExit):
    """No usable interpreter for the gateway (a :class:`SystemExit`: the harness stops with the message)."""


_checked: Dict[str, Tuple[str, List[str]]] = {}


def _inspect(python: str) -> Tuple[str, List[str]]:
    """``(implementation, modules it cannot import)`` of ``python``, once per interpreter."""
    if python not in _checked:
        done = subprocess.run([python, "-c", _CHECK, *GATEWAY_IMPORTS], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
        lines = done.stdout.splitlines()
        if done.returncode != 0 or len(lines) < 2:
            raise OSError("%s did not run: %s" % (python, (done.stderr or done.stdout).strip()[-500:]))
        _checked[python] = (lines[-2].strip(), lines[-1].split())
    return _checked[python]


def require_gateway_python(python: str) -> str:
    """``python`` if it can import the gateway's dependencies; else :class:`InterpreterError`."""
    try:
        missing = _inspect(python)[1]
    except (OSError, subprocess.SubprocessError) as exc:
        raise InterpreterError("bench.load: cannot run the gateway's interpreter %s (%s).\n%s"
                               % (python, exc, _HOW)) from None
    if missing:
        raise InterpreterError("bench.load: %s cannot import %s (the gateway's dependencies).\n%s"
                               % (python, ", ".join(missing), _HOW))
    return python


def _candidates(name: str) -> Iterator[str]:
    for candidate in INTERPRETERS[name]:
        if "/" in candidate:
            path = os.path.join(ROOT, candidate)
            yield path if os.access(path, os.X_OK) else ""
        else:
            yield shutil.which(candidate) or ""


def find_python(name: str) -> str:
    """The interpreter for ``--python NAME`` (``pypy`` or ``cpython``): the first of
    :data:`INTERPRETERS` that exists, is that implementation and imports the
    gateway's dependencies; else :class:`InterpreterError` saying what was tried."""
    tried = []
    for candidate, python in zip(INTERPRETERS[name], _candidates(name)):
        if not python:
            tried.append("%s: not found" % candidate)
            continue
        try:
            implementation, missing = _inspect(python)
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append("%s: %s" % (python, exc))
            continue
        if implementation != _IMPLEMENTATIONS[name]:
            tried.append("%s: %s, not %s" % (python, implementation, _IMPLEMENTATIONS[name]))
        elif missing:
            tried.append("%s: cannot import %s" % (python, ", ".join(missing)))
        else:
            return python
    raise InterpreterError(
        "bench.load: --python %s: no %s interpreter that imports the gateway's dependencies (%s):\n  %s\n%s"
        % (name, _IMPLEMENTATIONS[name], ", ".join(GATEWAY_IMPORTS), "\n  ".join(tried), _HOW))


class _Interpreters(abc.Mapping):
    """``--python`` names to interpreters, looked up when first asked for (see :func:`find_python`)."""

    def __init__(self) -> None:
        self._found: Dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name not in INTERPRETERS:
            raise KeyError(name)
        if name not in self._found:
            self._found[name] = find_python(name)
            print("bench.load: --python %s is %s" % (name, self._found[name]), file=sys.stderr, flush=True)
        return self._found[name]

    def __iter__(self) -> Iterator[str]:
        return iter(INTERPRETERS)

    def __len__(self) -> int:
        return len(INTERPRETERS)


#: ``PYTHONS["pypy"]``, ``PYTHONS["cpython"]``: the interpreter paths (found on first use).
PYTHONS: Mapping[str, str] = _Interpreters()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: str, command: Sequence[str]) -> List[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", core, *command] if taskset else list(command)


def unpinned(core: str, command: Sequence[str]) -> List[str]:
    """``command`` free to run on any core (``core`` is ignored: the same call as :func:`pinned`)."""
    return list(command)


class Child:
    """A started process; ``port`` is where it listens (0 for none)."""

    def __init__(self, name: str, command: List[str], *, env: Optional[Dict[str, str]] = None,
                 cwd: str = ROOT, stdout_port: bool = False, listening: re.Pattern = _LISTENING) -> None:
        self.name = name
        self._listening = listening
        self.command = command
        self.port = 0
        self.lines: List[str] = []
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_port else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._found = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()
        if stdout_port:
            threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if len(self.lines) < 10_000:
                self.lines.append(line)
            match = self._listening.match(line)
            if match:
                self.port = int(match.group(2))
                self._found.set()
            elif line.isdigit() and not self.port:
                self.port = int(line)
                self._found.set()
        stream.close()
        self._found.set()

    def wait_port(self, port: int = 0) -> Child:
        """Wait until it listens (on ``port`` if given, else on the port it printed)."""
        deadline = time.monotonic() + START_TIMEOUT
        if port:
            self.port = port
        elif not self._found.wait(START_TIMEOUT) or not self.port:
            self.stop()
            raise RuntimeError("%s did not start: %s" % (self.name, "\n".join(self.lines[-20:])))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s): %s" % (self.name, self.proc.returncode,
                                                          "\n".join(self.lines[-20:])))
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("%s never listened on %d" % (self.name, self.port))

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL to its process group; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        try:  # anything it left in its group (nginx workers, uvicorn children)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "AWS_"))}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def gateway_has_redis(python: str) -> bool:
    require_gateway_python(python)
    out = subprocess.run([python, "-m", "gateway", "serve", "--help"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60).stdout
    return "--redis" in out


def start_gateway(python: str, sink: str, workdir: str, *, probe_file: str, tracemalloc: bool = False,
                  kinesis_url: str = "", redis_url: str = "", extra: Sequence[str] = (),
                  workers: int = 1, pin: bool = True, stalls: bool = False, vmprof: str = "") -> Child:
    """The gateway under the GC probe, pinned to core 0 unless ``pin`` is false;
    with ``workers`` above 1 a supervisor and its workers, never pinned (they use
    every core)."""
    require_gateway_python(python)
    command = [python, "-m", "bench.load.probe", "serve", "--listen", "127.0.0.1:0", "--sink", sink,
               "--data-dir", os.path.join(workdir, "sluice-data"), "--workers", str(workers)]
    env = _env(SLUICE_BENCH_PROBE=probe_file)
    if tracemalloc:
        env["SLUICE_BENCH_TRACEMALLOC"] = "1"
    if stalls:
        env["SLUICE_BENCH_STALLS"] = "1"
    if vmprof:
        env["SLUICE_BENCH_VMPROF"] = vmprof
    if sink == "kinesis":
        command += ["--stream", "bench", "--endpoint-url", kinesis_url, "--region", "us-east-1"]
        env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")
    if redis_url:
        command += ["--redis", redis_url]
    command += list(extra)
    if workers > 1:
        # Listening means every worker listens: the supervisor's event, not worker 0's.
        return Child("sluice", command, env=env, listening=_SUPERVISED).wait_port()
    return Child("sluice", (pinned if pin else unpinned)(SERVER_CORE, command), env=env).wait_port()


def idle(command: Sequence[str]) -> List[str]:
    """``command`` under Linux's ``SCHED_IDLE`` policy (``chrt --idle 0``) where
    chrt exists: it runs only when nothing else on its core wants to."""
    chrt = shutil.which("chrt")
    return [chrt, "--idle", "0", *command] if chrt else list(command)


def start_kinesis(python: str = sys.executable) -> Child:
    # The stand-in shares the client's core but plays a service on other
    # machines: at idle priority its few milliseconds per call (reading a
    # 3 MB body) never hold back a request the client should send or time.
    return Child("kinesis-discard", pinned(CLIENT_CORE, idle([python, "-m", "bench.load.stubs", "kinesis"])),
                 env=_env(), stdout_port=True).wait_port()


def start_redis(workdir: str) -> Child:
    port = free_port()
    server = shutil.which("redis-server") or "redis-server"
    return Child("redis-server", pinned(CLIENT_CORE, [
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--daemonize", "no"]), env=_env()).wait_port(port)


def create_key(python: str, redis_url: str) -> str:
    done = subprocess.run([python, "-m", "gateway.cli.admin", "keys", "create", "--redis", redis_url,
                           "--tenant", "bench", "--requests-per-second", "0", "--bytes-per-second", "0"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1]


def peers_python(cache: str) -> str:
    """The peers' venv (created and filled on first use): uvicorn, hypercorn, FastAPI, matplotlib."""
    venv = os.path.join(cache, "venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".complete")):
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", venv], check=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True, timeout=1200)
        open(os.path.join(venv, ".complete"), "w").close()
    return python


_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$status $request_length';
    access_log {access};
    client_body_temp_path {dir}/body;
    client_max_body_size 11m;
    client_body_buffer_size 2m;
    client_body_in_single_buffer on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/logs {{
            # mirror reads the whole body into the buffer before the request goes on;
            # the mirror subrequest itself answers 204 internally.
            mirror /_discard;
            mirror_request_body on;
            error_page 404 405 =202 @accepted;  # the static handler answers POST with 404/405
        }}
        location = /_discard {{ internal; return 204; }}
        location @accepted {{ return 202; }}
    }}
}}
"""


def start_nginx(workdir: str, *, log_lengths: bool = False) -> Child:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    # Run as root, nginx's worker switches to an unprivileged user, which must
    # reach the prefix directory (mkdtemp makes it 0700; a 403 otherwise).
    for path in (os.path.dirname(workdir), workdir):
        os.chmod(path, 0o755)
    os.makedirs(os.path.join(workdir, "body"), exist_ok=True)
    access = "%s/access.log bench" % workdir if log_lengths else "off"
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(_NGINX_CONF.format(dir=workdir, port=port, access=access))
    return Child("nginx", pinned(SERVER_CORE, [nginx, "-c", conf, "-p", workdir]), env=_env()).wait_port(port)


def start_peer(name: str, workdir: str, cache: str) -> Child:
    if name == "nginx":
        return start_nginx(workdir)
    if name == "discard":
        return Child("discard", pinned(SERVER_CORE, [sys.executable, "-m", "bench.load.stubs", "discard"]),
                     env=_env(), stdout_port=True).wait_port()
    python = peers_python(cache)
    port = free_port()
    bindir = os.path.dirname(python)
    if name in ("uvicorn", "fastapi"):
        app = "bench.load.asgi_app:" + ("app" if name == "uvicorn" else "fastapi_app")
        command = [os.path.join(bindir, "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port),
                   "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
                   "--backlog", "4096"]
    elif name == "hypercorn":
        command = [os.path.join(bindir, "hypercorn"), "-k", "trio", "-w", "1", "--backlog", "4096",
                   "--bind", "127.0.0.1:%d" % port, "bench.load.asgi_app:app"]
    else:
        raise ValueError("unknown peer %r (one of %s)" % (name, ", ".join(PEERS)))
    return Child(name, pinned(SERVER_CORE, command), env=_env()).wait_port(port)


def scratch() -> str:
    return tempfile.mkdtemp(prefix="sluice-load-")
