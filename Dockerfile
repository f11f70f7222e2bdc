# The worker as a Cloud Run service: functions-framework serving worker/main.py on $PORT.
# Serving backend: TensorFlow in-process (tensorflow-cpu from requirements.txt).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PORT=8080 \
    FUNCTION_TARGET=handle_event

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY worker/ worker/

RUN useradd --create-home --uid 10001 worker
USER worker

# FUNCTION_TARGET=handle_http serves the original GET /?model=…&input=…&output= interface instead.
CMD ["sh", "-c", "exec functions-framework --source worker/main.py --target \"$FUNCTION_TARGET\" --host 0.0.0.0 --port \"$PORT\""]
