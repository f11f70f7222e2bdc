"""Cloud Storage I/O, and the only importer of `google.cloud.storage`.

Lists input objects, streams their lines, writes outputs that appear whole or not at all, reads and
writes manifests, and fetches a SavedModel (resolving TF Serving's numeric version folders).
SDK exceptions are translated here into the worker's permanent/transient errors.

    store.py       GcsStore: the one object the rest of the worker holds
    values.py      InputFile, StoredJson, ModelSource, LocalModel (pure)
    errors.py      the SDK's and the transport's failures as the worker's errors
    formats.py     gzip, byte order marks, other formats, a piece's lines (pure)
    background.py  read-ahead and write-behind threads
    upload.py      an output's single or resumable upload, checked by CRC32C
    models.py      a model's version folder resolved and fetched
"""

from worker.storage.background import BackgroundWriter
from worker.storage.errors import translate_errors
from worker.storage.store import READ_CHUNK_BYTES, GcsStore
from worker.storage.values import SAVED_MODEL_FILES, WRITTEN_BY_KEY, InputFile, LocalModel, ModelSource, StoredJson

__all__ = [
    "READ_CHUNK_BYTES",
    "SAVED_MODEL_FILES",
    "WRITTEN_BY_KEY",
    "BackgroundWriter",
    "GcsStore",
    "InputFile",
    "LocalModel",
    "ModelSource",
    "StoredJson",
    "translate_errors",
]
