"""OTLP/HTTP logs from real OpenTelemetry clients to a real ``sluice serve --redis``.

The OpenTelemetry Python SDK's ``OTLPLogExporter`` (opentelemetry-exporter-otlp-proto-http)
sends batches of log records with an API key, with and without gzip, configured
the way users do (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``)
or with a full logs URL.  The exporter must report success, and every stored
record, read back from the file sink, must decode with opentelemetry-proto into
exactly the request the exporter built for that batch: one record per batch,
none lost, none twice.  Over a tenant's rate limit the exporter sees ``429``
with ``Retry-After``, waits, retries, and still nothing is lost or duplicated.
The SDK has no JSON exporter, so JSON is a hand-built request from the same
records (protobuf's JSON mapping, enums as integers, as OTLP/JSON wants).
With ``--ack kinesis`` (moto as Kinesis) the exporter's success means the
record is already in the stream.  Last, the decoder docs/opentelemetry.md
gives consumers reads every record.

The client packages are CPython-only test dependencies (tox.ini); the module is
skipped where they are not installed (PyPy).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
import uuid
import zlib
from typing import Any, Dict, List, Sequence, Tuple

import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http",
                    reason="the OpenTelemetry clients need Python 3.10+: a CPython-only test dependency")

from google.protobuf import json_format  # noqa: E402
from google.rpc.status_pb2 import Status  # noqa: E402
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs  # noqa: E402
from opentelemetry.exporter.otlp.proto.http import Compression  # noqa: E402
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter  # noqa: E402
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (  # noqa: E402
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord  # noqa: E402
from opentelemetry.sdk._logs.export import (  # noqa: E402
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402

from gateway.access import keystore  # noqa: E402
from sinks.file import read_records  # noqa: E402
from tests.support.gateway import (  # noqa: E402
    RawConnection,
    get_request,
    http_post,
    running_gateway,
    stored,
)
from tests.support.kinesis import aws_env_fixture, moto_fixture, read_stream  # noqa: E402, F401 - fixtures
from tests.support.redis import RedisServer  # noqa: E402

BATCHES = 4
RECORDS_PER_BATCH = 5
#: Key lookups cached this long in the gateway.
KEY_CACHE_TTL = 1.0


@pytest.fixture(scope="module")
def gateway(redis_module: RedisServer, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("otlp-data"))
    with running_gateway(["--redis", redis_module.url, "--key-cache-ttl", "%gs" % KEY_CACHE_TTL],
                         data_dir=data_dir) as proc:
        yield proc


def new_key(admin: Any, tenant: str, **limits: Any) -> str:
    return keystore.create_key(admin, tenant, time.time(), **limits).api_key


def make_batches(tag: str, batches: int = BATCHES,
                 size: int = RECORDS_PER_BATCH) -> List[Sequence[ReadableLogRecord]]:
    """Log records made by the SDK (resource, scope, severity, attributes), in batches."""
    captured = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "sluice-test-" + tag}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(captured))
    logger = provider.get_logger("tests.otlp", "1.0")
    for n in range(batches * size):
        logger.emit(body="%s record %d" % (tag, n), severity_text="INFO",
                    attributes={"n": n, "tag": tag, "ok": n % 2 == 0})
    provider.shutdown()
    records = list(captured.get_finished_logs())
    assert len(records) == batches * size
    return [records[i:i + size] for i in range(0, len(records), size)]


def records_of(data_dir: str, tenant: str) -> List[Tuple[dict, bytes]]:
    """``(envelope, body)`` of the tenant's stored records, in id (= arrival) order."""
    return [record for _, record in sorted(stored(data_dir).items()) if record[0]["tenant"] == tenant]


def wait_for_count(data_dir: str, tenant: str, count: int, timeout: float = 15.0) -> List[Tuple[dict, bytes]]:
    deadline = time.monotonic() + timeout
    while True:
        found = records_of(data_dir, tenant)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def decode(meta: dict, body: bytes) -> ExportLogsServiceRequest:
    """What a consumer does: undo the recorded encoding, then parse by the recorded type."""
    encoding = meta["content_encoding"]
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    else:
        assert encoding is None, meta
    if meta["content_type"] == "application/x-protobuf":
        return ExportLogsServiceRequest.FromString(body)
    assert meta["content_type"] == "application/json", meta
    return json_format.Parse(body, ExportLogsServiceRequest())


