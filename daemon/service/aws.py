"""The one way confguard talks to AWS (SQS for the EventBridge source, S3 for the audit).

    async with aws_client("sqs", region="eu-west-1", endpoint_url=None) as sqs:
        await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)

`aws_client` returns aiobotocore's async context manager for one client. aiobotocore (and
botocore under it) is imported inside the call, never at module import: a daemon without
an AWS feature configured never loads it (tests/service/test_aws.py proves it).

Credentials come from the standard AWS chain only (environment, shared config and
credentials files, SSO, container or instance role), resolved by botocore itself: never
from config.yaml, never passed through this module, never logged. Error texts produced
here (`describe_aws_error`) carry the error code and AWS' message, which name no secret.

botocore's own retries are off (one attempt per call): callers retry with the project's one
policy (`daemon.genesys.retry.RetryPolicy`), so that waiting, counting and logging are the
same everywhere. Timeouts are seconds; `read_timeout` must exceed the longest SQS long poll.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal

from daemon.config.values import queue_region

__all__ = [
    "AwsFailure",
    "AwsService",
    "aws_client",
    "describe_aws_error",
    "region_from_queue_url",
]

AwsService = Literal["sqs", "s3"]

def region_from_queue_url(url: str) -> str | None:
    """The AWS region named by an SQS queue URL's host, or None (a local endpoint, a VPC
    endpoint, anything else: then the region must be configured). `config.values.queue_region`."""
    return queue_region(url)


def aws_client(
    service: AwsService,
    *,
    region: str | None,
    endpoint_url: str | None,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
) -> AbstractAsyncContextManager[Any]:
    """An aiobotocore client for `service` as an async context manager (enter to use, exit
    closes its connection pool). `region` None: botocore's chain (AWS_REGION,
    AWS_DEFAULT_REGION, the shared config). `endpoint_url` None: AWS itself; set for a
    local endpoint (moto in the tests, the sandbox). Timeouts in seconds; one attempt per
    call (retries are the caller's, with the project's retry policy)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    session = get_session()
    client: AbstractAsyncContextManager[Any] = session.create_client(
        service, region_name=region, endpoint_url=endpoint_url, config=config
    )
    return client


AwsErrorKind = Literal["unreachable", "access_denied", "credentials", "not_found", "throttled", "other"]


@dataclass(frozen=True, slots=True)
class AwsFailure:
    """What an AWS call's exception means. `kind` is a stable metric/log label;
    `transient` says whether trying again may help (everything but a missing resource
    and malformed requests: credentials and permissions are often fixed while we wait);
    `message` is for operators and carries no secret."""

    kind: AwsErrorKind
    code: str
    message: str
    transient: bool


_ACCESS_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "UnrecognizedClientException",
    "InvalidSecurity", "KMS.AccessDeniedException",
})
_NOT_FOUND_CODES = frozenset({
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue",
    "NoSuchBucket", "NoSuchKey", "404",
})
_THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestThrottled", "SlowDown", "TooManyRequestsException",
    "RequestThrottledException", "ServiceUnavailable", "InternalError", "InternalFailure", "500", "503",
})


def describe_aws_error(exc: BaseException) -> AwsFailure:
    """Classify an exception raised by an aiobotocore call (or the connection under it)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - only called after a client existed
        return AwsFailure("other", type(exc).__name__, str(exc), True)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        code = str(err.get("Code") or "")
        text = str(err.get("Message") or "") or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(
            exc.response, dict) else None
        if code in _ACCESS_CODES or status == 403:
            return AwsFailure("access_denied", code or "403", text, True)
        if code in _NOT_FOUND_CODES:
            return AwsFailure("not_found", code, text, False)
        if code in _THROTTLE_CODES or (isinstance(status, int) and status >= 500):
            return AwsFailure("throttled", code or str(status), text, True)
        return AwsFailure("other", code or type(exc).__name__, text, False)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                        bx.NoRegionError)):
        return AwsFailure("credentials", type(exc).__name__, str(exc), True)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
                        bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return AwsFailure("unreachable", type(exc).__name__, str(exc), True)
    if isinstance(exc, (OSError, TimeoutError)):
        return AwsFailure("unreachable", type(exc).__name__, str(exc) or type(exc).__name__, True)
    return AwsFailure("other", type(exc).__name__, str(exc), True)
