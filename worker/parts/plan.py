"""One job run as parts on several instances: `options.parts` = N.

The job's own run (the dispatch) lists its input, cuts each file larger than a part's share of the
input's bytes into pieces (when it can be read in pieces: JSON lines or CSV stored as UTF-8, cut at
line starts, each CSV piece named by the file's header; TFRecord stored uncompressed, at records),
shares the files and pieces among N parts (by size, largest first, each to the part with the fewest
bytes so far) and keeps those shares at `<parts folder>/files-of-N.json` (the folder
`<output>/_parts/`, or for a dropped file's job `<output>/_manifests/<file>.parts/`), then publishes
N part jobs to the jobs topic (`WORKER_JOBS_TOPIC`): the same model, input, output and options,
with `part: [k, N]` instead of `parts`, the job id `<job id>/part-k-of-N` (and, for a dropped
file's job, its `manifest`). Pub/Sub pushes each to whichever instance Cloud Run gives it. Every
part predicts the files of its share, as the input holds them when it runs (a file deleted since is
left out, a file added since is in no share), writes its outputs where the whole job would, and its
manifest at `<parts folder>/part-k-of-N.json`; it publishes nothing itself. The part that then
finds all N part manifests written combines them into the job's manifest (created only where none
is: of two parts that finish together, one writes it), after joining each cut file's pieces
(written by the parts under `<parts folder>/pieces/`) into the file's output, and publishes the
job's one completion message. The job sent again keeps the shares of its first dispatch, so the
parts that succeeded then and the parts that run again never hold a file twice or miss one between
them.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, Protocol

from worker import errors
from worker.jobs import Job, part_manifest_path, shares_path
from worker.uris import Uri

log = logging.getLogger(__name__)

_PART_ID = "/part-"


class Sized(Protocol):
    @property
    def size(self) -> int: ...


def whole_job(part: Job) -> Job:
    """The job a part belongs to: its id without `/part-k-of-N`, `parts` instead of `part`."""
    assert part.options.part is not None
    options = dataclasses.replace(part.options, part=None, parts=part.options.part[1])
    return dataclasses.replace(part, job_id=part.job_id.rsplit(_PART_ID, 1)[0], options=options)


def part_id(whole_id: str, k: int, n: int) -> str:
    return f"{whole_id}{_PART_ID}{k}-of-{n}"


def share(inputs: Sequence[Sized], k: int, n: int) -> list[Any]:
    """The files of part k of n, in input order: by size, largest first, each file goes to the
    part with the fewest bytes so far (the lowest-numbered of equals)."""
    lightest = [(0, p) for p in range(n)]  # (bytes so far, part): a heap
    owner = [0] * len(inputs)
    for i in sorted(range(len(inputs)), key=lambda i: (-inputs[i].size, i)):
        load, p = heapq.heappop(lightest)
        owner[i] = p
        heapq.heappush(lightest, (load + inputs[i].size, p))
    return [f for i, f in enumerate(inputs) if owner[i] == k - 1]


@dataclasses.dataclass(frozen=True)
class Cut:
    """What a part is given: an input file whole, or piece i of m of it (the lines, or records,
    that begin in its bytes [start, end) of the file's generation `generation`)."""

    rel: str
    size: int  # the bytes it holds
    generation: int = 0
    piece: tuple[int, int] | None = None
    start: int = 0
    end: int = 0

    def to_json(self) -> str | dict[str, Any]:
        if self.piece is None:
            return self.rel
        piece, where = list(self.piece), [self.start, self.end]
        return {"rel": self.rel, "piece": piece, "bytes": where, "generation": self.generation}

    @classmethod
    def from_json(cls, value: Any) -> Cut | None:
        if isinstance(value, str):
            return cls(value, 0)
        try:
            (i, m), (start, end) = map(int, value["piece"]), map(int, value["bytes"])
            generation = int(value["generation"])
        except (KeyError, TypeError, ValueError):
            return None
        if not (1 <= i <= m and 0 <= start <= end):
            return None
        return cls(str(value["rel"]), end - start, generation, (i, m), start, end)


def cuts(inputs: Sequence[Any], n: int, *, min_piece_bytes: int, can_cut: Callable[[Any], bool]) -> list[Cut]:
    """The input files of a job in n parts, as parts are given them: whole, but for a file larger
    than a part's share of the bytes (of all the files, 1/n), cut into as many pieces as it holds
    shares, of at least `min_piece_bytes`, when it can be read in pieces (`can_cut`): one file as
    large as the rest together is spread over parts as a tree of many files is."""
    share_bytes = max(1, -(-sum(f.size for f in inputs) // n))
    out = []
    for f in inputs:
        m = min(-(-f.size // share_bytes), f.size // max(1, min_piece_bytes), n)
        if m >= 2 and can_cut(f):
            bounds = [f.size * i // m for i in range(m + 1)]
            out += [Cut(f.rel, b - a, f.generation, (i, m), a, b) for i, (a, b) in enumerate(pairwise(bounds), 1)]
            continue
        if m >= 2:
            log.warning(
                "%s (%d bytes) is larger than a part's share but is not cut into pieces: only JSON lines or CSV "
                "stored as UTF-8, or TFRecord stored uncompressed, are (this one is gzip-compressed, UTF-16, a file "
                "list or of another format); one part predicts it whole",
                f.uri, f.size,
            )  # fmt: skip
        out.append(Cut(f.rel, f.size, f.generation))
    return out


def fixed_shares(whole: Job, store: Any, given: Sequence[Cut], n: int) -> list[list[Cut]]:
    """What each of the n parts of `whole` is given: what its first dispatch shared and kept, else
    `given` shared now and kept (replacing another job's)."""
    uri = whole.parts_folder.child(shares_path(n))
    stored = store.read_json(uri)
    kept = _shares(stored.value if stored is not None else None, whole, n)
    if kept is not None:
        log.info("job %s: its parts keep the files they were given when it was first dispatched", whole.job_id)
        return kept
    shares = [share(given, k, n) for k in range(1, n + 1)]
    value = {"job_id": whole.job_id, "input": str(whole.input), "shares": [[c.to_json() for c in s] for s in shares]}
    store.write_json(uri, value, job_id=whole.job_id, if_generation_match=stored.generation if stored else 0)
    return shares


def part_files(part: Job, store: Any, inputs: Sequence[Any]) -> list[Any]:
    """The files of `inputs` (as listed now), and pieces of files, that the dispatch gave `part`,
    in input order. A part published before the dispatch kept its shares takes its share of
    `inputs` instead. A piece of a file replaced or deleted since the dispatch fails the part."""
    assert part.options.part is not None
    k, n = part.options.part
    whole = whole_job(part)
    uri = whole.parts_folder.child(shares_path(n))
    stored = store.read_json(uri)
    shares = _shares(stored.value if stored is not None else None, whole, n)
    if shares is None:
        log.warning("job %s: no shares kept at %s; sharing the input as listed now", part.job_id, uri)
        return share(inputs, k, n)
    listed = {f.rel: f for f in inputs}
    _check_pieces(whole, shares[k - 1], listed)
    gone = [c.rel for c in shares[k - 1] if c.rel not in listed]
    if gone:
        log.warning(
            "job %s: %d of its %d files were deleted after the job was dispatched (%s%s); predicting the others",
            part.job_id, len(gone), len(shares[k - 1]), gone[0], ", …" if len(gone) > 1 else "",
        )  # fmt: skip
    given = [c for c in shares[k - 1] if c.rel in listed]
    return [
        dataclasses.replace(listed[c.rel], piece=c.piece, start=c.start, end=c.end) if c.piece else listed[c.rel]
        for c in sorted(given, key=lambda c: (c.rel, c.start))
    ]


def _check_pieces(whole: Job, given: list[Cut], listed: dict[str, Any]) -> None:
    """A piece of a file replaced or deleted since the dispatch fails the part: pieces of two
    versions of a file cannot be joined."""
    for c in given:
        if c.piece is not None and (c.rel not in listed or listed[c.rel].generation != c.generation):
            raise errors.InvalidJob(
                f"input {whole.input.child(c.rel) if whole.input.is_prefix else whole.input} was "
                f"{'replaced' if c.rel in listed else 'deleted'} after the job was dispatched, and this part "
                f"predicts a piece of it (bytes {c.start:,} to {c.end:,} of generation {c.generation}) — send the "
                "job again with another job_id"
            )


def _shares(value: Any, whole: Job, n: int) -> list[list[Cut]] | None:
    """The shares in a stored `files-of-N.json` when it is this job's (same id and input)."""
    if not isinstance(value, dict) or value.get("job_id") != whole.job_id or value.get("input") != str(whole.input):
        return None
    shares = value.get("shares")
    if not isinstance(shares, list) or len(shares) != n or not all(isinstance(s, list) for s in shares):
        return None
    kept = [[Cut.from_json(c) for c in s] for s in shares]
    return None if any(c is None for s in kept for c in s) else kept  # type: ignore[return-value]


def part_messages(job: Job, n: int) -> list[tuple[bytes, dict[str, str]]]:
    """The part jobs of `job`, as job messages (data, attributes) for the jobs topic."""
    options = job.options.to_json()
    options.pop("parts", None)
    messages = []
    for k in range(1, n + 1):
        pid = part_id(job.job_id, k, n)
        body = {
            "model": str(job.model),
            "input": str(job.input),
            "output": str(job.output),
            "job_id": pid,
            "options": {**options, "part": [k, n]},
            **({"manifest": str(job.manifest)} if job.manifest is not None else {}),  # a dropped file's
        }
        messages.append((json.dumps(body).encode(), {"job_id": pid}))
    return messages


def part_manifests(whole: Job, n: int) -> list[Uri]:
    return [whole.parts_folder.child(part_manifest_path(k, n)) for k in range(1, n + 1)]


def value_of(stored: Any) -> dict[str, Any]:
    """A stored manifest's value, when it is an object."""
    return stored.value if isinstance(stored.value, dict) else {}
