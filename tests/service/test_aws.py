"""daemon/service/aws.py against a real moto server on 127.0.0.1 (tests/_moto.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _moto import MotoServer, moto_server, unique_name  # noqa: F401

from daemon.service.aws import aws_client, describe_aws_error, region_from_queue_url


@pytest.mark.parametrize(("url", "region"), [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012/confguard-host-a", "eu-west-1"),
    ("https://sqs.us-gov-west-1.amazonaws.com/123456789012/q", "us-gov-west-1"),
    ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", "cn-north-1"),
    ("https://ap-southeast-2.queue.amazonaws.com/123456789012/q", "ap-southeast-2"),
    ("http://127.0.0.1:5000/123456789012/q", None),
    ("https://vpce-1a2b.sqs.eu-west-1.vpce.amazonaws.com/123456789012/q", None),
    ("not a url", None),
])
def test_region_from_queue_url(url: str, region: str | None) -> None:
    assert region_from_queue_url(url) == region


async def test_sqs_round_trip_and_s3(moto_server: MotoServer) -> None:  # noqa: F811
    url = moto_server.create_queue(unique_name("aws"))
    async with aws_client("sqs", region=moto_server.region, endpoint_url=moto_server.endpoint_url) as sqs:
        await sqs.send_message(QueueUrl=url, MessageBody='{"a": 1}')
        got = await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1, MaxNumberOfMessages=10)
        msgs = got.get("Messages", [])
        assert [m["Body"] for m in msgs] == ['{"a": 1}']
        await sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": "0", "ReceiptHandle": msgs[0]["ReceiptHandle"]}])
    assert moto_server.queue_depth(url) == (0, 0)
    bucket = unique_name("aws")
    async with aws_client("s3", region=moto_server.region, endpoint_url=moto_server.endpoint_url) as s3:
        await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto_server.region})
        await s3.put_object(Bucket=bucket, Key="k", Body=b"v")
        obj = await s3.get_object(Bucket=bucket, Key="k")
        async with obj["Body"] as body:
            assert await body.read() == b"v"


async def test_errors_are_classified(moto_server: MotoServer) -> None:  # noqa: F811
    async with aws_client("sqs", region=moto_server.region, endpoint_url=moto_server.endpoint_url) as sqs:
        with pytest.raises(Exception) as missing:
            await sqs.get_queue_attributes(QueueUrl=f"{moto_server.endpoint_url}/123456789012/nope-{unique_name()}",
                                           AttributeNames=["All"])
    failure = describe_aws_error(missing.value)
    assert (failure.kind, failure.transient) == ("not_found", False)
    # Nothing listens on a port we just freed: "unreachable", worth retrying.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with aws_client("sqs", region=moto_server.region, endpoint_url=dead, connect_timeout=2) as sqs:
        with pytest.raises(Exception) as refused:
            await sqs.get_queue_attributes(QueueUrl=f"{dead}/123456789012/q", AttributeNames=["All"])
    failure = describe_aws_error(refused.value)
    assert (failure.kind, failure.transient) == ("unreachable", True)
    assert "testing" not in failure.message  # the (fake) secret is never part of a message


async def test_stop_and_start_keep_the_queue(moto_server: MotoServer) -> None:  # noqa: F811
    url = moto_server.create_queue(unique_name("aws"))
    moto_server.stop()
    async with aws_client("sqs", region=moto_server.region, endpoint_url=moto_server.endpoint_url,
                          connect_timeout=2) as sqs:
        with pytest.raises(Exception) as down:
            await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        assert describe_aws_error(down.value).kind == "unreachable"
        moto_server.start()
        got = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
        assert got["Attributes"]["VisibilityTimeout"] == "30"


def test_importing_the_factory_loads_no_aws_library() -> None:
    code = ("import sys, daemon.service.aws as a; a.region_from_queue_url('https://sqs.eu-west-1.amazonaws.com/1/q');"
            " print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiobotocore', 'botocore', 'boto3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
