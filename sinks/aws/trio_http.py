"""Kinesis and Firehose calls signed by botocore, sent on Trio streams with h11.

Theory of operation
-------------------
`TrioEndpoint` is the default `~sinks.aws.http.Endpoint`.  A call costs the
event loop nothing but non-blocking I/O and a little signing:

- **Credentials** come from botocore's chain (the same ``Session`` as the
  threaded endpoint).  Frozen credentials are kept between calls; only when
  botocore says refreshable credentials need a refresh (``refresh_needed``)
  is ``get_frozen_credentials`` run, in a worker thread, since it may call STS
  or the instance metadata service.  Static credentials never need a thread.
- **The payload hash** (``X-Amz-Content-SHA256``) is taken in slices of
  `HASH_SLICE` bytes with a checkpoint between slices, so hashing a 5 MiB
  body never holds the loop for more than one slice's worth (well under a
  millisecond); the body is hashed in place, from the batch's buffer.
- **Signing** is botocore's ``SigV4Auth`` on an ``AWSRequest`` whose payload
  hash is given, so botocore never reads the body.  Its ``add_auth`` steps
  (date headers, canonical request, string to sign, signature) are called
  one by one with a checkpoint between them (`sign_in_steps`): at a few calls
  a second PyPy runs botocore in its interpreter, where the whole signature
  took 1.7 ms of the loop's time, each step well under a millisecond.  The
  day's signing key is derived once (`SigningKeys`), with botocore's HMAC.
- **Sending** uses h11 as the client over a small keep-alive pool of Trio
  streams (TLS with botocore's CA bundle on ``https``).  The request head is
  h11's bytes; the body goes to ``send_all`` as slices of the batch
  buffer's own memoryview (``send_with_data_passthrough``), so the one copy
  on the way out is TLS encryption (or the kernel's), and a multi-megabyte
  body yields the loop every `SEND_SLICE` bytes.
- **Answers** are read with h11 up to `MAX_REPLY_BYTES`.  A connection is
  put back in the pool only when both sides finished the exchange cleanly;
  anything else (a reset, a timeout, a cancelled call) closes it.

Proxies (``HTTPS_PROXY``) are not spoken here: when the environment names
one for the endpoint, `open_endpoint` returns the threaded endpoint instead.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Any, List, Optional, Tuple
from urllib.parse import urlsplit

import h11
import trio

from buffers.copy import pypy_ffi
from sinks import jit
from sinks.aws.errors import CredentialsError, TransientError
from sinks.aws.http import Endpoint, Reply, resolve_endpoint
from sinks.aws.limits import JSON_CONTENT_TYPE
from sinks.digests import Sha256

__all__ = ["TrioEndpoint", "HASH_SLICE", "SEND_SLICE", "MAX_REPLY_BYTES", "open_trio_endpoint",
           "sign_in_steps", "SigningKeys"]

#: Bytes hashed between two checkpoints.  256 KiB took 0.2 ms of the loop
#: on average at the design load, and over a millisecond when the machine
#: was busy; a quarter of that keeps such steps well under it.
HASH_SLICE = 64 * 1024
#: Bytes of a request body given to the stream at a time: copying 2 MB into
#: the kernel (or through TLS) took over a millisecond of the loop's time in
#: one step, and 256 KiB up to 2 ms when the machine was busy.
SEND_SLICE = 64 * 1024
#: Largest answer read: a PutRecords answer for 500 records is about 60 KB.
MAX_REPLY_BYTES = 4 * 1024 * 1024
#: Bytes asked of the stream per read of the answer.
_RECEIVE_BYTES = 64 * 1024


def open_trio_endpoint(service: str, *, region: str = "", endpoint_url: str = "",
                       connections: int = 4, timeout: float = 6.0,
                       session: Any = None) -> Endpoint:
    """A `TrioEndpoint` for ``service``, or the threaded endpoint behind a proxy.

    Blocking (reads config files): call it from a worker thread.  Raises
    `~sinks.aws.http.NoRegion` when no region is configured anywhere.
    """
    from botocore.utils import get_environ_proxies

    from sinks.aws.http import open_botocore_endpoint

    resolved = resolve_endpoint(service, region=region, endpoint_url=endpoint_url, session=session)
    if get_environ_proxies(resolved.url):
        return open_botocore_endpoint(service, region=region, endpoint_url=endpoint_url,
                                      connections=connections, timeout=timeout, session=session)
    context = None
    if resolved.url.startswith("https:"):
        cafile = resolved.verify if isinstance(resolved.verify, str) else None
        context = ssl.create_default_context(cafile=cafile)
    return TrioEndpoint(resolved.session, resolved.url, resolved.region, resolved.signing_name,
                        connections=connections, timeout=timeout, ssl_context=context)


class _Connection:
    __slots__ = ("stream", "http")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)


class TrioEndpoint(Endpoint):
    """Signs with botocore's SigV4 in the loop and sends with h11 on Trio streams."""

    def __init__(self, session: Any, url: str, region: str, signing_name: str, *,
                 connections: int = 4, timeout: float = 6.0,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        from botocore.auth import _host_from_url

        self.session = session
        self.url = url
        self.region = region
        self.signing_name = signing_name
        self.timeout = timeout
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path or "/"
        self._host_header = _host_from_url(url).encode("ascii")
        self._ssl_context = ssl_context
        self._idle: List[_Connection] = []
        self._open = trio.CapacityLimiter(max(1, connections))
        self._credentials: Any = None
        self._frozen: Any = None
        self._refresh_lock = trio.Lock()
        self._keys = SigningKeys()
        self.connections_opened = 0

    async def call(self, target: str, body: Any, digest: Optional[str] = None) -> Reply:
        with jit.paused():
            return await self._call(target, body, digest)

    async def _call(self, target: str, body: Any, digest: Optional[str]) -> Reply:
        credentials = await self._frozen_credentials()
        if digest is None:
            digest = await _sha256_hex(body)
        headers = await self._sign(credentials, target, digest, len(body))
        async with self._open:
            connection = self._idle.pop() if self._idle else None
            reply: Optional[Reply] = None
            try:
                with trio.fail_after(self.timeout):
                    if connection is None:
                        connection = await self._connect()
                    reply = await self._exchange(connection, headers, body)
            except trio.TooSlowError:
                raise TransientError("Timeout", "no answer from %s within %gs" % (
                    self.url, self.timeout)) from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    h11.ProtocolError) as exc:
                raise TransientError(type(exc).__name__, str(exc) or type(exc).__name__) from exc
            finally:
                # Only a cleanly finished exchange leaves a connection to reuse;
                # a failed or cancelled one may be mid-message.
                if connection is not None:
                    if reply is not None and _next_cycle(connection):
                        self._idle.append(connection)
                    else:
                        await trio.aclose_forcefully(connection.stream)
            return reply

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    # -- pieces --------------------------------------------------------------

    async def _frozen_credentials(self) -> Any:
        frozen = self._frozen
        if frozen is not None and not _needs_refresh(self._credentials):
            return frozen
        async with self._refresh_lock:
            if self._frozen is None or _needs_refresh(self._credentials):
                self._frozen = await trio.to_thread.run_sync(self._freeze_blocking)
        return self._frozen

    def _freeze_blocking(self) -> Any:
        import botocore.exceptions

        try:
            if self._credentials is None:
                self._credentials = self.session.get_credentials()
            if self._credentials is None:
                raise CredentialsError(
                    "NoCredentials", "no AWS credentials found (environment, shared credentials "
                    "and config files, profile, web identity, container or instance metadata)")
            frozen = self._credentials.get_frozen_credentials()
        except (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                ConnectionError) as exc:
            raise TransientError("CredentialsUnreachable",
                                 "credential refresh failed: %s" % exc) from exc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise CredentialsError("CredentialsRefreshFailed", str(exc)) from exc
        if not frozen.access_key or not frozen.secret_key:
            raise CredentialsError("NoCredentials", "the credentials have no access key")
        return frozen

    async def _sign(self, credentials: Any, target: str, digest: str,
                    length: int) -> List[Tuple[bytes, bytes]]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method="POST", url=self.url, headers={
            "X-Amz-Target": target,
            "Content-Type": JSON_CONTENT_TYPE,
            "X-Amz-Content-SHA256": digest,
        })
        await sign_in_steps(SigV4Auth(credentials, self.signing_name, self.region), request, self._keys)
        headers = [(b"host", self._host_header)]
        for name, value in request.headers.items():
            if name.lower() != "host":
                headers.append((name.encode("ascii"), value.encode("ascii")))
        headers.append((b"content-length", b"%d" % length))
        # Building the head (h11 validates every header) is the next step's work.
        await trio.lowlevel.checkpoint()
        return headers

    async def _connect(self) -> _Connection:
        if self._https:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                self._host, self._port, ssl_context=self._ssl_context, https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(self._host, self._port)
        self.connections_opened += 1
        return _Connection(stream)

    async def _exchange(self, connection: _Connection, headers: List[Tuple[bytes, bytes]],
                        body: Any) -> Reply:
        http, stream = connection.http, connection.stream
        # h11 checking every header, writing the head and sending it are
        # steps of their own (together about 0.35 ms on PyPy, with the JIT
        # paused in the sink's calls).
        request = h11.Request(method="POST", target=self._path, headers=headers)
        await trio.lowlevel.checkpoint()
        head = http.send(request)
        await trio.lowlevel.checkpoint()
        await stream.send_all(head)
        for piece in http.send_with_data_passthrough(h11.Data(data=body)):
            await _send_body(stream, memoryview(piece))
        await stream.send_all(http.send(h11.EndOfMessage()))
        status = 0
        error_type: Optional[str] = None
        parts: List[bytes] = []
        size = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(_RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    if name == b"x-amzn-errortype":
                        error_type = value.decode("latin-1")
                # The head and the body are parsed in separate steps.
                await trio.lowlevel.checkpoint()
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_REPLY_BYTES:
                    raise h11.RemoteProtocolError("answer over %d bytes" % MAX_REPLY_BYTES)
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, b"".join(parts), error_type)
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("the endpoint closed the connection")



