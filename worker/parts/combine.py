"""The parts of a job, combined: when every part's manifest is written, the whole job's manifest
(its files in input order, its counts summed, the pieces of cut files joined into their outputs)
and its one completion message, published by the part that writes it."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from worker import errors, manifest
from worker.codec import shown
from worker.jobs import JSONL, STATUS_FAILED, Job
from worker.manifest import Counts, error_ratio_exceeded, failure
from worker.parts.plan import part_id, part_manifests, value_of, whole_job
from worker.pipeline import Publisher, Store
from worker.pipeline.job import finish, publish_completion
from worker.pipeline.results import PUBLISHED_KEY, RunState
from worker.uris import Uri

log = logging.getLogger(__name__)


def parts_done(whole: Job, store: Any) -> list[dict[str, Any]] | None:
    """Every part's manifest, in part order, when all parts of `whole` have written theirs."""
    n = whole.options.parts or 1
    parts = []
    for k, uri in enumerate(part_manifests(whole, n), start=1):
        stored = store.read_json(uri)
        value = stored.value if stored is not None else None
        if not isinstance(value, dict) or value.get("job_id") != part_id(whole.job_id, k, n):
            return None
        parts.append(value)
    return parts


def combined(whole: Job, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole job's manifest from its parts' (in part order): their files in input order, their
    counts summed, FAILED when a part failed (its error, naming the part) or when the job's errors
    exceed max_error_ratio, and its times from the first start to the last finish."""
    n = len(parts)
    files = _joined(sorted((f for p in parts for f in p.get("files") or []), key=_file_order))
    totals = Counts()
    for p in parts:
        counts = p.get("totals") or {}
        totals.add(Counts(**{key: int(counts.get(key, 0)) for key in Counts().to_json()}))
    failed = next(((k, p) for k, p in enumerate(parts, start=1) if p.get("status") == STATUS_FAILED), None)
    error: dict[str, str] | None
    if failed is not None:
        cause = failed[1].get("error") or {}
        error = failure(str(cause.get("code", "UNKNOWN")), f"part {failed[0]} of {n}: {cause.get('message', '')}")
    else:
        error = error_ratio_exceeded(whole.options, totals, manifest.first_error(files))
    started = min(str(p.get("started_at", "")) for p in parts)
    finished = max(str(p.get("finished_at", "")) for p in parts)
    return manifest.build(
        whole,
        model=parts[0].get("model"),
        files=files,
        totals=totals,
        times=(started, finished, {"total_s": _seconds_between(started, finished)}),
        error=error,
        parts=[
            {"manifest": str(uri), "status": p.get("status"), "timings": p.get("timings")}
            for uri, p in zip(part_manifests(whole, n), parts, strict=True)
        ],
    )


def _file_order(f: dict[str, Any]) -> tuple[str, int]:
    piece = f.get("piece")
    return str(f.get("input")), piece["of"][0] if isinstance(piece, dict) else 0


def _joined(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts' file entries (in input order, a file's pieces in order), the pieces of each cut
    file as one entry: its output, its counts summed, its first error line, how many pieces."""
    out: list[dict[str, Any]] = []
    for f in files:
        piece = f.get("piece")
        if not isinstance(piece, dict):
            out.append(f)
            continue
        if not out or out[-1].get("input") != f.get("input") or "pieces" not in out[-1]:
            out.append({"input": f.get("input"), "output": f.get("output"), "pieces": piece["of"][1]})
        joined = out[-1]
        for key in Counts().to_json():
            joined[key] = joined.get(key, 0) + int(f.get(key, 0))
        if "first_error" in f and "first_error" not in joined:
            joined["first_error"] = f["first_error"]
    return out


def pieces(parts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The pieces the parts predicted, by the output they are joined into, in order."""
    by_output: dict[str, list[dict[str, Any]]] = {}
    cut = (f for p in parts for f in p.get("files") or [] if isinstance(f.get("piece"), dict))
    for f in sorted(cut, key=_file_order):
        by_output.setdefault(str(f["output"]), []).append(f["piece"])
    return by_output


def unframed(parts: list[dict[str, Any]]) -> str | None:
    """Why the pieces of a TFRecord file do not meet at a record, when they do not: a piece's first
    record is not where the piece before it found the next, or the last one's records end before
    the file does. Data framed like records could make it so (see `worker.pipeline.tf_records`)."""
    by_input: dict[str, list[dict[str, Any]]] = {}
    cut = (f for p in parts for f in p.get("files") or [] if isinstance(f.get("piece"), dict))
    for f in sorted(cut, key=_file_order):
        if isinstance(f["piece"].get("records"), list):
            by_input.setdefault(str(f["input"]), []).append(f["piece"])
    return next(filter(None, (_gap(name, framed) for name, framed in by_input.items())), None)


def _gap(name: str, framed: list[dict[str, Any]]) -> str | None:
    """Where the pieces of the TFRecord file `name` do not meet at a record, if they do not."""
    m = framed[0]["of"][1]
    if [p["of"][0] for p in framed] != list(range(1, m + 1)):
        return None  # not all there: not joined, said so by `join_pieces`
    expected = 0
    for p in framed:
        records = p["records"]
        if not (len(records) == 2 and all(r is None or isinstance(r, int) for r in records)):
            return (
                f"TFRecord input {name}: the manifest of its piece {p['of'][0]} of {m} does not say where its records "
                f"are ({shown(records)}) — send the job again with another job_id"
            )
        first, following = records
        if first is not None and first != expected:
            return (
                f"TFRecord input {name} could not be cut at records: piece {p['of'][0]} of {m} found its first "
                f"record at byte {first:,}, where the piece before it found the next at byte {expected:,} (a "
                "record's data framed like records, or a corrupt record) — send the job again with another "
                "job_id and without parts"
            )
        expected = expected if first is None else following
    if expected != framed[-1]["bytes"][1]:
        return (
            f"TFRecord input {name} could not be cut at records: its last records end at byte {expected:,} of "
            f"{framed[-1]['bytes'][1]:,} — send the job again with another job_id and without parts"
        )
    return None


def join_pieces(whole: Job, store: Any, parts: list[dict[str, Any]]) -> list[str]:
    """Join the pieces of each cut file into its output, once every part has predicted its own.
    Returns the pieces that are not there to join (none when all went well)."""
    missing: list[str] = []
    for output, cut in pieces(parts).items():
        m = cut[0]["of"][1]
        objects = [Uri.parse(str(p["object"])) for p in cut]
        if [p["of"][0] for p in cut] != list(range(1, m + 1)):
            missing.append(f"{output}: {m - len(cut)} of its {m} pieces were not predicted")
            continue
        folder = _folder(objects)
        if not (absent := _absent(store, folder, objects)):
            try:
                store.compose(objects, Uri.parse(output), scratch=folder, job_id=whole.job_id, content_type=JSONL)
            except errors.WorkerError:
                if not (absent := _absent(store, folder, objects)):  # else joined by another part meanwhile
                    raise
        # Pieces are deleted as they are joined: gone, with the output this job's, they were joined.
        if absent and store.written_by(Uri.parse(output)) != whole.job_id:
            missing.append(f"{output}: its piece {absent[0]} is not there")
            continue
        log.info("job %s: %s joined from %d pieces", whole.job_id, output, m)
    return missing


def _folder(objects: list[Uri]) -> Uri:
    """The folder of a cut file's pieces (`<parts folder>/pieces/<file>/`)."""
    return objects[0].with_path(objects[0].path.rpartition("/")[0] + "/")


def _absent(store: Any, folder: Uri, objects: list[Uri]) -> list[str]:
    there = store.names_under(folder)
    return [str(o) for o in objects if o.path not in there]


def remove_pieces(store: Any, parts: list[dict[str, Any]]) -> None:
    """Delete what is left of the pieces once joined and the job's manifest written: Cloud Storage
    deletes them as it joins them, but for a file of more pieces than one request joins (and an
    emulator that keeps sources). A listing of each file's pieces, not a delete per piece."""
    for cut in pieces(parts).values():
        objects = [Uri.parse(str(p["object"])) for p in cut]
        absent = set(_absent(store, _folder(objects), objects))
        for o in objects:
            if str(o) not in absent:
                store.delete(o)


def write_combined(whole: Job, store: Any, manifest: dict[str, Any], *, replacing: int = 0) -> bool:
    """Write the whole job's manifest where none is (or where it is still generation `replacing`);
    False when another part wrote it first."""
    try:
        store.write_json(whole.manifest_uri, manifest, job_id=whole.job_id, if_generation_match=replacing)
    except errors.Conflict:
        log.info("job %s: another part wrote the job's manifest", whole.job_id)
        return False
    return True


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)
    except ValueError:
        return None


def give_up_part(part: Job, store: Store, publisher: Publisher | None, error: dict[str, str]) -> None:
    """A part no later delivery will run (its message goes to the dead-letter topic): its FAILED
    manifest, so that the whole job completes FAILED, naming it, once the other parts are done."""
    finish(part, store, None, RunState(error=error))
    combine(part, store, publisher)


def combine(part: Job, store: Store, publisher: Publisher | None) -> None:
    """After a part's manifest is written: when every part's is, the whole job's manifest and its
    completion message, published by whichever part writes that manifest."""
    whole = whole_job(part)
    parts = parts_done(whole, store)
    if parts is None:
        log.info("job %s: part %d of %d done; others still running", whole.job_id, *part.options.part or (0, 0))
        return
    manifest = _with_pieces_joined(whole, store, parts, {**combined(whole, parts), "combined_by": part.job_id})
    if not write_combined(whole, store, manifest) and not _replaced(whole, part, store, publisher, manifest):
        return
    if manifest["status"] != STATUS_FAILED:  # the job sent again after a FAILED one joins them again
        remove_pieces(store, parts)
    if publisher is not None:
        publish_completion(whole, store, publisher, manifest, manifest_written=True)
    totals = manifest["totals"]
    log.info(
        "job %s %s: %d parts, %d instances, %d predictions, %d errors",
        whole.job_id, manifest["status"], len(parts), totals["instances"], totals["predictions"], totals["errors"],
    )  # fmt: skip


def _with_pieces_joined(
    whole: Job, store: Store, parts: list[dict[str, Any]], manifest: dict[str, Any]
) -> dict[str, Any]:
    """The pieces of cut files joined into their outputs, unless a part failed (it runs again) or a
    TFRecord file's pieces do not meet; the job's manifest, FAILED when they could not be joined."""
    failed = any(p.get("status") == STATUS_FAILED for p in parts)
    apart = None if failed else unframed(parts)
    if apart is not None:
        return {**manifest, "status": STATUS_FAILED, "error": failure("INVALID_ARGUMENT", apart)}
    missing = [] if failed else join_pieces(whole, store, parts)
    if missing:
        stored = store.read_json(whole.manifest_uri)
        earlier = value_of(stored) if stored is not None else {}
        if earlier.get("job_id") != whole.job_id or earlier.get("status") == STATUS_FAILED:
            why = f"cannot join the pieces of {missing[0]} — send the job again with another job_id"
            return {**manifest, "status": STATUS_FAILED, "error": failure("NOT_FOUND", why)}
        # else: the part that wrote the job's manifest (not FAILED) joined them, then removed them
    return manifest


def _replaced(whole: Job, part: Job, store: Store, publisher: Publisher | None, manifest: dict[str, Any]) -> bool:
    """The whole job's manifest was written before. True when `manifest` replaced it: it said
    FAILED, and now that the failed part ran again (its message sent again from the dead-letter
    topic) none has failed. Else False, after publishing the earlier one when this part wrote it
    and its publishing was never confirmed (the part is delivered again because it failed)."""
    stored = store.read_json(whole.manifest_uri)
    earlier = value_of(stored) if stored is not None else {}
    if stored is None or earlier.get("job_id") != whole.job_id:
        return False
    if earlier.get("status") == STATUS_FAILED and manifest["status"] != STATUS_FAILED:
        return write_combined(whole, store, manifest, replacing=stored.generation)
    if publisher is not None and earlier.get("combined_by") == part.job_id and PUBLISHED_KEY not in stored.metadata:
        log.warning("job %s completed but its completion was not confirmed published: publishing it", whole.job_id)
        publish_completion(whole, store, publisher, earlier, manifest_written=True)
    return False
