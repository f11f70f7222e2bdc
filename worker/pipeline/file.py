"""One input file → its output object: lines read in blocks, cut into bounded batches, predicted,
written as output lines in input order; its counts and waits."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from itertools import accumulate, chain, repeat
from typing import Any, Literal

from worker import codec, errors
from worker.jobs import JSONL, Job, Options, input_format_of, output_name, piece_path
from worker.manifest import Counts, FileResult
from worker.pipeline.csv_rows import CsvRows
from worker.pipeline.file_lists import entry_blocks
from worker.pipeline.files import Tracker
from worker.pipeline.isolation import ONE_SHAPE_PER_CALL, predict_batch, predict_entries
from worker.pipeline.lines import OPEN, Entry, TooLong, entry_of, format_line, hint_request_bodies
from worker.pipeline.ports import Limits, Sink, Store
from worker.pipeline.tf_records import Framing, record_blocks, records_before
from worker.serving import BatchRejected, Predictor
from worker.uris import Uri, check_object_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFiles:
    """What every input file of a job is predicted with: the job, its storage, its model's
    predictor, the batch size of the moment, its limits and its progress."""

    job: Job
    store: Store
    predictor: Predictor
    batch_size: Callable[[], int]
    limits: Limits
    tracker: Tracker


def run_file(files: JobFiles, f: Any) -> FileResult:
    """One input file predicted, read as its job or its name says; a file read as JSON lines that
    turns out to be TFRecord (its first record's framing checks out), and that no `input_format`
    names, is read again as TFRecord: its first read stopped before any output line was written,
    and that output was abandoned."""
    job = files.job
    try:
        return FileRun(files, f).run()
    except errors.OtherFormat as e:
        if e.kind != "tf-record" or job.options.input_format is not None or f.piece:
            raise
    log.info('%s is a TFRecord file: reading it as one (each record the instance {"b64": …})', f.uri)
    as_records = replace(job, options=replace(job.options, input_format="tf-record"))
    check_object_name(as_records.output.child(output_name(f.rel, "tf-record")), f"the output of {f.uri}")
    return FileRun(replace(files, job=as_records), f).run()


class FileRun:
    """One input file read as `input_format_of` says, its lines cut into batches, predicted and
    written as output lines in input order, with the counts, first error and waits of its result."""

    def __init__(self, files: JobFiles, f: Any) -> None:
        job = files.job
        self.job, self.f, self.store, self.predictor = job, f, files.store, files.predictor
        self.batch_size, self.limits, self.tracker = files.batch_size, files.limits, files.tracker
        self.read_as = input_format_of(job.options, f.rel)
        self.out_uri, self.result = _output_of(job, f, self.read_as)
        # A CSV file's rows read as JSON lines; its options name its header's columns once it is read.
        self.rows = CsvRows(job.options) if self.read_as == "csv" else None
        self.results_format = job.options.output_format != "predictions"
        # Lines and bytes already told to the tracker.
        self.lines_told = self.bytes_told = 0
        # The batch being filled: its non-blank lines, their line numbers, and their bytes.
        self.pending: list[bytes] = []
        self.numbers: list[int] = []
        self.pending_bytes = 0
        self._lines_before: int | None = None
        # Where a piece of a TFRecord file finds its records, and where the next piece's begin.
        self.framing = Framing(f.start, f.end, f.size) if f.piece and self.read_as == "tf-record" else None

    def run(self) -> FileResult:
        f, result = self.f, self.result
        where = f"{f.uri} (bytes {f.start:,} to {f.end:,}, piece {f.piece[0]} of {f.piece[1]})" if f.piece else f.uri
        log.info("%s (%d bytes) → %s", where, f.length, self.out_uri)
        started = time.perf_counter()
        with self.store.open_output(self.out_uri, job_id=self.job.job_id, content_type=JSONL) as output:
            out = _Waits(output)
            for block in out.blocks(self._blocks()):
                self._take(block, out)
            if self.pending:
                self._flush(out)
            last_batch = time.perf_counter()
        if self.framing is not None and result.piece is not None:  # checked against its neighbours' when joined
            result.piece["records"] = [self.framing.first, self.framing.next]
        # After the last batch: the rest of the output sent, and stored.
        result.input_wait_s, result.output_wait_s = out.input_s, out.output_s + time.perf_counter() - last_batch
        counts = result.counts
        self.tracker.advance(counts.lines - self.lines_told, max(0, f.length - self.bytes_told), file_done=True)
        if result.first_error is not None:
            log.warning(
                "%s: %d of %d instances could not be predicted (error lines in %s); the first, line %d: %s",
                f.uri, counts.errors, counts.instances, self.out_uri, *result.first_error,
            )  # fmt: skip
        log.info(
            "%s → %s: %d instances, %d predictions, %d errors, %d skipped in %.2fs (of which waiting for input "
            "%.2fs, for the output to be stored %.2fs)",
            f.uri, self.out_uri, counts.instances, counts.predictions, counts.errors, counts.skipped,
            time.perf_counter() - started, result.input_wait_s, result.output_wait_s,
        )  # fmt: skip
        return result

    def _blocks(self) -> Iterator[list[bytes]]:
        """The file's lines, a block at a time; a CSV file's rows and a TFRecord file's records as JSON lines."""
        f, store, max_line_bytes = self.f, self.store, self.limits.max_line_bytes
        if self.read_as.startswith("tf-record"):
            return record_blocks(store.read_data(f), f.uri, max_line_bytes, self.framing)
        if self.rows is not None and f.start:  # a piece of a CSV file: its rows are named by the file's header
            self.rows.take_header(self._csv_header())
        blocks = store.read_blocks(f, max_line_bytes=max_line_bytes)
        if self.read_as == "file-list":  # a file's bytes in base64 fit in a line of max_line_bytes
            max_bytes = max_line_bytes * 3 // 4 - 16
            return entry_blocks(blocks, store.read_at_most, local=f.uri.is_local, max_bytes=max_bytes)
        return blocks if self.rows is None else self.rows.blocks(blocks)

    def _csv_header(self) -> bytes:
        """The first line of the file that is not blank: a CSV file's header."""
        blocks = self.store.read_blocks(_whole(self.f), max_line_bytes=self.limits.max_line_bytes)
        try:
            return next((raw for block in blocks for raw in block if raw.strip()), b"")
        finally:
            if isinstance(blocks, Generator):
                blocks.close()

    def _lines_before_piece(self) -> int:
        """Lines of the file before this piece's first (records, of a TFRecord file): read only
        when an error line is to name its line."""
        if self._lines_before is None:
            if not self.f.start:
                self._lines_before = 0
            elif self.framing is not None:
                self._lines_before = records_before(self.store.read_data(_whole(self.f)), self.framing.first or 0)
            else:
                self._lines_before = self.store.lines_before(self.f)
        return self._lines_before

    def _take(self, block: list[bytes], out: _Waits) -> None:
        """A block of lines counted and added to the batch, each batch predicted once full.

        Lines come in blocks (a downloaded chunk's worth) and are cut into batches as lists: at a
        few microseconds per instance, a Python step per line is a cost worth avoiding."""
        max_line_bytes = self.limits.max_line_bytes
        counts = self.result.counts
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
        self._batch(kept, kept_numbers, out)

    def _batch(self, kept: list[bytes], numbers: list[int] | range, out: _Waits) -> None:
        """Lines (and their numbers) added to the batch, each batch predicted once full: of the
        batch size, or of the line that reaches its byte bound."""
        max_batch_bytes = self.limits.max_batch_bytes
        start = 0
        while start < len(kept):
            size = self.batch_size()
            end = min(len(kept), start + max(0, size - len(self.pending)))
            sizes = list(accumulate(map(len, kept[start:end]), initial=self.pending_bytes))
            end = start + min(bisect_left(sizes, max_batch_bytes, lo=1), end - start)
            self.pending += kept[start:end]
            self.numbers += numbers[start:end]
            self.pending_bytes = sizes[end - start]
            start = end
            if len(self.pending) >= size or self.pending_bytes >= max_batch_bytes:
                self._flush(out)
                sent = self.pending_bytes + len(self.pending)
                self.tracker.advance(self.numbers[-1] - self.lines_told, sent)
                self.lines_told, self.bytes_told = self.numbers[-1], self.bytes_told + sent
                self.pending, self.numbers, self.pending_bytes = [], [], 0

    def _flush(self, out: Sink) -> None:
        """The pending batch predicted and written: as whole lists when it is plain (every line
        strict JSON, taken whole by the model), else line by line."""
        options = self.job.options if self.rows is None else self.rows.options
        plain = self.read_as != "file-list" and (  # a file-list entry's line shows its URI
            options.key_field is None and options.included_fields is None and options.excluded_fields is None
        )
        plain_outcome = None
        if plain:
            counts = self.result.counts
            plain_outcome = _flush_plain(self.pending, self.predictor, counts, out, results_format=self.results_format)
        if plain_outcome == "done":
            return
        entries = self._entries(options, plain=plain)
        # A batch the model just rejected whole is not sent whole again.
        rejected = plain_outcome if isinstance(plain_outcome, BatchRejected) else None
        predict_entries(self.predictor, entries, rejected=rejected)
        self._count(entries)
        if self.results_format:  # the common line inline: the input line copied, the prediction encoded
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

    def _entries(self, options: Options, *, plain: bool) -> list[Entry]:
        """The pending lines as entries; an unreadable line's error names its line in the file."""
        parsed = codec.parse_many(self.pending)
        entries = [
            Entry(p[0], feed=p[0], raw=raw.strip() if p[1] else None)
            if plain and not isinstance(p, ValueError)
            else entry_of(p, raw, lineno, options)
            for lineno, raw, p in zip(self.numbers, self.pending, parsed, strict=True)
        ]
        if self.f.start and any(e.error is not None for e in entries):  # its lines numbered as in the file
            before = self._lines_before_piece()
            entries = [
                e if e.error is None else entry_of(p, raw, lineno + before, options)
                for e, lineno, raw, p in zip(entries, self.numbers, self.pending, parsed, strict=True)
            ]
        return entries

    def _count(self, entries: list[Entry]) -> None:
        """A predicted batch counted; its first error line kept, named by its line in the file."""
        counts, result = self.result.counts, self.result
        failed = sum(1 for e in entries if e.error is not None)
        if failed:
            hint_request_bodies(entries)
        if failed and result.first_error is None:
            before = self._lines_before_piece()
            result.first_error = next(
                (n + before, e.error) for n, e in zip(self.numbers, entries, strict=True) if e.error
            )
        counts.instances += len(entries)
        counts.errors += failed
        counts.predictions += len(entries) - failed


def _whole(f: Any) -> Any:
    """The file a piece is of."""
    return replace(f, piece=None, start=0, end=None)


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
