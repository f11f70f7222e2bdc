"""Completion messages through the real Pub/Sub client, against a local gRPC server that refuses
them as Pub/Sub does when the worker may not publish (the emulator has no IAM)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from worker import errors
from worker.notify import PubSubPublisher, check_limits


@pytest.fixture
def refusing_pubsub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """A Publisher service answering every Publish PERMISSION_DENIED; yields the requests seen."""
    seen: list[bytes] = []

    def publish(request: bytes, context: Any) -> bytes:
        seen.append(request)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "User not authorized to perform this action.")
        return b""  # not reached: abort raises

    handler = grpc.method_handlers_generic_handler(
        "google.pubsub.v1.Publisher", {"Publish": grpc.unary_unary_rpc_method_handler(publish)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    try:
        yield seen
    finally:
        server.stop(grace=None)


def test_a_refused_publish_names_the_role_to_grant_and_is_transient(refusing_pubsub: list[bytes]) -> None:
    """Transient, so that once the role is granted the redelivered event publishes the completion."""
    publisher = PubSubPublisher("projects/p/topics/results")
    with pytest.raises(errors.TransientError) as raised:
        publisher.publish(b"{}", {"job_id": "j", "status": "SUCCEEDED"})
    assert str(raised.value) == (
        "publishing to projects/p/topics/results was refused (User not authorized to perform this action.) — "
        "grant the worker's service account roles/pubsub.publisher on that topic"
    )
    assert refusing_pubsub  # the request reached the server


@pytest.mark.parametrize(
    ("data", "attributes", "refused"),
    [
        (b"x" * 9_999_990, {}, "a message of 9999990 bytes: Pub/Sub takes requests of at most 10000000"),
        (b"{}", {f"k{i}": "v" for i in range(101)}, "a message of 101 attributes"),
        (b"{}", {"k" * 257: "v"}, "of 257 bytes: Pub/Sub takes keys of 1 to 256 bytes"),
        (b"{}", {"googkey": "v"}, "not starting with 'goog'"),
        (b"{}", {"job_id": "é" * 513}, "attribute 'job_id' of 1026 bytes: Pub/Sub takes values of at most 1024"),
    ],
)
def test_a_message_over_pubsub_s_limits_is_refused_before_it_is_sent(
    refusing_pubsub: list[bytes], data: bytes, attributes: dict[str, str], refused: str
) -> None:
    """The emulator takes such messages, real Pub/Sub does not: the worker checks them itself, as
    a permanent error (no redelivery could publish it), and sends nothing."""
    with pytest.raises(errors.Unpublishable, match=re.escape(refused)):
        PubSubPublisher("projects/p/topics/results").publish(data, attributes)
    assert refusing_pubsub == []


def test_a_message_at_pubsub_s_limits_is_sent(refusing_pubsub: list[bytes]) -> None:
    attributes = {"k" * 256: "v" * 1024, **{f"a{i}": "" for i in range(99)}}
    with pytest.raises(errors.TransientError):  # refused by this server, after the checks let it through
        PubSubPublisher("projects/p/topics/results").publish(b"{}", attributes)
    assert len(refusing_pubsub) == 1


def test_the_size_limit_is_the_publish_request_s() -> None:
    """10,000,000 bytes for the request as encoded: the topic, the data and a few bytes of framing
    (the client library refuses larger ones itself, with another error)."""
    topic = "projects/p/topics/results"
    check_limits(topic, b"x" * 9_999_900, {})
    with pytest.raises(errors.Unpublishable):
        check_limits(topic, b"x" * 9_999_980, {})
