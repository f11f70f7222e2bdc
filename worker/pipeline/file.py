"""One input file → its output object: lines read in blocks, cut into bounded batches, predicted,
written as output lines in input order; its counts and waits."""

from __future__ import annotations

import functools
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import accumulate, chain, repeat
from typing import Any, Literal

from worker import codec, errors
from worker.jobs import JSONL, Job, Uri, check_object_name, input_format_of, output_name, piece_path
from worker.manifest import Counts, FileResult
from worker.pipeline.csv_rows import CsvRows
from worker.pipeline.file_lists import entry_blocks
from worker.pipeline.files import Tracker
from worker.pipeline.isolation import ONE_SHAPE_PER_CALL, predict_batch, predict_entries
from worker.pipeline.lines import OPEN, Entry, TooLong, entry_of, format_line, hint_request_bodies
from worker.pipeline.ports import Limits, Sink, Store
from worker.pipeline.tf_records import record_blocks
from worker.serving import BatchRejected, Predictor

log = logging.getLogger(__name__)


def run_file(
    job: Job,
    f: Any,
    store: Store,
    predictor: Predictor,
    batch_size: Callable[[], int],
    limits: Limits,
    tracker: Tracker,
) -> FileResult:
    """One input file predicted, read as its job or its name says; a file read as JSON lines that
    turns out to be TFRecord (its first record's framing checks out), and that no `input_format`
    names, is read again as TFRecord: its first read stopped before any output line was written,
    and that output was abandoned."""
    try:
        return _run_file_as(job, f, store, predictor, batch_size, limits, tracker)
    except errors.OtherFormat as e:
        if e.kind != "tf-record" or job.options.input_format is not None or f.piece:
            raise
    log.info('%s is a TFRecord file: reading it as one (each record the instance {"b64": …})', f.uri)
    as_records = replace(job, options=replace(job.options, input_format="tf-record"))
    check_object_name(as_records.output.child(output_name(f.rel, "tf-record")), f"the output of {f.uri}")
    return _run_file_as(as_records, f, store, predictor, batch_size, limits, tracker)


def _run_file_as(
    job: Job,
    f: Any,
    store: Store,
    predictor: Predictor,
    batch_size: Callable[[], int],
    limits: Limits,
    tracker: Tracker,
) -> FileResult:
    read_as = input_format_of(job.options, f.rel)
    out_uri, result = _output_of(job, f, read_as)
    # Lines of the file before this piece's first, read only when an error line is to name its line.
    lines_before = functools.cache(lambda: store.lines_before(f) if f.start else 0)
    counts = result.counts
    # A CSV file's rows read as JSON lines; its options name its header's columns once it is read.
    rows = CsvRows(job.options) if read_as == "csv" else None
    results_format = job.options.output_format != "predictions"
    # Lines and bytes already told to the tracker.
    lines_told = bytes_told = 0
    # The batch being filled: its non-blank lines, their line numbers, and their bytes.
    pending: list[bytes] = []
    numbers: list[int] = []
    pending_bytes = 0
    where = f"{f.uri} (bytes {f.start:,} to {f.end:,}, piece {f.piece[0]} of {f.piece[1]})" if f.piece else f.uri
    log.info("%s (%d bytes) → %s", where, f.length, out_uri)
    started = time.perf_counter()

    with store.open_output(out_uri, job_id=job.job_id, content_type=JSONL) as output:
        out = _Waits(output)

        def flush() -> None:
            options = job.options if rows is None else rows.options
            plain = read_as != "file-list" and (  # a file-list entry's line shows its URI
                options.key_field is None and options.included_fields is None and options.excluded_fields is None
            )
            plain_outcome = None
            if plain:
                plain_outcome = _flush_plain(pending, predictor, counts, out, results_format=results_format)
            if plain_outcome == "done":
                return
            parsed = codec.parse_many(pending)
            entries = [
                Entry(p[0], feed=p[0], raw=raw.strip() if p[1] else None)
                if plain and not isinstance(p, ValueError)
                else entry_of(p, raw, lineno, options)
                for lineno, raw, p in zip(numbers, pending, parsed, strict=True)
            ]
            if f.start and any(e.error is not None for e in entries):  # its lines numbered as in the file
                before = lines_before()
                entries = [
                    e if e.error is None else entry_of(p, raw, lineno + before, options)
                    for e, lineno, raw, p in zip(entries, numbers, pending, parsed, strict=True)
                ]
            # A batch the model just rejected whole is not sent whole again.
            predict_entries(
                predictor, entries, rejected=plain_outcome if isinstance(plain_outcome, BatchRejected) else None
            )
            failed = sum(1 for e in entries if e.error is not None)
            if failed:
                hint_request_bodies(entries)
            if failed and result.first_error is None:
                result.first_error = next(
                    (n + lines_before(), e.error) for n, e in zip(numbers, entries, strict=True) if e.error
                )
            counts.instances += len(entries)
            counts.errors += failed
            counts.predictions += len(entries) - failed
            if results_format:  # the common line inline: the input line copied, the prediction encoded
                lines = [
                    OPEN[e.label] + e.raw + b',"prediction":' + codec.dumps(e.prediction) + b"}"
                    if e.raw is not None and e.error is None
                    else format_line(e, options)
                    for e in entries
                ]
            else:
                lines = [format_line(e, options) for e in entries]
            lines.append(b"")
            out.write(b"\n".join(lines))

        # Lines come in blocks (a downloaded chunk's worth) and are cut into batches as lists:
        # at a few microseconds per instance, a Python step per line is a cost worth avoiding.
        max_batch_bytes, max_line_bytes = limits.max_batch_bytes, limits.max_line_bytes
        for block in out.blocks(_blocks(f, read_as, rows, store, max_line_bytes)):
            if max(map(len, block), default=0) > max_line_bytes:
                block = [TooLong(raw, max_line_bytes) if len(raw) > max_line_bytes else raw for raw in block]
            first = counts.lines + 1
            counts.lines += len(block)
            kept = [raw for raw in block if raw and not raw.isspace()]
            if len(kept) == len(block):
                kept_numbers: list[int] | range = range(first, first + len(block))
            else:
                counts.skipped += len(block) - len(kept)
                kept_numbers = [first + i for i, raw in enumerate(block) if raw and not raw.isspace()]
            start = 0
            while start < len(kept):
                # Take lines up to the batch's size, or up to the line that reaches its byte bound.
                size = batch_size()
                end = min(len(kept), start + max(0, size - len(pending)))
                sizes = list(accumulate(map(len, kept[start:end]), initial=pending_bytes))
                end = start + min(bisect_left(sizes, max_batch_bytes, lo=1), end - start)
                pending += kept[start:end]
                numbers += kept_numbers[start:end]
                pending_bytes = sizes[end - start]
                start = end
                if len(pending) >= size or pending_bytes >= max_batch_bytes:
                    flush()
                    tracker.advance(numbers[-1] - lines_told, pending_bytes + len(pending))
                    lines_told, bytes_told = numbers[-1], bytes_told + pending_bytes + len(pending)
                    pending, numbers, pending_bytes = [], [], 0
        if pending:
            flush()
        last_batch = time.perf_counter()
    # After the last batch: the rest of the output sent, and stored.
    result.input_wait_s, result.output_wait_s = out.input_s, out.output_s + time.perf_counter() - last_batch
    tracker.advance(counts.lines - lines_told, max(0, f.length - bytes_told), file_done=True)
    if result.first_error is not None:
        log.warning(
            "%s: %d of %d instances could not be predicted (error lines in %s); the first, line %d: %s",
            f.uri, counts.errors, counts.instances, out_uri, *result.first_error,
        )  # fmt: skip
    log.info(
        "%s → %s: %d instances, %d predictions, %d errors, %d skipped in %.2fs (of which waiting for input %.2fs, "
        "for the output to be stored %.2fs)",
        f.uri, out_uri, counts.instances, counts.predictions, counts.errors, counts.skipped,
        time.perf_counter() - started, result.input_wait_s, result.output_wait_s,
    )  # fmt: skip
    return result


