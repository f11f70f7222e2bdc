"""The warm-model cache's bounds: number of models and bytes of local files, least recently used
evicted first, nothing closed (or its files deleted) while a job still uses it."""

from __future__ import annotations

from typing import Any

import pytest

from worker.serving.cache import YOUNG_COLLECTION_THRESHOLD, ModelCache


class FakeModel:
    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False

    def predictor(self, signature_name: str) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def cache() -> tuple[ModelCache, dict[str, FakeModel], list[str]]:
    loaded: dict[str, FakeModel] = {}
    deleted: list[str] = []

    def load(path: str, description: str) -> FakeModel:
        loaded[path] = FakeModel(path)
        return loaded[path]

    return ModelCache(load, max_models=5, max_bytes=100, on_evict=deleted.append), loaded, deleted


def _fetch(cache: ModelCache, name: str, size: int) -> None:
    """What the provider does for a job: make room, then use (and release) the model."""
    cache.make_room(name, size)
    with cache.use(name, name, name, size=size):
        pass


def test_room_is_made_by_evicting_the_least_recently_used_before_the_download(cache):
    c, loaded, deleted = cache
    _fetch(c, "a", 40)
    _fetch(c, "b", 40)
    _fetch(c, "a", 40)  # a is now the most recently used
    assert c.local_bytes == 80 and deleted == []
    c.make_room("c", 30)  # 80 + 30 > 100: b goes, before c's files exist
    assert deleted == ["b"] and loaded["b"].closed and not loaded["a"].closed
    assert c.local_bytes == 40
    with c.use("c", "c", "c", size=30):
        assert c.local_bytes == 70
    assert c.stats.snapshot()["evictions"] == 1


def test_a_cached_model_needs_no_room(cache):
    c, _, deleted = cache
    _fetch(c, "a", 90)
    c.make_room("a", 90)
    assert deleted == [] and c.local_bytes == 90


def test_a_model_in_use_is_evicted_but_closed_and_deleted_only_when_its_job_ends(cache):
    c, loaded, deleted = cache
    c.make_room("a", 60)
    with c.use("a", "a", "a", size=60):
        c.make_room("b", 60)  # a is evicted; its files stay while the job runs
        assert deleted == [] and not loaded["a"].closed
        assert c.local_bytes == 60  # still on disk, counted until released
        with c.use("b", "b", "b", size=60):
            assert c.local_bytes == 120
    assert deleted == ["a"] and loaded["a"].closed and not loaded["b"].closed
    assert c.local_bytes == 60


def test_the_count_bound_still_holds_beside_the_byte_bound():
    deleted: list[str] = []
    c = ModelCache(lambda p, d: FakeModel(p), max_models=2, max_bytes=10**9, on_evict=deleted.append)
    for name in ("a", "b", "c"):
        _fetch(c, name, 1)
    assert deleted == ["a"] and c.local_bytes == 2


def test_files_shared_with_a_reloaded_copy_are_reported_so_they_can_be_kept(cache):
    c, _, _ = cache
    c.make_room("a", 60)
    with c.use("a", "/m/a", "a", size=60):
        c.make_room("b", 60)  # evicts a while in use
        assert not c.holds("/m/a")
        c.make_room("a", 60)  # the same model asked for again: b goes, a is loaded anew
        with c.use("a", "/m/a", "a", size=60):
            assert c.holds("/m/a")


class CyclicModel(FakeModel):
    """A model whose objects refer to each other, as a loaded SavedModel's do."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.me = self


def test_loaded_models_are_out_of_the_collectors_sight_and_a_closed_one_is_still_collected():
    import gc
    import weakref

    refs: dict[str, weakref.ref[CyclicModel]] = {}

    def load(path: str, description: str) -> CyclicModel:
        model = CyclicModel(path)
        refs[path] = weakref.ref(model)
        return model

    c = ModelCache(load, max_models=1)
    threshold = gc.get_threshold()
    try:
        _fetch(c, "a", 1)
        assert gc.get_freeze_count() > 0  # frozen after the load: full collections skip it
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD  # young collections spaced out
        _fetch(c, "b", 1)  # a is evicted and closed before b loads; b's load collects it
        assert refs["a"]() is None and refs["b"]() is not None

        with c.use("b", "b", "b", size=1):  # b in use when c's load evicts it: closed after the job
            c.make_room("c", 1)
            with c.use("c", "c", "c", size=1):
                pass
        model_b = refs["b"]()
        assert model_b is not None and model_b.closed
        del model_b
        _fetch(c, "c", 1)  # the next job's start collects it
        assert refs["b"]() is None and refs["c"]() is not None
    finally:
        c.close_all()
        gc.unfreeze()
        gc.set_threshold(*threshold)