class SigningKeys:
    """The SigV4 signing key of the day, derived with botocore's own HMAC step.

    ``SigV4Auth.signature`` derives the key from the secret, the date, the
    region and the service with four HMACs on every call, then signs with a
    fifth.  The key changes only with those four, so it is kept, as the AWS
    SDKs that sign in their own code keep it.  On PyPy each HMAC left three
    OpenSSL contexts for the collector's finalizers.
    """

    __slots__ = ("_scope", "_key")

    def __init__(self) -> None:
        self._scope: Optional[Tuple[str, str, str, str]] = None
        self._key = b""

    def key(self, auth: Any, day: str) -> bytes:
        """The signing key for ``auth``'s credentials, region and service on ``day`` (YYYYMMDD)."""
        secret = auth.credentials.secret_key
        scope = (secret, day, auth._region_name, auth._service_name)
        if scope != self._scope:
            key = auth._sign(("AWS4" + secret).encode(), day)
            for part in (auth._region_name, auth._service_name, "aws4_request"):
                key = auth._sign(key, part)
            self._scope, self._key = scope, key
        return self._key


async def sign_in_steps(auth: Any, request: Any, keys: Optional[SigningKeys] = None) -> None:
    """botocore's ``SigV4Auth.add_auth(request)``, with a checkpoint between its steps.

    The steps and their order are ``add_auth``'s own in the botocore versions
    the project allows; a test checks the headers against ``add_auth`` at the
    same instant, so a botocore that changes them fails it.  With ``keys``,
    the day's signing key comes from there instead of four more HMACs.
    """
    import datetime

    import botocore.auth
    from botocore.exceptions import NoCredentialsError

    if auth.credentials is None:
        raise NoCredentialsError()
    await trio.lowlevel.checkpoint()
    # Older botocore took the time with utcnow() in add_auth itself.
    now = getattr(botocore.auth, "get_current_datetime", datetime.datetime.utcnow)()
    request.context["timestamp"] = now.strftime(botocore.auth.SIGV4_TIMESTAMP)
    auth._modify_request_before_signing(request)
    await trio.lowlevel.checkpoint()
    canonical_request = auth.canonical_request(request)
    await trio.lowlevel.checkpoint()
    string_to_sign = auth.string_to_sign(request, canonical_request)
    await trio.lowlevel.checkpoint()
    if keys is None:
        signature = auth.signature(string_to_sign, request)
    else:
        key = keys.key(auth, request.context["timestamp"][0:8])
        signature = auth._sign(key, string_to_sign, hex=True)
    await trio.lowlevel.checkpoint()
    auth._inject_signature_to_request(request, signature)


