"""Test certificates made with the ``openssl`` command: a CA and a server certificate it signed.

:func:`make_certificates` writes, into a directory, ``ca.pem`` (the CA that
clients trust), ``server.pem`` and ``server.key`` (for 127.0.0.1 and
localhost, signed by the CA) and ``other.key`` (a key that matches nothing),
and returns their paths.  :func:`client_context` is a client's SSL context
trusting only that CA.  Tests that need them skip when ``openssl`` is
missing (``./dev`` installs it).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from typing import List, NamedTuple

import pytest

__all__ = ["Certificates", "make_certificates", "client_context"]

#: The certificates live for the test run only.
DAYS = "1"
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class Certificates(NamedTuple):
    ca: str
    cert: str
    key: str
    other_key: str


def _openssl(args: List[str], cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def make_certificates(directory: str) -> Certificates:
    """A CA, a server certificate and key it issued, and an unrelated key, in ``directory``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    _openssl(["req", "-x509", *_EC_KEY, "-subj", "/CN=Sluice test CA", "-days", DAYS,
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign",
              "-keyout", "ca.key", "-out", "ca.pem"], directory)
    _openssl(["req", *_EC_KEY, "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
              "-out", "server.csr"], directory)
    with open(os.path.join(directory, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                "basicConstraints=CA:FALSE\n")
    _openssl(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
              "-CAcreateserial", "-days", DAYS, "-extfile", "server.ext", "-out", "server.pem"], directory)
    _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-out", "other.key"], directory)
    return Certificates(*(os.path.join(directory, name)
                          for name in ("ca.pem", "server.pem", "server.key", "other.key")))


def client_context(certificates: Certificates) -> ssl.SSLContext:
    """A client context that trusts only the test CA (and checks the host name)."""
    return ssl.create_default_context(cafile=certificates.ca)
