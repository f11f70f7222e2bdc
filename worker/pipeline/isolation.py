"""Finding the instances a model refuses: a refused batch is split (by shape, in halves, or one
by one) until each refused instance stands alone as one error line; what a model has shown
about itself (variable shapes, how much it refuses) is remembered per predictor."""

from __future__ import annotations

import weakref
from typing import Any

from worker import errors
from worker.pipeline.lines import Entry
from worker.serving import BATCH_ADVICE, BatchRejected, Predictor

# Predictors that took a batch they refused whole one shape at a time, every shape without a
# refusal: a model of variable-length inputs. Their batches go one shape at a time from then on,
# without the whole-batch call each would refuse (in this job and in later ones on the warm model).
ONE_SHAPE_PER_CALL: weakref.WeakSet[Any] = weakref.WeakSet()
# Of the last batch each predictor refused and that was isolated, the share of its instances the
# model refused one by one. From MOSTLY_REFUSED of them on, the next refused batch goes instance
# by instance (n calls) rather than in halves (up to 2n - 1 calls when all are refused).
_LAST_REFUSED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
MOSTLY_REFUSED = 1 / 4


def predict_entries(predictor: Predictor, entries: list[Entry], *, rejected: BatchRejected | None = None) -> None:
    """Predict every entry without an error yet; `rejected`: how the model has just refused them
    all as one batch."""
    todo = [e for e in entries if e.error is None]
    if rejected is not None and len(todo) == len(entries):
        _refused(predictor, todo, rejected, grouped=False)
    elif todo and not (predictor in ONE_SHAPE_PER_CALL and _by_shape(predictor, todo)):
        _predict_isolating(predictor, todo)


def predict_batch(predictor: Predictor, feeds: list[Any]) -> list[Any]:
    """One prediction per instance, or ModelError; the model's BatchRejected passes through."""
    predictions = predictor.predict(feeds)
    if len(predictions) != len(feeds):
        raise errors.ModelError(
            f"the model returned {len(predictions)} predictions for {len(feeds)} instances; {BATCH_ADVICE}"
        )
    return predictions


def _predict_isolating(predictor: Predictor, entries: list[Entry], *, grouped: bool = False) -> None:
    """Predict `entries`; when the model rejects the batch, isolate what it refuses."""
    try:
        predictions = predict_batch(predictor, [e.feed for e in entries])
    except BatchRejected as rejected:
        _refused(predictor, entries, rejected, grouped=grouped)
        return
    for e, p in zip(entries, predictions, strict=True):
        e.prediction = p


def _refused(predictor: Predictor, entries: list[Entry], rejected: BatchRejected, *, grouped: bool) -> None:
    """After the model refused `entries` as one batch: a lone instance, or instances each refused
    for the same reason, are error lines; the others are isolated."""
    if len(entries) == 1 or rejected.each:
        for e in entries:
            e.error = rejected.message
    elif grouped:
        _isolate(predictor, entries, grouped=grouped)
    else:  # a batch as the file gave it: how many of its instances are refused tells how to isolate the next
        _isolate(predictor, entries, grouped=False, one_by_one=_LAST_REFUSED.get(predictor, 0.0) >= MOSTLY_REFUSED)
        _LAST_REFUSED[predictor] = sum(e.error is not None for e in entries) / len(entries)


def _isolate(predictor: Predictor, entries: list[Entry], *, grouped: bool, one_by_one: bool = False) -> None:
    """Predict a batch the model refused, in parts. First instances of one shape together: a model
    of variable-length inputs (token ids, say) takes only rectangular batches, as TF Serving does,
    so each length makes a batch of its own (and when every length goes through, the predictor is
    remembered as taking one shape per call). Then halves, until each bad instance is alone: one
    bad instance costs one error line and not its batch; or, `one_by_one` (when a quarter or more of
    the last refused batch was refused), each instance alone."""
    if not grouped and _by_shape(predictor, entries):
        if all(e.error is None for e in entries):
            ONE_SHAPE_PER_CALL.add(predictor)
        return
    if one_by_one:
        for e in entries:
            _predict_isolating(predictor, [e], grouped=True)
        return
    mid = len(entries) // 2
    _predict_isolating(predictor, entries[:mid], grouped=True)
    _predict_isolating(predictor, entries[mid:], grouped=True)


def _by_shape(predictor: Predictor, entries: list[Entry]) -> bool:
    """Predict `entries` one batch per shape, when they have several (True); else do nothing."""
    groups: dict[Any, list[Entry]] = {}
    for k, e in enumerate(entries):
        groups.setdefault(_shape_of(e.feed, k), []).append(e)
    if len(groups) == 1:
        return False
    for group in groups.values():
        _predict_isolating(predictor, group, grouped=True)
    return True


def _shape_of(value: Any, k: int) -> Any:
    """The nesting of arrays in a JSON value (in objects, per key): values of one shape can make a
    rectangular batch. Numbers, strings and `{"b64": …}` have the same, empty shape; a value too
    deep to walk gets one of its own (`k`: its place in the batch)."""
    try:
        return _shape(value)
    except RecursionError:
        return ("too deep", k)


def _shape(value: Any) -> Any:
    if isinstance(value, list):
        if value and isinstance(value[0], (list, dict)):
            return (len(value), tuple(map(_shape, value)))
        return (len(value),)
    if isinstance(value, dict) and not (len(value) == 1 and "b64" in value):
        return tuple((key, _shape(v)) for key, v in sorted(value.items()))
    return ()
