"""The HTTP edge of the Kinesis and Firehose sinks: sign one call and send it.

Theory of operation
-------------------
The Trio driver (``sinks.aws.sink``) sees an `Endpoint`: ``await
call(target, body)`` returns a `Reply` (any HTTP status) or raises a
`~sinks.aws.errors.ServiceError` when no answer came (connection refused or
reset, timeout) or the request could not be signed (no credentials).
`MemoryEndpoint` is the in-memory twin for tests without sockets.

`BotocoreEndpoint` does each call in a Trio worker thread, because every
step of it can block: credentials (``get_frozen_credentials`` refreshes
them ahead of expiry, which may call STS, the container or the instance
metadata service), SigV4 (a SHA-256 of the whole body, up to 10 MiB),
TLS and the network wait.  It uses botocore's own pieces: a
``botocore.session.Session`` for the standard chain of credentials, region
and endpoint (flags, environment, shared config and credentials files,
profiles, web identity, container and instance metadata), ``SigV4Auth`` on an
``AWSRequest``, and ``URLLib3Session`` (connection pooling, TLS with the
configured CA bundle, proxies from the environment).  Calls are not
abandoned on cancellation: the body is the batch's buffer, which must not be
reused while a thread still sends it; urllib3's connect and read timeouts
bound how long a thread can take.

Copies: the body goes through as a ``memoryview`` of the batch buffer.  It
is hashed in place (`sinks.digests.sha256_hex`, which on PyPy does not
copy it as ``hashlib.sha256`` would) into the
``X-Amz-Content-SHA256`` header, which ``SigV4Auth`` signs instead of
hashing the body itself, and it is attached to the prepared request after
botocore's preparer ran (that preparer compares the body with ``b""``, which
on PyPy copies a memoryview: 5 ms and 7 MB per 5 MiB batch); urllib3 passes
it to ``sendall``.  On HTTPS, TLS encryption is the one copy on the way out.
Foreign exceptions are translated here, once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Optional

import trio

from sinks.aws.errors import CredentialsError, TransientError
from sinks.aws.limits import JSON_CONTENT_TYPE
from sinks.digests import sha256_hex

__all__ = [
    "Reply",
    "Endpoint",
    "MemoryEndpoint",
    "BotocoreEndpoint",
    "open_botocore_endpoint",
    "ResolvedEndpoint",
    "resolve_endpoint",
    "NoRegion",
]


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, body, and the ``x-amzn-ErrorType`` header if any."""

    status: int
    body: bytes
    error_type: Optional[str] = None


class NoRegion(ValueError):
    """No region was given and botocore's chain has none either."""


class Endpoint:
    """Where a sink's calls go."""

    #: Shown at start, e.g. ``https://kinesis.eu-west-1.amazonaws.com``.
    url = ""
    region = ""

    async def call(self, target: str, body: Any, digest: Optional[str] = None) -> Reply:
        """POST ``body`` (bytes or a memoryview) as operation ``target``.

        ``digest`` is the body's SHA-256 in hex when the caller has it already
        (the sink hashes large batches in the worker thread that encoded
        them), so the call does not hash the body again.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections."""


class MemoryEndpoint(Endpoint):
    """Hands each call to ``handler(target, body)``, a coroutine function, in this task."""

    url = "memory:"
    region = "memory"

    def __init__(self, handler: Callable[[str, Any], Awaitable[Reply]]) -> None:
        self._handler = handler
        self.calls = 0

    async def call(self, target: str, body: Any, digest: Optional[str] = None) -> Reply:
        self.calls += 1
        return await self._handler(target, body)


@dataclass(frozen=True)
class ResolvedEndpoint:
    """Where botocore's chain says a service's calls go, and how to trust it."""

    session: Any
    url: str
    region: str
    signing_name: str
    #: True, or the path of a CA bundle (``AWS_CA_BUNDLE``, ``ca_bundle``).
    verify: Any


def resolve_endpoint(service: str, *, region: str = "", endpoint_url: str = "",
                     session: Any = None) -> ResolvedEndpoint:
    """Endpoint URL, region and signing name of ``service`` from botocore's chain.

    Blocking (reads config files): call it from a worker thread.  Raises
    `NoRegion` when no region is configured anywhere.  Without ``session``,
    the returned one is fresh: calls need only its credentials.
    """
    import botocore.exceptions
    import botocore.session

    own_session = session is None
    if session is None:
        session = botocore.session.Session()
    try:
        client = session.create_client(service, region_name=region or None,
                                       endpoint_url=endpoint_url or None)
    except botocore.exceptions.NoRegionError as exc:
        raise NoRegion("no AWS region configured") from exc
    try:
        url = client.meta.endpoint_url
        resolved_region = client.meta.region_name
        signing_name = client.meta.service_model.signing_name or service
    finally:
        client.close()
    verify: Any = session.get_config_variable("ca_bundle") or True
    if own_session:
        # Building the client left the endpoint rules, partitions and service
        # model cached in the session: about 11 MB of PyPy's heap that every
        # major collection would walk again, for a session kept only for its
        # credentials.
        session = botocore.session.Session()
    return ResolvedEndpoint(session, url, resolved_region, signing_name, verify)