def _next_cycle(connection: _Connection) -> bool:
    """Ready ``connection`` for its next exchange; False when it must be closed."""
    http = connection.http
    if http.our_state is h11.DONE and http.their_state is h11.DONE:
        http.start_next_cycle()
        return True
    return False


def _needs_refresh(credentials: Any) -> bool:
    check = getattr(credentials, "refresh_needed", None)
    return bool(check()) if check is not None else False


async def _send_body(stream: trio.abc.Stream, view: memoryview) -> None:
    """Send ``view`` in `SEND_SLICE` pieces, yielding the loop between them."""
    if _send_in_place is not None and isinstance(stream, trio.SocketStream):
        await _send_in_place(stream.socket, view)
        return
    for start in range(0, len(view), SEND_SLICE):
        await stream.send_all(view[start:start + SEND_SLICE])


def _make_send_in_place() -> Any:
    """On PyPy, a sender that gives the kernel the body where it lies.

    PyPy's ``socket.send`` copies a memoryview into a new string first (a
    2 MB batch made 2 MB of garbage per call, and a send that went out in
    part was copied again); calling libc's ``send`` through cffi on a
    pointer to the buffer copies nothing.  None elsewhere: CPython's
    ``send`` reads a memoryview in place, and TLS streams encrypt anyway.
    """
    ffi = pypy_ffi()
    if ffi is None:
        return None
    ffi.cdef("long send(int sockfd, const void *buf, unsigned long len, int flags);")
    try:
        libc = ffi.dlopen(None)
    except OSError:  # pragma: no cover
        return None
    flags = getattr(socket, "MSG_NOSIGNAL", 0) | socket.MSG_DONTWAIT
    again = (errno.EAGAIN, errno.EWOULDBLOCK)

    async def send(sock: Any, view: memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        size = len(view)
        pointer = ffi.from_buffer(view)
        done = 0
        while done < size:
            sent = libc.send(sock.fileno(), pointer + done, min(SEND_SLICE, size - done), flags)
            if sent < 0:
                code = ffi.errno
                if code in again:
                    await trio.lowlevel.wait_writable(sock)
                elif code != errno.EINTR:
                    raise OSError(code, os.strerror(code))
                continue
            done += sent
            await trio.lowlevel.checkpoint()

    return send


_send_in_place = _make_send_in_place()


async def _sha256_hex(body: Any) -> str:
    view = memoryview(body)
    digest = Sha256()
    for start in range(0, len(view), HASH_SLICE):
        if start:
            await trio.lowlevel.checkpoint()
        digest.update(view[start:start + HASH_SLICE])
    return digest.hexdigest()
