"""Completion messages through the real Pub/Sub client, against a local gRPC server that refuses
them as Pub/Sub does when the worker may not publish (the emulator has no IAM)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from worker import errors
from worker.notify import PubSubPublisher


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