def bodies(request: ExportLogsServiceRequest) -> List[str]:
    return [record.body.string_value
            for resource in request.resource_logs
            for scope in resource.scope_logs
            for record in scope.log_records]


def export_all(exporter: OTLPLogExporter, batches: Sequence[Sequence[ReadableLogRecord]]) -> None:
    try:
        for batch in batches:
            assert exporter.export(batch) is LogRecordExportResult.SUCCESS
    finally:
        exporter.shutdown()


def assert_stored_exactly(gateway, tenant: str, batches: Sequence[Sequence[ReadableLogRecord]],
                          encoding: Any) -> None:
    """One record per batch, in order, each decoding to the batch's own request."""
    found = wait_for_count(gateway.data_dir, tenant, len(batches))
    time.sleep(0.2)  # a duplicate would be written by now too
    found = records_of(gateway.data_dir, tenant)
    assert len(found) == len(batches), [meta for meta, _ in found]
    for (meta, body), batch in zip(found, batches):
        assert meta["content_type"] == "application/x-protobuf"
        assert meta["content_encoding"] == encoding
        request = decode(meta, body)
        assert request == encode_logs(batch)
        assert bodies(request) == [record.log_record.body for record in batch]


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip],
                         ids=["plain", "gzip"])
def test_sdk_exporter_with_the_base_endpoint_and_headers_from_the_environment(
        gateway, admin, monkeypatch, compression):
    tenant = "SDK_ENV_%s" % compression.name.upper()
    key = new_key(admin, tenant)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", gateway.url("/otlp"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20" + key)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_LOGS_HEADERS", raising=False)
    batches = make_batches(tenant)
    export_all(OTLPLogExporter(compression=compression), batches)
    assert_stored_exactly(gateway, tenant, batches, "gzip" if compression is Compression.Gzip else None)


def test_sdk_exporter_with_a_full_logs_url_and_x_api_key(gateway, admin):
    tenant = "SDK_URL"
    key = new_key(admin, tenant)
    batches = make_batches(tenant, batches=2)
    export_all(OTLPLogExporter(endpoint=gateway.url("/otlp/v1/logs"), headers={"X-API-Key": key},
                               compression=Compression.Deflate), batches)
    assert_stored_exactly(gateway, tenant, batches, "deflate")


def _otlp_answers(gateway) -> Dict[str, int]:
    """``sluice_http_requests_total`` of the OTLP route, by status."""
    with RawConnection(gateway.address) as conn:
        conn.send(get_request("/metrics", close=True))
        text = conn.read_response().body.decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith('sluice_http_requests_total{route="/otlp/v1/logs"'):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_throttled_exporter_retries_after_retry_after_and_nothing_is_lost_or_doubled(gateway, admin):
    tenant = "SDK_THROTTLED"
    # Two requests at once, then one a second: six back-to-back batches meet 429s.
    key = new_key(admin, tenant, requests_per_second=1, burst=2)
    batches = make_batches(tenant, batches=6, size=3)
    before = _otlp_answers(gateway).get("429", 0)
    export_all(OTLPLogExporter(endpoint=gateway.url("/otlp/v1/logs"),
                               headers={"Authorization": "Bearer " + key},
                               compression=Compression.Gzip, timeout=30), batches)
    assert _otlp_answers(gateway).get("429", 0) > before, "the exporter was never throttled"
    assert_stored_exactly(gateway, tenant, batches, "gzip")


def test_exporter_with_a_wrong_key_fails_without_retrying(gateway, admin):
    batches = make_batches("SDK_NOKEY", batches=1)
    before = _otlp_answers(gateway).get("401", 0)
    exporter = OTLPLogExporter(endpoint=gateway.url("/otlp/v1/logs"),
                               headers={"Authorization": "Bearer " + keystore.new_api_key("NOBODY")})
    try:
        assert exporter.export(batches[0]) is LogRecordExportResult.FAILURE
    finally:
        exporter.shutdown()
    assert _otlp_answers(gateway).get("401", 0) == before + 1


