"""embedded-tf: batch predictions with a TensorFlow SavedModel over JSON-lines files in Cloud Storage."""

__version__ = "0.1.0"
