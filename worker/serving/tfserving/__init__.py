"""TensorFlow Serving backend: `tensorflow_model_server` as a child process, spoken to over REST.

The server runs on 127.0.0.1 with free ports, the model laid out as `<base>/<name>/<version>/` (a
symlink to the downloaded folder). It is ready when `GET /v1/models/<name>` reports the version
`AVAILABLE`; a model it cannot load (`END` with an error), or whose metadata declares a scalar
output (refused by every row-format request) or one of a type it cannot write as JSON, is a
`ModelError`; a server that exits or never gets ready is transient. Its output is drained
continuously into the logs (a full pipe would block it). A batch answered 4xx is `BatchRejected`
with the server's message verbatim (the pipeline isolates what it refuses), or, when its instances
all have a shape or JSON types the signature's metadata says the input does not take, refused for
each instance with that reason; a 501 (an input type its REST API cannot fill from JSON, the same
for every request) is a `ModelError`; a 504 (a batch that outlived the server's timeout) or a 429
(out of memory for it) is sent again in halves, and later batches no bigger; a 500 (the model
failed on the batch: TensorFlow's UNKNOWN, INTERNAL or DATA_LOSS) is refused like a 4xx, so the
pipeline isolates the instances it fails on, as the in-process backend does; a connection error or
any other 5xx restarts the server and retries the batch a bounded number of times, then fails
transiently.

    process.py   the server as a child process, its lifecycle
    model.py     a model served: signatures from the metadata, a predictor each
    rest.py      batches over the REST predict API, answers and errors
    metadata.py  what the metadata says of inputs and outputs (pure)
"""

from worker.serving.tfserving.metadata import dims_of, input_shapes_of, input_types_of, outputs_declared
from worker.serving.tfserving.model import TFServingModel
from worker.serving.tfserving.process import ModelServer, ServerConfig
from worker.serving.tfserving.rest import RestPredictor, read_answer, rows_of, to_columns

__all__ = [
    "ModelServer",
    "RestPredictor",
    "ServerConfig",
    "TFServingModel",
    "dims_of",
    "input_shapes_of",
    "input_types_of",
    "outputs_declared",
    "read_answer",
    "rows_of",
    "to_columns",
]
