"""Cloud Storage's failures as the worker's errors: one translation every call goes through,
with the fix a person can make (the bucket that does not exist, the role to grant)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from google.api_core import exceptions as gexc

from worker.errors import Conflict, NotFound, PermanentError, TransientError
from worker.media import DataCorrupted
from worker.storage.values import InputFile

# Failures to talk to Cloud Storage at all (from requests, or urllib3 under the media transport).
_UNREACHABLE = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


@contextlib.contextmanager
def translate_errors(what: str, bucket: Any = None) -> Iterator[None]:
    """Map SDK and transport failures to the worker's error tree, naming `what` was being done.
    With the `bucket` being worked in, a 404 says so when it is the bucket that does not exist."""
    try:
        yield
    except (NotFound, PermanentError, TransientError):
        raise
    except gexc.PreconditionFailed as e:
        raise Conflict(f"{what}: changed by another writer ({e.message})") from e
    except gexc.NotFound as e:
        if bucket is not None and bucket_missing(bucket):
            raise NotFound(f"{what}: {no_bucket(bucket)}") from e
        raise NotFound(f"{what}: not found ({e.message})") from e
    except gexc.Forbidden as e:
        raise PermanentError(f"{what}: permission denied ({e.message}) — {_grant(e.message, bucket)}") from e
    except gexc.Unauthorized as e:
        raise PermanentError(f"{what}: unauthorized ({e.message})") from e
    except (gexc.ServerError, gexc.TooManyRequests, gexc.RetryError) as e:
        raise TransientError(f"{what}: Cloud Storage unavailable ({e})") from e
    except DataCorrupted as e:
        raise TransientError(f"{what}: {e}; the job will be retried") from e
    except _UNREACHABLE as e:
        raise TransientError(f"{what}: cannot reach Cloud Storage ({e})") from e


# The predefined role that holds a Cloud Storage permission a 403 names, the least that does.
_ROLES = {
    "storage.objects.get": "roles/storage.objectViewer",
    "storage.objects.list": "roles/storage.objectViewer",
    "storage.objects.create": "roles/storage.objectUser",
    "storage.objects.delete": "roles/storage.objectUser",
    "storage.objects.update": "roles/storage.objectUser",
}


def _grant(message: str, bucket: Any) -> str:
    """What to grant after a 403 whose `message` names the missing permission, as Cloud Storage's
    do ("… does not have storage.objects.create access to … Permission 'storage.objects.create'
    denied …")."""
    where = f" on gs://{bucket.name}" if bucket is not None else " on the bucket"
    for permission, role in _ROLES.items():
        if permission in message:
            return f"grant the worker's service account {role}{where}: it lacks {permission}"
    return f"grant the worker's service account access{where}"


def bucket_missing(bucket: Any) -> bool:
    """Whether `bucket` does not exist; asked after a 404 only. False when that cannot be told
    (the service account may read objects without being allowed to read the bucket)."""
    try:
        return not bucket.exists()
    except (gexc.GoogleAPICallError, requests.RequestException):
        return False


def no_bucket(bucket: Any) -> str:
    return f"bucket {bucket.name} does not exist — check the bucket name in the URI"


@contextlib.contextmanager
def replaced_is_transient(f: InputFile) -> Iterator[None]:
    """The listed generation of an input vanishing mid-read means it was replaced or deleted: a
    retry lists the input again and reads what is there then."""
    try:
        yield
    except gexc.NotFound as e:
        raise TransientError(
            f"input {f.uri} was replaced or deleted while it was read (generation {f.generation} is gone); "
            "the job will be retried"
        ) from e
