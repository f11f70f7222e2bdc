"""The original tool's approach, reproduced as a baseline for the benchmarks.

For each input file: download it whole into memory, send all its lines as ONE
`{"instances": [...]}` request to a TF Serving REST endpoint, and write the predictions back as
one line each (prediction only, no instance) — what the Go server did on each request. The body
is built by joining the raw lines, as a string-concatenating client would (the cheapest way).

    python -m benchmarks.original --url http://127.0.0.1:8501/v1/models/model:predict \
        --input gs://bucket/in/ --output gs://bucket/out/ [--timeout 30]

Prints one JSON object: {"instances": N} on success, {"error": "..."} when it broke.
Exit 0 on success, 3 on a REST timeout, 4 on any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys

import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage


def _split(uri: str) -> tuple[str, str]:
    bucket, _, path = uri.removeprefix("gs://").partition("/")
    return bucket, path


def run(url: str, input_uri: str, output_uri: str, timeout_s: float) -> int:
    client = storage.Client(project="bench", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    in_bucket, in_path = _split(input_uri)
    out_bucket, out_path = _split(output_uri)
    if in_path.endswith("/"):
        blobs = [b for b in client.list_blobs(in_bucket, prefix=in_path) if not b.name.endswith("/")]
    else:
        blobs = [client.bucket(in_bucket).blob(in_path)]
    session = requests.Session()
    count = 0
    for blob in blobs:
        data = blob.download_as_bytes()
        lines = [line for line in data.split(b"\n") if line.strip()]
        body = b'{"instances":[' + b",".join(lines) + b"]}"
        del data
        r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=(10, timeout_s))
        del body
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        predictions = r.json()["predictions"]
        out = "".join(json.dumps(p) + "\n" for p in predictions).encode()
        rel = blob.name[len(in_path) :] if in_path.endswith("/") else blob.name.rsplit("/", 1)[-1]
        client.bucket(out_bucket).blob(out_path + rel).upload_from_string(out)
        count += len(predictions)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="TF Serving REST predict URL")
    parser.add_argument("--input", required=True, help="gs:// object, or prefix ending in /")
    parser.add_argument("--output", required=True, help="gs:// prefix ending in /")
    parser.add_argument("--timeout", type=float, default=30.0, help="REST timeout in seconds (default: 30)")
    args = parser.parse_args(argv)
    try:
        count = run(args.url, args.input, args.output, args.timeout)
    except requests.Timeout:
        print(json.dumps({"error": f"REST timeout after {args.timeout:.0f} s"}))
        return 3
    except (requests.RequestException, RuntimeError, MemoryError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}))
        return 4
    print(json.dumps({"instances": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
