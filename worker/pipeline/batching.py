"""How many instances go in one call of the model: the job's batch size, cut for models whose
predictions are large and to what a call has shown it takes."""

from __future__ import annotations

import logging

from worker.jobs import (
    Job,
)
from worker.pipeline.ports import Limits
from worker.serving import Predictor

log = logging.getLogger(__name__)

# Batches of one instance a job sends at most to learn how many values a model's predictions
# hold, when its outputs do not declare their shapes (files in flight each send some at once).
PROBE_BATCHES = 32


class BatchSize:
    """The job's batch size (the job's, else the worker's), made smaller for a model whose
    predictions are large (an image per instance, say), so that a batch's predictions hold at
    most `limits.max_batch_output_values`, and no larger than a call of the model takes once one
    was too big (a model server's batch size limit, memory, its timeout). The values per instance
    are the outputs' declared shapes'; when an output does not declare its shape, batches are of
    one instance until the predictor has measured them (PROBE_BATCHES at most: a file whose first
    lines all fail)."""

    def __init__(self, job: Job, limits: Limits, predictor: Predictor) -> None:
        self._job_id = job.job_id
        self._asked = job.options.batch_size or limits.batch_size
        self._max_values = limits.max_batch_output_values
        self._predictor = predictor
        self._probes = 0
        # (values per instance, most per call) that `_size` is for; not yet sized.
        self._sized_for: tuple[int | None, int | None] | None = None
        self._size = self._asked

    def __call__(self) -> int:
        per, most = self._predictor.values_per_instance, self._predictor.most_per_call
        if (per, most) == self._sized_for:
            return self._size
        if per is None and self._probes < PROBE_BATCHES:
            self._probes += 1
            return 1
        size = self._asked
        if per and size * per > self._max_values:
            size = max(1, self._max_values // per)
            if self._sized_for is None or self._sized_for[0] != per:
                log.info(
                    "job %s: the model predicts %d values per instance: batches of %d instances instead of %d, so "
                    "that a batch's predictions hold at most %d values", self._job_id, per, size, self._asked,
                    self._max_values,
                )  # fmt: skip
        if most is not None:
            size = min(size, most)
        self._sized_for, self._size = (per, most), size
        return size