def test_with_ack_kinesis_success_means_the_batch_is_in_the_stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    stream = "otlp-" + uuid.uuid4().hex[:12]
    client.create_stream(StreamName=stream, ShardCount=1)
    batches = make_batches("KINESIS", batches=2)
    flags = ["--sink", "kinesis", "--stream", stream, "--endpoint-url", moto.url, "--ack", "kinesis"]
    with running_gateway(flags) as proc:
        exporter = OTLPLogExporter(endpoint=proc.url("/otlp/v1/logs"), compression=Compression.Gzip)
        try:
            for n, batch in enumerate(batches, 1):
                assert exporter.export(batch) is LogRecordExportResult.SUCCESS
                # Acknowledged only once Kinesis stored it: it is there already.
                records = read_stream(client, stream)
                assert len(records) == n
                meta_line, _, body = records[-1]["Data"].partition(b"\n")
                assert decode(json.loads(meta_line), body) == encode_logs(batch)
        finally:
            exporter.shutdown()


# -- hand-built requests: JSON, and the answers' bytes -----------------------------------


def _otlp_json(batch: Sequence[ReadableLogRecord]) -> bytes:
    return json_format.MessageToJson(encode_logs(batch), use_integers_for_enums=True).encode()


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_json_request_gets_an_empty_json_response_and_is_stored_untouched(gateway, admin, gzipped):
    tenant = "JSON_%s" % ("GZIP" if gzipped else "PLAIN")
    key = new_key(admin, tenant)
    (batch,) = make_batches(tenant, batches=1)
    body = _otlp_json(batch)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + key}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    status, answer_headers, answer = http_post(gateway.address, body, headers, path="/otlp/v1/logs")
    assert (status, answer_headers["content-type"], answer) == (200, "application/json", b"{}")
    assert json_format.Parse(answer, ExportLogsServiceResponse()) == ExportLogsServiceResponse()
    (meta, stored_body), = wait_for_count(gateway.data_dir, tenant, 1)
    assert stored_body == body
    assert (meta["content_type"], meta["content_encoding"]) == (
        "application/json", "gzip" if gzipped else None)
    assert decode(meta, stored_body) == encode_logs(batch)


def test_protobuf_answers_parse_as_otlp_messages(gateway, admin):
    tenant = "PROTO_ANSWERS"
    key = new_key(admin, tenant)
    (batch,) = make_batches(tenant, batches=1)
    body = encode_logs(batch).SerializeToString()
    headers = {"Content-Type": "application/x-protobuf", "Authorization": "Bearer " + key}
    status, answer_headers, answer = http_post(gateway.address, body, headers, path="/otlp/v1/logs")
    assert (status, answer_headers["content-type"]) == (200, "application/x-protobuf")
    assert ExportLogsServiceResponse.FromString(answer) == ExportLogsServiceResponse()
    (meta, stored_body), = wait_for_count(gateway.data_dir, tenant, 1)
    assert stored_body == body
    # Failures: a google.rpc.Status in the request's encoding.
    headers["Authorization"] = "Bearer " + keystore.new_api_key("NOBODY")
    status, answer_headers, answer = http_post(gateway.address, body, headers, path="/otlp/v1/logs")
    assert (status, answer_headers["content-type"]) == (401, "application/x-protobuf")
    assert answer_headers["www-authenticate"] == 'Bearer realm="sluice"'
    failure = Status.FromString(answer)
    assert failure.code == 16 and failure.message  # UNAUTHENTICATED
    headers["Content-Type"] = "application/json"
    status, answer_headers, answer = http_post(gateway.address, b"{}", headers, path="/otlp/v1/logs")
    assert (status, answer_headers["content-type"]) == (401, "application/json")
    doc = json.loads(answer)
    assert json_format.ParseDict(doc, Status()).code == 16


def _documented_decoder():
    """The ``otlp_logs`` function docs/opentelemetry.md gives consumers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "docs", "opentelemetry.md")
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    (code,) = [block for block in blocks if "def otlp_logs" in block]
    namespace: Dict[str, Any] = {}
    exec(code.split("\n\n\nfor ")[0], namespace)  # the function, not the loop that prints
    return namespace["otlp_logs"]


def test_the_documented_decoder_reads_every_otlp_record(gateway):
    otlp_logs = _documented_decoder()
    found = 0
    for record in read_records(gateway.data_dir):
        data = bytes(record)
        meta_line, _, body = data.partition(b"\n")
        meta = json.loads(meta_line)
        if meta["content_type"] not in ("application/x-protobuf", "application/json"):
            continue
        request = otlp_logs(data)
        assert request == decode(meta, body)
        assert bodies(request)
        found += 1
    assert found >= BATCHES  # the records of the tests above (protobuf and JSON, gzip or not)
