"""Completion messages and the parts of jobs run as parts; the only importer of `google.cloud.pubsub_v1`."""

from __future__ import annotations

import logging
import threading
from typing import Any

from google.api_core import exceptions as gexc

from worker.errors import TransientError

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 60.0


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
        """Publish and wait for the server's acknowledgement; failures are transient."""
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
