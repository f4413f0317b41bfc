from __future__ import annotations

import botocore.parsers
import pytest

from sinks.aws.errors import (
    MESSAGE_MAX_CHARS,
    CredentialsError,
    PermanentError,
    ServiceError,
    ThrottledError,
    TransientError,
    classify_error,
    classify_record_error,
)

HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 2000 + b"</body></html>"
CORAL = ":http://internal.amazon.com/coral/com.amazon.coral.service/"

# (status, body, x-amzn-ErrorType, class, code) shaped like real answers.
CASES = [
    (400, b'{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for '
          b'stream logs under account 111122223333."}', None,
     ThrottledError, "ProvisionedThroughputExceededException"),
    (400, b'{"__type":"KMSThrottlingException","message":"Rate exceeded"}', None,
     ThrottledError, "KMSThrottlingException"),
    (400, b'{"__type":"LimitExceededException","message":"Rate exceeded for stream logs"}', None,
     ThrottledError, "LimitExceededException"),
    (400, b'{"__type":"ThrottlingException","message":"Rate exceeded"}', None,
     ThrottledError, "ThrottlingException"),
    (503, b'{"__type":"ServiceUnavailableException","message":"Slow down."}', None,
     ThrottledError, "ServiceUnavailableException"),
    (429, b"", None, ThrottledError, "HTTP 429"),
    (500, b'{"__type":"InternalFailure","message":"Internal service failure."}', None,
     TransientError, "InternalFailure"),
    (500, b'{"__type":"InternalFailureException"}', None, TransientError, "InternalFailureException"),
    (503, b'{"__type":"ServiceUnavailable"}', None, TransientError, "ServiceUnavailable"),
    (502, HTML_502, None, TransientError, "HTTP 502"),
    (504, b"", None, TransientError, "HTTP 504"),
    (500, b'{"__type":"SomethingNewException"}', None, TransientError, "SomethingNewException"),
    (400, b'{"__type":"ResourceNotFoundException","message":"Stream logs under account '
          b'111122223333 not found."}', None, PermanentError, "ResourceNotFoundException"),
    (400, b'{"__type":"com.amazonaws.kinesis.v20131202#ResourceNotFoundException"}', None,
     PermanentError, "ResourceNotFoundException"),
    (400, b'{"__type":"AccessDeniedException","Message":"User: arn:aws:iam::1:user/x is not '
          b'authorized to perform: kinesis:PutRecords"}', None, PermanentError, "AccessDeniedException"),
    (400, b'{"__type":"ValidationException","message":"1 validation error detected"}', None,
     PermanentError, "ValidationException"),
    (400, b'{"__type":"InvalidArgumentException","message":"Records size exceeds 5 MB limit"}',
     None, PermanentError, "InvalidArgumentException"),
    (400, b'{"__type":"KMSAccessDeniedException"}', None, PermanentError, "KMSAccessDeniedException"),
    (400, b'{"__type":"KMSDisabledException"}', None, PermanentError, "KMSDisabledException"),
    (400, b'{"__type":"KMSInvalidStateException"}', None, PermanentError, "KMSInvalidStateException"),
    (400, b'{"__type":"KMSNotFoundException"}', None, PermanentError, "KMSNotFoundException"),
    (400, b'{"__type":"KMSOptInRequired"}', None, PermanentError, "KMSOptInRequired"),
    (400, b'{"__type":"InvalidKMSResourceException"}', None, PermanentError, "InvalidKMSResourceException"),
    (400, b'{"__type":"SerializationException"}', None, PermanentError, "SerializationException"),
    (413, b"", None, PermanentError, "HTTP 413"),
    (400, b'{"__type":"SomethingNewException"}', None, PermanentError, "SomethingNewException"),
    (400, b'{"__type":"ExpiredTokenException","message":"The security token included in the '
          b'request is expired"}', None, CredentialsError, "ExpiredTokenException"),
    (400, b'{"__type":"UnrecognizedClientException","message":"The security token included in '
          b'the request is invalid."}', None, CredentialsError, "UnrecognizedClientException"),
    (400, b'{"__type":"InvalidSignatureException","message":"Signature expired: 20240101T000000Z '
          b'is now earlier than 20240101T000400Z"}', None, CredentialsError, "InvalidSignatureException"),
    (403, b'{"__type":"IncompleteSignatureException"}', None, CredentialsError,
     "IncompleteSignatureException"),
    (403, b'{"message":"The security token included in the request is invalid."}',
     "UnrecognizedClientException" + CORAL, CredentialsError, "UnrecognizedClientException"),
    (403, b'{"__type":"MissingAuthenticationTokenException:' + CORAL[1:].encode() + b'"}',
     None, CredentialsError, "MissingAuthenticationTokenException"),
]


@pytest.mark.parametrize("status,body,header,cls,code", CASES)
def test_classify_error(status, body, header, cls, code):
    error = classify_error(status, body, header)
    assert type(error) is cls
    assert error.code == code and error.status == status
    assert isinstance(error, ServiceError)
    assert error.retryable is issubclass(cls, TransientError)
    assert len(error.message) <= MESSAGE_MAX_CHARS


@pytest.mark.parametrize("status,body,header,cls,code", [c for c in CASES if c[1].startswith(b"{")])
def test_codes_and_messages_match_botocores_parser(status, body, header, cls, code):
    headers = {"x-amzn-ErrorType": header} if header else {}
    parsed = botocore.parsers.create_parser("json").parse(
        {"status_code": status, "headers": headers, "body": body}, None)
    ours = classify_error(status, body, header)
    if "__type" in body.decode():
        assert parsed["Error"]["Code"] == ours.code
    assert parsed["Error"]["Message"] == ours.message


def test_memoryview_and_text_bodies():
    body = b'{"__type":"InternalFailure","message":"m"}'
    assert classify_error(500, memoryview(body)).code == "InternalFailure"
    error = classify_error(502, HTML_502)
    assert error.message.startswith("<html>") and len(error.message) == MESSAGE_MAX_CHARS


@pytest.mark.parametrize("code,cls", [
    ("ProvisionedThroughputExceededException", ThrottledError),
    ("KMSThrottlingException", ThrottledError),
    ("ServiceUnavailableException", ThrottledError),
    ("InternalFailure", TransientError),
    ("KMSAccessDeniedException", PermanentError),
    ("KMSDisabledException", PermanentError),
    ("KMSNotFoundException", PermanentError),
    ("KMSInvalidStateException", PermanentError),
    ("KMSOptInRequired", PermanentError),
    ("SomeFutureRecordError", TransientError),
])
def test_classify_record_error(code, cls):
    error = classify_record_error(code, "why")
    assert type(error) is cls and error.status is None
    assert str(error) == code + ": why"


def test_errors_are_raisable():
    with pytest.raises(TransientError):
        raise classify_error(503, b"")
