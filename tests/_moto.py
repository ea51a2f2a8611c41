"""A real AWS endpoint for tests: moto's server mode (as ThreadedMotoServer) on 127.0.0.1.

    from _moto import moto_server  # noqa: F401  (the module-scoped fixture)

    async def test_x(moto_server: MotoServer) -> None:
        url = moto_server.create_queue("confguard-test")       # a real SQS queue
        async with aws_client("sqs", region=moto_server.region,
                              endpoint_url=moto_server.endpoint_url) as sqs:
            ...

The server answers real HTTP (SQS, S3 with Object Lock, ...) on 127.0.0.1 at a free port, in
a thread of the test process; the product talks to it through its ordinary client with
`endpoint_url`. Fake credentials (`testing`) and the region are set in the ENVIRONMENT for
the fixture's lifetime only (the product reads the standard AWS chain, as in production),
and the shared config files and the instance metadata service are switched off so no real
credential on the machine is ever read. moto keeps its state per process: give each test
its own queue/bucket names (`unique_name`), or call `reset()`.

`stop()` / `start()` take the endpoint away and bring it back on the SAME port with its
state kept (moto's backends live in the process): the "AWS unreachable for a while" tests.
When moto is not installed the tests SKIP and say so, or FAIL when `CI` is set (`.ci/run`
installs the test extras).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["MotoServer", "moto_server", "unique_name"]

_COUNTER = itertools.count(1)

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
    "AWS_REGION": "eu-west-1",
    "AWS_CONFIG_FILE": "/nonexistent/confguard-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/confguard-tests/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
          "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_S3")


def unique_name(prefix: str = "confguard") -> str:
    """A queue/bucket name no other test of this process uses (lowercase, S3-safe)."""
    return f"{prefix}-{os.getpid()}-{next(_COUNTER)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """One moto server thread on 127.0.0.1. `endpoint_url` for every client; `region`
    is the fixture's region. Synchronous helpers (boto3 is installed with moto) set up
    resources without the product's code."""

    region = ENV["AWS_DEFAULT_REGION"]

    def __init__(self) -> None:
        self.port = _free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Serve on `port` (the same one after a `stop()`); waits until it answers."""
        if self._server is not None:
            return
        # What moto's ThreadedMotoServer does, except that the socket is bound HERE, so a
        # bind error raises instead of leaving start() waiting for a thread that died.
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        deadline = time.monotonic() + 10.0
        while True:
            try:
                server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                                     threaded=True, request_handler=MotoRequestHandler)
                break
            except OSError:  # the port still held after stop(): bounded retry
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering: connections are refused until `start()` (state is kept)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    @contextlib.contextmanager
    def denying(self) -> Iterator[None]:
        """While inside: moto checks IAM on every request, and the fixture's credentials
        name no IAM user, so every call is refused (InvalidClientTokenId, HTTP 403), as AWS
        refuses a key without permission. moto reads the switch per request."""
        from moto import settings

        old = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = old

    def boto3(self, service: str) -> Any:
        """A plain (synchronous) boto3 client for setting up and inspecting resources."""
        import boto3

        return boto3.client(service, region_name=self.region, endpoint_url=self.endpoint_url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_queue(self, name: str | None = None, *, visibility_timeout: int = 30,
                     dead_letter_arn: str | None = None, max_receive_count: int = 5) -> str:
        """Create an SQS queue and return its URL."""
        attrs = {"VisibilityTimeout": str(visibility_timeout)}
        if dead_letter_arn is not None:
            attrs["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": dead_letter_arn,
                                                 "maxReceiveCount": max_receive_count})
        out = self.boto3("sqs").create_queue(QueueName=name or unique_name(), Attributes=attrs)
        return str(out["QueueUrl"])

    def queue_arn(self, url: str) -> str:
        got = self.boto3("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(got["Attributes"]["QueueArn"])

    def queue_depth(self, url: str) -> tuple[int, int]:
        """(visible, in flight) messages of a queue."""
        got = self.boto3("sqs").get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        a = got["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    """A moto server for the module, with fake AWS credentials in the environment."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("moto[server] is not installed (the test extras: pip install -e '.[test]')")
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        for key in _UNSET:
            mp.delenv(key, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        server = MotoServer()
        server.start()
        try:
            yield server
        finally:
            server.stop()
