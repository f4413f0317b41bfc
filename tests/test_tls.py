"""TLS termination: records arrive over HTTPS, plain HTTP and silent clients are closed
cleanly, and bad certificate settings stop the gateway at start naming the setting."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Iterator, List, Tuple

import pytest

from gateway.config.settings import ConfigError, from_args
from gateway.http.transport import TLS_RECEIVE_BYTES
from tests.support.gateway import CLIENT_TIMEOUT, GatewayProcess, running_gateway, wait_for_records
from tests.support.tls import Certificates, client_context, make_certificates

#: A refused start is over in a second or two; a start that serves instead is killed here.
RUN_TIMEOUT = 60.0
HEAD_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    return make_certificates(str(tmp_path_factory.mktemp("certificates")))


@pytest.fixture(scope="module")
def tls_gateway(certificates, tmp_path_factory) -> Iterator[GatewayProcess]:
    data_dir = str(tmp_path_factory.mktemp("tls-data"))
    with running_gateway(["--tls-cert", certificates.cert, "--tls-key", certificates.key,
                          "--head-timeout", "%gs" % HEAD_TIMEOUT, "--max-body", "2MiB"],
                         data_dir=data_dir) as gateway:
        yield gateway


def https(gateway: GatewayProcess, certificates: Certificates) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", gateway.port, timeout=CLIENT_TIMEOUT,
                                       context=client_context(certificates))


def exchange(conn: http.client.HTTPConnection, body, headers=None) -> Tuple[int, dict]:
    conn.request("POST", "/v1/logs", body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def read_until_closed(sock: socket.socket) -> Tuple[bytes, str]:
    """Everything the server sends until it closes, and how: ``eof`` or ``reset``."""
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received, "eof"
            received += chunk
    except ConnectionResetError:
        return received, "reset"


# -- serving ---------------------------------------------------------------------


def test_startup_event_says_https(tls_gateway):
    started = tls_gateway.started
    assert started["url"] == "https://127.0.0.1:%d" % tls_gateway.port and started["tls"] is True


def test_records_arrive_over_tls(tls_gateway, certificates):
    # Bodies around and well over one TLS record (16 KiB of plaintext), on one
    # keep-alive connection, plus a chunked one.
    bodies = [b"", b"small", os.urandom(TLS_RECEIVE_BYTES - 1), os.urandom(TLS_RECEIVE_BYTES + 1),
              os.urandom(1024 * 1024 + 7)]
    conn = https(tls_gateway, certificates)
    try:
        ids: List[str] = []
        for body in bodies:
            status, doc = exchange(conn, body, {"Content-Type": "application/octet-stream"})
            assert status == 202, doc
            ids.append(doc["id"])
        chunks = [b"one,", b"two," * 5000, b"three"]
        status, doc = exchange(conn, iter(chunks))  # an iterable goes out chunked
        assert status == 202, doc
        ids.append(doc["id"])
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert conn.sock.selected_alpn_protocol() in (None, "http/1.1")
    finally:
        conn.close()
    records = wait_for_records(tls_gateway.data_dir, ids)
    assert [records[i][1] for i in ids] == bodies + [b"".join(chunks)]
    assert records[ids[1]][0]["content_type"] == "application/octet-stream"


def test_errors_are_answered_over_tls(tls_gateway, certificates):
    conn = https(tls_gateway, certificates)
    try:
        conn.request("GET", "/nowhere")
        response = conn.getresponse()
        assert response.status == 404 and json.loads(response.read())["error"] == "not_found"
    finally:
        conn.close()


def test_a_slow_head_gets_408_over_tls(tls_gateway, certificates):
    # The receive cut by --head-timeout leaves the TLS stream usable for the answer.
    raw = socket.create_connection(tls_gateway.address, timeout=CLIENT_TIMEOUT)
    with client_context(certificates).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"POST /v1/logs HTTP/1.1\r\nHost: x\r\n")
        received, ended = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"


def test_plain_http_gets_a_400_and_a_clean_close(tls_gateway):
    with socket.create_connection(tls_gateway.address, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"POST /v1/logs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        received, ended = read_until_closed(sock)
    assert ended == "eof"
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    doc = json.loads(body)
    assert doc["error"] == "bad_request" and "TLS port" in doc["message"]


def test_plain_http_with_the_standard_client(tls_gateway):
    conn = http.client.HTTPConnection(*tls_gateway.address, timeout=CLIENT_TIMEOUT)
    try:
        status, doc = exchange(conn, b"not encrypted")
    finally:
        conn.close()
    assert status == 400 and doc["error"] == "bad_request"


def test_garbage_instead_of_a_handshake_is_closed(tls_gateway, certificates):
    with socket.create_connection(tls_gateway.address, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record holding nonsense
        received, ended = read_until_closed(sock)
    # TLS may answer with an alert record; never with HTTP.
    assert ended == "eof" and not received.startswith(b"HTTP/"), received
    assert exchange(https(tls_gateway, certificates), b"still serving")[0] == 202


def test_a_silent_client_is_dropped_after_the_head_timeout(tls_gateway):
    with socket.create_connection(tls_gateway.address, timeout=CLIENT_TIMEOUT) as sock:
        opened = time.monotonic()
        received, ended = read_until_closed(sock)
        waited = time.monotonic() - opened
    assert (received, ended) == (b"", "eof")
    assert waited < CLIENT_TIMEOUT  # closed by the gateway, not by the client's timeout


def test_a_client_that_does_not_trust_the_certificate_fails_its_handshake(tls_gateway, certificates):
    conn = http.client.HTTPSConnection("127.0.0.1", tls_gateway.port, timeout=CLIENT_TIMEOUT,
                                       context=ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/healthz")
    conn.close()
    assert exchange(https(tls_gateway, certificates), b"after")[0] == 202


# -- settings ---------------------------------------------------------------------


def refusal(flags, environ=None) -> str:
    with pytest.raises(ConfigError) as caught:
        from_args(flags, environ or {})
    return str(caught.value)


def test_both_files_or_neither(certificates):
    assert refusal(["--tls-cert", certificates.cert]).startswith("--tls-key: needed with --tls-cert")
    assert refusal(["--tls-key", certificates.key]).startswith("--tls-cert: needed with --tls-key")
    assert refusal([], {"SLUICE_TLS_CERT": certificates.cert}).startswith(
        "--tls-key: needed with SLUICE_TLS_CERT")


def test_a_matching_pair_is_accepted(certificates):
    config = from_args(["--tls-cert", certificates.cert, "--tls-key", certificates.key], {})
    assert config.tls and config.tls_cert == certificates.cert


def test_unreadable_files_name_their_setting(certificates, tmp_path):
    missing = str(tmp_path / "missing.pem")
    assert refusal(["--tls-cert", missing, "--tls-key", certificates.key]) == (
        "--tls-cert: cannot read %s: No such file or directory" % missing)
    assert refusal(["--tls-cert", certificates.cert], {"SLUICE_TLS_KEY": missing}) == (
        "SLUICE_TLS_KEY: cannot read %s: No such file or directory" % missing)


def test_files_that_are_not_what_they_should_be(certificates, tmp_path):
    assert refusal(["--tls-cert", certificates.key, "--tls-key", certificates.key]).startswith(
        "--tls-cert: no PEM certificate in %s" % certificates.key)
    assert refusal(["--tls-cert", certificates.cert, "--tls-key", certificates.cert]).startswith(
        "--tls-key: no usable private key in %s" % certificates.cert)


def test_a_mismatched_key_is_refused(certificates, tmp_path):
    assert refusal(["--tls-cert", certificates.cert, "--tls-key", certificates.other_key]) == (
        "--tls-key: %s is not the private key of the certificate in %s"
        % (certificates.other_key, certificates.cert))
    settings = tmp_path / "sluice.toml"
    settings.write_text("tls_cert = %s\ntls_key = %s\n" % (json.dumps(certificates.cert),
                                                          json.dumps(certificates.other_key)))
    assert refusal(["--config", str(settings)]).startswith("%s: tls_key: " % settings)


def test_a_mismatched_pair_stops_the_gateway_at_start(certificates, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data_dir = str(tmp_path / "data")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0",
                             "--data-dir", data_dir, "--tls-cert", certificates.cert,
                             "--tls-key", certificates.other_key],
                            capture_output=True, timeout=RUN_TIMEOUT, env=env, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"", stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("sluice: error: --tls-key: "), stderr
    assert not os.path.exists(data_dir)


def test_the_context_offers_only_forward_secret_aead_suites_and_no_renegotiation(certificates):
    from gateway.http.tls import NO_RENEGOTIATION, server_context

    context = server_context(certificates.cert, certificates.key)
    names = [c["name"] for c in context.get_ciphers()]
    tls12 = [name for name in names if not name.startswith("TLS_")]
    assert tls12 and all(name.startswith("ECDHE-") for name in tls12), names
    assert not [name for name in names if "CBC" in name or name.endswith("-SHA") or "RSA-AES" in name
                and not name.startswith("ECDHE-")]
    assert context.options & NO_RENEGOTIATION


def test_a_cbc_sha1_client_is_refused(tls_gateway, certificates):
    """PyPy's default list offered these; a client that offers only them gets no session."""
    context = client_context(certificates)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=CLIENT_TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_sighup_reloads_the_certificate_in_a_single_process(tmp_path):
    import shutil

    old = make_certificates(str(_mkdir(tmp_path / "old")))
    new = make_certificates(str(_mkdir(tmp_path / "new")))
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    with GatewayProcess(["--tls-cert", cert, "--tls-key", key, "--sink", "null"],
                        data_dir=str(tmp_path / "data")).start() as gateway:

        def status(certs: Certificates) -> int:
            conn = http.client.HTTPSConnection("127.0.0.1", gateway.port, timeout=CLIENT_TIMEOUT,
                                               context=client_context(certs))
            try:
                return exchange(conn, b"x")[0]
            finally:
                conn.close()

        assert status(old) == 202
        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        gateway.send_signal(signal.SIGHUP)
        _wait_for_event(gateway, "tls_reloaded")
        assert status(new) == 202
        with pytest.raises(ssl.SSLError):
            status(old)
        # A broken pair is refused and the loaded one kept.
        with open(key, "w") as f:
            f.write("not a key")
        gateway.send_signal(signal.SIGHUP)
        (failed,) = _wait_for_event(gateway, "tls_reload_failed")
        assert "--tls-key" in failed["error"]
        assert status(new) == 202
    assert gateway.returncode == 0


def _mkdir(path):
    path.mkdir()
    return path


def _wait_for_event(gateway: GatewayProcess, event: str) -> List[dict]:
    deadline = time.monotonic() + 30
    while not gateway.events(event):
        assert time.monotonic() < deadline and gateway.running, gateway.stderr
        time.sleep(0.05)
    return gateway.events(event)
