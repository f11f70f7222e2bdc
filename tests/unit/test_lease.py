"""The job lease against the generation-checking fake store of the pipeline tests."""

from __future__ import annotations

import time

import pytest

from tests.unit.fakes import FakeStore
from worker import errors
from worker.lease import Lease
from worker.uris import Uri

URI = Uri("bkt", "out/_manifest.json.lease")


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_renewal_keeps_a_short_lease_held_past_its_ttl():
    store = FakeStore({})
    with Lease(store, URI, "j", ttl_s=0.3) as lease:
        first = lease.generation
        _wait_for(lambda: lease.generation != first)  # renewed in the background
        time.sleep(0.4)  # longer than the ttl: only renewals keep it alive
        before = time.time()
        with pytest.raises(errors.Busy) as busy:
            Lease(store, URI, "j", ttl_s=0.3).acquire()
        # When it expires unless renewed: how long a last delivery waits to see whether the holder lives.
        assert busy.value.until is not None and before < busy.value.until <= time.time() + 0.3
        lease.check()
    assert "bkt/" + URI.path not in store.objects


def test_a_lease_taken_over_is_reported_lost_and_left_to_the_new_holder():
    store = FakeStore({})
    lease = Lease(store, URI, "j", ttl_s=0.3)
    lease.acquire()
    store.write_json(URI, {"job_id": "j", "holder": "someone else", "expires_at": time.time() + 60}, job_id="j")
    taken = store.generations["bkt/" + URI.path]
    _wait_for(lambda: lease._lost is not None)
    with pytest.raises(errors.Busy, match="taken over"):
        lease.check()
    lease.release()
    assert store.generations["bkt/" + URI.path] == taken  # not deleted from under the new holder


def test_a_lease_object_without_an_expiry_counts_as_expired():
    store = FakeStore({"bkt/" + URI.path: b"[]"})
    with Lease(store, URI, "j", ttl_s=60) as lease:
        assert lease.generation > 1


def test_a_holder_that_stalled_past_its_expiry_learns_it_at_check_before_its_next_renewal():
    """Between two renewals (a third of the ttl apart) another run may take over an expired lease;
    check() renews once more, so the stalled run does not write the manifest and publish too."""
    store = FakeStore({})
    lease = Lease(store, URI, "j", ttl_s=600)  # its background renewal is 200 s away
    lease.acquire()
    store.write_json(URI, {"job_id": "j", "holder": "someone else", "expires_at": time.time() + 60}, job_id="j")
    taken = store.generations["bkt/" + URI.path]
    with pytest.raises(errors.Busy, match="taken over"):
        lease.check()
    lease.release()
    assert store.generations["bkt/" + URI.path] == taken


def test_check_renews_a_lease_still_held():
    store = FakeStore({})
    with Lease(store, URI, "j", ttl_s=600) as lease:
        first = lease.generation
        lease.check()
        assert lease.generation != first and store.generations["bkt/" + URI.path] == lease.generation
