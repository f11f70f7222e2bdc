# The worker as a Cloud Run service: functions-framework serving worker/main.py on $PORT.
#
# Serving backend, chosen at build time with --build-arg SERVING=…:
#   tfserving  (default) the real tensorflow_model_server, copied from the official image whose
#              version matches tensorflow-cpu in requirements-tensorflow.txt (test_dockerfile.py
#              checks); no TensorFlow in Python: the worker never imports it behind TF Serving
#   tensorflow TensorFlow in-process only (requirements-tensorflow.txt), for registries that cannot
#              pull tensorflow/serving
ARG TF_SERVING_VERSION=2.21.0
ARG SERVING=tfserving

FROM tensorflow/serving:${TF_SERVING_VERSION} AS tfserving-binary

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PORT=8080 \
    FUNCTION_TARGET=handle_event \
    WORKER_WORK_DIR=/tmp/embedded-tf
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY worker/ worker/
# The worker's bytecode in the image: PYTHONDONTWRITEBYTECODE keeps an instance from writing it,
# so without this every cold start compiles the worker's modules again (about 0.1 s).
RUN python -m compileall -q worker \
    && useradd --create-home --uid 10001 worker

FROM base AS serving-tfserving
COPY --from=tfserving-binary /usr/bin/tensorflow_model_server /usr/local/bin/tensorflow_model_server
ENV WORKER_SERVING=tfserving

FROM base AS serving-tensorflow
COPY requirements-tensorflow.txt .
RUN pip install --no-cache-dir -r requirements-tensorflow.txt
ENV WORKER_SERVING=tensorflow

# A stage of this file picked by SERVING, not a registry image: there is no tag to pin.
# checkov:skip=CKV_DOCKER_7:serving-${SERVING} is a stage of this file, not a registry image
# hadolint ignore=DL3006
FROM serving-${SERVING}
USER 10001
HEALTHCHECK NONE
# FUNCTION_TARGET=handle_http serves the original GET /?model=…&input=…&output= interface instead.
CMD ["sh", "-c", "exec functions-framework --source worker/main.py --target \"$FUNCTION_TARGET\" --host 0.0.0.0 --port \"$PORT\""]
