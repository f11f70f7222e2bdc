"""Completion messages and the parts of jobs run as parts; the only importer of `google.cloud.pubsub_v1`."""

from __future__ import annotations

import logging
import threading
from typing import Any

from google.api_core import exceptions as gexc

from worker.errors import TransientError, Unpublishable

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 60.0

# Pub/Sub's limits on a message (https://cloud.google.com/pubsub/quotas#resource_limits). The
# emulator enforces none of them: the worker checks every message it publishes itself.
MAX_REQUEST_BYTES = 10_000_000  # a publish request: the topic and the message, encoded
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024


def check_limits(topic_path: str, data: bytes, attributes: dict[str, str]) -> None:
    """Raise `Unpublishable` for a message Pub/Sub would refuse: a publish request over 10 MB, more
    than 100 attributes, a key over 256 bytes or starting with `goog` (reserved), a value over
    1,024 bytes."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise Unpublishable(f"a message of {len(attributes)} attributes: Pub/Sub takes at most {MAX_ATTRIBUTES}")
    for key, value in attributes.items():
        size = len(key.encode())
        if not 0 < size <= MAX_ATTRIBUTE_KEY_BYTES or key.startswith("goog"):
            raise Unpublishable(
                f"attribute key {key[:40]!r} of {size} bytes: Pub/Sub takes keys of 1 to "
                f"{MAX_ATTRIBUTE_KEY_BYTES} bytes not starting with 'goog'"
            )
        if len(value.encode()) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise Unpublishable(
                f"attribute {key!r} of {len(value.encode())} bytes: Pub/Sub takes values of at most "
                f"{MAX_ATTRIBUTE_VALUE_BYTES} bytes"
            )
    if len(data) > MAX_REQUEST_BYTES - 1024:  # else it fits: the encoding adds a few bytes
        from google.pubsub_v1 import types

        message = types.PubsubMessage(data=data, attributes=attributes)
        size = types.PublishRequest.pb(types.PublishRequest(topic=topic_path, messages=[message])).ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise Unpublishable(
                f"a message of {len(data)} bytes: Pub/Sub takes requests of at most {MAX_REQUEST_BYTES}"
            )


class PubSubPublisher:
    """Publishes to one topic; the gRPC client is created on first use, never at import."""

    def __init__(self, topic_path: str, *, var: str = "WORKER_RESULTS_TOPIC", what: str = "completion message") -> None:
        self.topic_path = topic_path
        self._var = var  # the setting that names the topic
        self._what = what  # what goes out on it
        self._client: Any = None
        self._lock = threading.Lock()

    def _publisher(self) -> Any:
        with self._lock:
            if self._client is None:
                from google.cloud import pubsub_v1

                self._client = pubsub_v1.PublisherClient()
            return self._client

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        """Publish and wait for the server's acknowledgement; failures are transient, but a
        message over Pub/Sub's limits is `Unpublishable` (no retry would publish it)."""
        check_limits(self.topic_path, data, attributes)
        try:
            future = self._publisher().publish(self.topic_path, data, **attributes)
            message_id = future.result(timeout=PUBLISH_TIMEOUT_S)
        except gexc.NotFound as e:
            raise TransientError(f"topic {self.topic_path} does not exist — create it or fix {self._var}") from e
        except gexc.PermissionDenied as e:  # transient: once granted, the redelivered event publishes
            raise TransientError(
                f"publishing to {self.topic_path} was refused ({e.message}) — grant the worker's service account "
                f"roles/pubsub.publisher on that topic"
            ) from e
        except (gexc.GoogleAPIError, TimeoutError, OSError) as e:
            raise TransientError(f"publishing to {self.topic_path} failed: {e}") from e
        log.info("published %s %s to %s", self._what, message_id, self.topic_path)