def open_botocore_endpoint(service: str, *, region: str = "", endpoint_url: str = "",
                           connections: int = 4, timeout: float = 6.0,
                           session: Any = None) -> BotocoreEndpoint:
    """A `BotocoreEndpoint` for ``service`` (``"kinesis"`` or ``"firehose"``).

    Blocking (reads config files): call it from a worker thread.  Raises
    `NoRegion` when no region is configured anywhere.
    """
    from botocore.httpsession import URLLib3Session
    from botocore.utils import get_environ_proxies

    resolved = resolve_endpoint(service, region=region, endpoint_url=endpoint_url, session=session)
    http = URLLib3Session(verify=resolved.verify, proxies=get_environ_proxies(resolved.url),
                          timeout=(timeout, timeout), max_pool_connections=connections)
    return BotocoreEndpoint(resolved.session, http, resolved.url, resolved.region,
                            resolved.signing_name, threads=connections)


class BotocoreEndpoint(Endpoint):
    """Signs with botocore's SigV4 and sends with botocore's URLLib3Session, in threads."""

    def __init__(self, session: Any, http: Any, url: str, region: str, signing_name: str,
                 *, threads: int = 4) -> None:
        self.session = session
        self.url = url
        self.region = region
        self.signing_name = signing_name
        self._http = http
        self._credentials: Any = None
        self._credentials_lock = threading.Lock()
        # Its own limiter, so calls never wait behind other sinks' threads.
        self._limiter = trio.CapacityLimiter(max(1, threads))

    async def call(self, target: str, body: Any, digest: Optional[str] = None) -> Reply:
        return await trio.to_thread.run_sync(self.call_blocking, target, body, digest,
                                             limiter=self._limiter)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._http.close, limiter=self._limiter)

    # -- the worker thread's side -------------------------------------------

    def frozen_credentials(self) -> Any:
        """Credentials for one call, refreshed first when near expiry (blocking)."""
        import botocore.exceptions

        try:
            with self._credentials_lock:
                if self._credentials is None:
                    self._credentials = self.session.get_credentials()
                credentials = self._credentials
            if credentials is None:
                raise CredentialsError(
                    "NoCredentials", "no AWS credentials found (environment, shared credentials "
                    "and config files, profile, web identity, container or instance metadata)")
            frozen = credentials.get_frozen_credentials()
        except (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                ConnectionError) as exc:
            raise TransientError("CredentialsUnreachable",
                                 "credential refresh failed: %s" % exc) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError("CredentialsRefreshFailed", str(exc)) from exc
        except botocore.exceptions.ClientError as exc:  # from STS while refreshing
            raise CredentialsError("CredentialsRefreshFailed", str(exc)) from exc
        if not frozen.access_key or not frozen.secret_key:
            raise CredentialsError("NoCredentials", "the credentials have no access key")
        return frozen

    def call_blocking(self, target: str, body: Any, digest: Optional[str] = None) -> Reply:
        """Sign and send one call; runs in a worker thread."""
        import botocore.exceptions
        import urllib3.exceptions
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = self.frozen_credentials()
        # The payload hash is given, so SigV4 never reads the body itself, and
        # the body joins the request only once prepared: botocore's preparer
        # compares the body with b"", which copies a memoryview on PyPy.
        request = AWSRequest(method="POST", url=self.url, headers={
            "X-Amz-Target": target,
            "Content-Type": JSON_CONTENT_TYPE,
            "X-Amz-Content-SHA256": digest or sha256_hex(body),
        })
        SigV4Auth(credentials, self.signing_name, self.region).add_auth(request)
        prepared = request.prepare()
        prepared.body = body
        prepared.headers["Content-Length"] = str(len(body))
        try:
            response = self._http.send(prepared)
            content = response.content
        except (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                urllib3.exceptions.HTTPError) as exc:
            # Refused, reset, timed out, or cut off while reading the answer.
            raise TransientError(type(exc).__name__, str(exc)) from exc
        except OSError as exc:
            raise TransientError("ConnectionError", str(exc)) from exc
        return Reply(response.status_code, content or b"",
                     _header(response.headers, "x-amzn-ErrorType"))


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    return str(value) if value is not None else None

