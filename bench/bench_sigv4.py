"""SigV4 of a 5 MiB PutRecords call, as ``sinks.aws.http.BotocoreEndpoint`` signs it.

The payload's SHA-256 goes into ``X-Amz-Content-SHA256`` (hashed from the
batch's memoryview), botocore's ``SigV4Auth`` signs the request with static
credentials, and the body joins the prepared request afterwards.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from sinks.aws.limits import JSON_CONTENT_TYPE, KINESIS_TARGET_PREFIX

SIZE = 5 * 1024 * 1024
URL = "https://kinesis.eu-west-1.amazonaws.com/"


@pytest.mark.parametrize("hashed", [True, False], ids=["hash+sign", "sign-only"])
def test_sign_batch(benchmark, throughput, hashed: bool) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    static = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    credentials = static.get_frozen_credentials()
    body = memoryview(bytearray(os.urandom(SIZE)))
    known = hashlib.sha256(body).hexdigest()

    def sign():
        request = AWSRequest(method="POST", url=URL, headers={
            "X-Amz-Target": KINESIS_TARGET_PREFIX + ".PutRecords",
            "Content-Type": JSON_CONTENT_TYPE,
            "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest() if hashed else known,
        })
        SigV4Auth(credentials, "kinesis", "eu-west-1").add_auth(request)
        prepared = request.prepare()
        prepared.body = body
        prepared.headers["Content-Length"] = str(len(body))
        return prepared

    prepared = benchmark(sign)
    assert str(prepared.headers["Authorization"]).startswith("AWS4-HMAC-SHA256")
    if hashed:
        throughput(SIZE)
