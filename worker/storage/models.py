"""A SavedModel in Cloud Storage: which version folder a job's `model` designates (TF Serving's
numeric versions), and its files fetched to local disk, every name checked."""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.codec import shown
from worker.errors import ModelError, NotFound
from worker.media import MediaTransport
from worker.storage.errors import translate_errors
from worker.storage.values import SAVED_MODEL_FILES, LocalModel, ModelSource
from worker.uris import Uri, is_plain_path

log = logging.getLogger(__name__)

# Model files of other formats, by what their names end with: what each is, and what to do.
_OTHER_FORMATS = {
    (".keras", ".h5", ".hdf5"): ("a Keras model file", "export a SavedModel with Keras 3's `model.export(folder)`"),
    (".tflite",): ("a TensorFlow Lite model", "save the model it was converted from with `tf.saved_model.save`"),
    (".onnx",): ("an ONNX model", "convert it to a SavedModel (onnx-tf, say)"),
    (".pt", ".pth", ".pkl", ".joblib"): ("not a TensorFlow model", "this worker serves TensorFlow SavedModels"),
    (".zip", ".tar", ".tar.gz", ".tgz"): ("an archive", "unpack it into the bucket"),
}


def _not_saved_model(name: str) -> str:
    """What a model object named `name` is when its format is not a SavedModel's, and what to do
    ("; m.keras is a Keras model file, not a SavedModel: export …"); "" for other names."""
    for suffixes, (what, advice) in _OTHER_FORMATS.items():
        if name.lower().endswith(suffixes):
            return f"; {posixpath.basename(name)} is {what}, not a SavedModel: {advice}"
    return ""


def _safe_join(root: str, rel: str) -> str:
    """`root/rel` for a model object named `rel` in its folder, refusing any name that is not a
    plain path below it: a `.`, `..` or empty segment, a backslash, or a leading `/`."""
    segments = rel.split("/")
    if "\\" in rel or not is_plain_path(rel):
        raise ModelError(
            f"model object name {shown(rel)} is not a plain path in the model folder (it has a '.', '..' or empty "
            "segment, or a backslash): refusing to download it — rename or delete that object"
        )
    return os.path.join(root, *segments)


def model_base(model: Uri) -> Uri:
    """The folder `model` names: itself, or the folder of the saved_model.pb it names."""
    leaf = posixpath.basename(model.path)
    base = model.with_path(model.path[: -len(leaf)]) if leaf in SAVED_MODEL_FILES else model
    return base.as_prefix()


def resolve_model(client: Any, retry: Any, model: Uri) -> ModelSource:
    """Find the version folder `model` designates and list its objects (see `choose_version`)."""
    base = model_base(model)
    bucket = client.bucket(base.bucket)
    with translate_errors(f"reading model {model}", bucket):
        blobs = list(client.list_blobs(base.bucket, prefix=base.path, retry=retry))
        if not blobs and not model.is_prefix and bucket.get_blob(model.path, retry=retry) is not None:
            raise one_object(model)
    return choose_version(model, base, blobs)


def one_object(model: Uri) -> ModelError:
    return ModelError(
        f"model {model} is one object, not a folder{_not_saved_model(model.path)} — point `model` at "
        "the folder that holds saved_model.pb and variables/"
    )


def choose_version(model: Uri, base: Uri, blobs: list[Any]) -> ModelSource:
    """The version folder `model` designates among `blobs` (each with a `name` under `base.path`,
    a `size` and a `generation`): `base` itself when it holds saved_model.pb (or
    saved_model.pbtxt), else the highest of its numeric version folders holding one, as in TF Serving."""
    if not blobs:
        raise NotFound(f"model {model} does not exist: no object under {base} — check the path")
    rel_names = {b.name[len(base.path) :]: b for b in blobs}
    if any(name in rel_names for name in SAVED_MODEL_FILES):
        leaf = base.path.rstrip("/").rsplit("/", 1)[-1]
        return ModelSource.of(base, int(leaf) if leaf.isdigit() else None, blobs)
    versions = sorted(
        {
            int(folder)
            for folder, _, name in (rel.partition("/") for rel in rel_names)
            if folder.isdigit() and name in SAVED_MODEL_FILES
        }
    )
    if not versions:
        raise _no_saved_model(model, base, sorted(rel_names))
    version = versions[-1]
    folder = base.child(f"{version}/")
    return ModelSource.of(folder, version, [b for b in blobs if b.name.startswith(folder.path)])


def _no_saved_model(model: Uri, base: Uri, names: list[str]) -> ModelError:
    """Why a model folder of objects `names` (relative to `base`) is not a SavedModel, and where to
    point instead."""
    found = {posixpath.dirname(rel) + "/" for rel in names if posixpath.basename(rel) in SAVED_MODEL_FILES}
    if found:
        deeper = sorted(found)
        where = ", ".join(str(base.child(d)) for d in deeper[:3]) + (", …" if len(deeper) > 3 else "")
        return ModelError(
            f"model {model} has no saved_model.pb, nor numeric version folders holding one; there is one "
            f"deeper, in {where} — point `model` at that folder (or at the folder of its numeric versions)"
        )
    hint = next(filter(None, map(_not_saved_model, names)), "")
    return ModelError(
        f"model {model} has no saved_model.pb{hint} — point `model` at the version folder that "
        "holds saved_model.pb and variables/, or at its parent holding numeric version folders"
    )


def gcs_download(media: MediaTransport) -> Callable[[Any, str], None]:
    """A model object of Cloud Storage downloaded to a local path, checked by its CRC32C."""

    def download(blob: Any, path: str) -> None:
        with translate_errors(f"downloading model file gs://{blob.bucket.name}/{blob.name}"):
            url = media.download_url(blob.bucket.name, blob.name, blob.generation)
            media.download(url, path, crc32c=blob.crc32c)

    return download


def fetch_model(source: ModelSource, work_dir: str, copy: Callable[[Any, str], None], *, threads: int) -> LocalModel:
    """Copy the model's version folder under `work_dir` (`copy(object, local path)`, `threads` at
    a time), reusing an identical earlier copy: the folder appears whole or not at all."""
    folder, version, blobs, fingerprint = source.folder, source.version, source.blobs, source.fingerprint
    dest = os.path.join(work_dir, "models", fingerprint)
    if any(os.path.isfile(os.path.join(dest, name)) for name in SAVED_MODEL_FILES):
        log.info("model %s already on local disk", folder)
        return LocalModel(folder, version, dest, fingerprint, downloaded=False)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(dest))
    try:
        targets = []
        for b in blobs:
            rel = b.name[len(folder.path) :]
            if not rel or rel.endswith("/"):
                continue
            targets.append((b, _safe_join(staging, rel)))
        log.info("fetching model %s: %d files, %d bytes", folder, len(targets), source.size)

        def fetch(item: tuple[Any, str]) -> None:
            blob, path = item
            os.makedirs(os.path.dirname(path), exist_ok=True)
            copy(blob, path)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(fetch, targets))
        try:
            os.rename(staging, dest)
        except OSError:
            # Another job fetched the same model at the same time; theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LocalModel(folder, version, dest, fingerprint)
