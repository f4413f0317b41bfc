"""TLS termination: the server's SSL context from ``--tls-cert`` and ``--tls-key``.

:func:`server_context` is called twice: by :func:`gateway.config.settings.load`, so a
missing, unreadable or mismatched file stops the gateway (and ``sluice config
check``) with one line naming the setting, and by the server, which keeps the
context for every connection (and makes a new one on SIGHUP, see
:meth:`gateway.server.Gateway.reload_tls`).  The connections themselves are
:class:`gateway.http.transport.TLSTransport`.
"""

from __future__ import annotations

import ssl

__all__ = ["server_context", "CertificateError", "MINIMUM_VERSION", "CIPHERS", "NO_RENEGOTIATION"]


class CertificateError(ValueError):
    """The certificate or key file cannot serve TLS; the message names the setting."""

#: TLS 1.0 and 1.1 are deprecated (RFC 8996); every current client speaks 1.2.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


#: TLS 1.2 suites: forward-secret key exchange (ECDHE) with an AEAD cipher
#: only.  Mozilla's "intermediate" profile, less DHE (slow, and rarely the
#: only choice of a current client).  PyPy's default list still offers
#: static-RSA key exchange and CBC with SHA-1.  TLS 1.3 suites are all
#: AEAD with ECDHE and are not changed by this list.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: SSL_OP_NO_RENEGOTIATION: a client may not renegotiate a TLS 1.2 session
#: (a CPU cost it could make the server pay again and again).  PyPy's ssl
#: module lacks the constant; this is OpenSSL's value (1.1.0h and later).
NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0x40000000)


def _no_password() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted
    # key's passphrase and the gateway would hang at start.
    return b""


def _readable(path: str, name: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CertificateError("%s: cannot read %s: %s" % (name, path, exc.strerror or exc)) from None


def server_context(cert: str, key: str, *, cert_name: str = "--tls-cert",
                   key_name: str = "--tls-key") -> ssl.SSLContext:
    """An SSL context serving ``cert`` (PEM chain, leaf first) with its private ``key``.

    Raises :class:`CertificateError` naming ``cert_name`` or
    ``key_name`` (the flag, variable or file key that gave the path) when a
    file cannot be read or holds no certificate, or when the key is not the
    certificate's.
    """
    _readable(cert, cert_name)
    _readable(key, key_name)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise CertificateError("%s: no PEM certificate in %s (%s)"
                          % (cert_name, cert, exc.reason or exc)) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.options |= NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError("%s: %s is not the private key of the certificate in %s"
                              % (key_name, key, cert)) from None
        raise CertificateError("%s: no usable private key in %s (PEM, not encrypted): %s"
                          % (key_name, key, exc.reason or exc)) from None
    return context