def _blocks(f: Any, read_as: str, rows: CsvRows | None, store: Store, max_line_bytes: int) -> Iterator[list[bytes]]:
    """The file's lines, a block at a time; a CSV file's rows and a TFRecord file's records as JSON lines."""
    if read_as.startswith("tf-record"):
        return record_blocks(store.read_data(f), f.uri, max_line_bytes)
    blocks = store.read_blocks(f, max_line_bytes=max_line_bytes)
    if read_as == "file-list":  # a file's bytes in base64 fit in a line of max_line_bytes
        return entry_blocks(blocks, store.read_at_most, local=f.uri.is_local, max_bytes=max_line_bytes * 3 // 4 - 16)
    return blocks if rows is None else rows.blocks(blocks)


def _output_of(job: Job, f: Any, read_as: str) -> tuple[Uri, FileResult]:
    """Where the file's output lines go, and its result so far (naming its output)."""
    out_uri = job.output.child(output_name(f.rel, read_as))
    result = FileResult(input=str(f.uri), output=str(out_uri))
    if f.piece is not None:  # its lines go to an object of their own, joined into `out_uri` once all are
        out_uri = job.parts_folder.child(piece_path(f.rel, *f.piece))
        result.piece = {"of": list(f.piece), "bytes": [f.start, f.end], "object": str(out_uri)}
    return out_uri, result


class _Waits:
    """A file's output sink that adds up what the file waited for: its writes (the upload's
    back-pressure) and the arrival of each input block it reads through `blocks`."""

    __slots__ = ("_sink", "input_s", "output_s")

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.input_s = self.output_s = 0.0

    def write(self, block: bytes) -> int:
        t = time.perf_counter()
        n = self._sink.write(block)
        self.output_s += time.perf_counter() - t
        return n

    def blocks(self, blocks: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        while True:
            t = time.perf_counter()
            block = next(blocks, None)
            self.input_s += time.perf_counter() - t
            if block is None:
                return
            yield block


def _flush_plain(
    raws: list[bytes], predictor: Predictor, counts: Counts, out: Sink, *, results_format: bool
) -> Literal["done", "not strict JSON", "one shape per call"] | BatchRejected:
    """The common batch of plain instances — every line strict JSON, the model takes them all —
    predicted and written as whole lists, without per-line bookkeeping ("done"). Otherwise nothing
    is written, and the batch then goes line by line (told how the model refused it, if it did)."""
    if predictor in ONE_SHAPE_PER_CALL:
        return "one shape per call"
    values = codec.parse_strict(raws)
    if values is None:
        return "not strict JSON"
    try:
        predictions = predict_batch(predictor, values)
    except BatchRejected as rejected:
        return rejected  # isolated instance by instance, in `predict_entries`
    encoded = codec.dumps_each(predictions)
    if results_format:
        # Each line is {"instance":<the input line>,"prediction":<encoded>}, joined in one C-level pass.
        parts = zip(
            repeat(OPEN["instance"]), map(bytes.strip, raws), repeat(b',"prediction":'), encoded, repeat(b"}\n")
        )
        out.write(b"".join(chain.from_iterable(parts)))
    else:
        encoded.append(b"")
        out.write(b"\n".join(encoded))
    counts.instances += len(values)
    counts.predictions += len(values)
    return "done"
