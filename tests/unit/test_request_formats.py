"""Row instances to TF Serving's columnar `inputs`, and columnar `outputs` back to rows."""

from __future__ import annotations

import pytest

from worker.errors import ModelError
from worker.serving.tfserving import _columns, _rows


def test_bare_instances_become_one_list_and_objects_one_list_per_input():
    assert _columns([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
    assert _columns([{"a": [1], "b": 2}, {"a": [3], "b": 4}]) == {"a": [[1], [3]], "b": [2, 4]}


def test_mixed_instances_are_not_columnar():
    assert _columns([{"a": 1}, {"b": 2}]) is None
    assert _columns([{"a": 1}, [2]]) is None


def test_outputs_become_one_prediction_per_instance():
    assert _rows([[0.1, 0.9], [0.5, 0.5]], 2) == [[0.1, 0.9], [0.5, 0.5]]
    assert _rows({"total": [1, 2], "ratio": [0.5, "NaN"]}, 2) == [
        {"total": 1, "ratio": 0.5},
        {"total": 2, "ratio": "NaN"},
    ]


def test_outputs_without_one_row_per_instance_are_a_model_error():
    with pytest.raises(ModelError, match="one row per instance"):
        _rows([[1], [2]], 3)
    with pytest.raises(ModelError, match="one row per instance"):
        _rows({"a": [1, 2], "b": [1]}, 2)
