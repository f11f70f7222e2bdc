"""A TCP proxy that holds each HTTP request for a while before passing it on: storage that answers
late, as Cloud Storage does (tens of milliseconds a request) where fake-gcs-server answers at once.

    python -m benchmarks.latency_proxy --port P --upstream 127.0.0.1:Q --latency-ms 20

It prints `ready` once listening. A request is the client's data after the upstream's last
answer: its first bytes wait `--latency-ms`, the rest of its body follows at once; answers are
passed back as they come. Run as a process of its own, so its work does not share the GIL of the
worker being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_data: Callable[[], Awaitable[None]]
) -> None:
    try:
        while data := await reader.read(65536):
            await on_data()
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve(port: int, upstream: str, latency_s: float) -> None:
    host, _, upstream_port = upstream.rpartition(":")

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(host, int(upstream_port))
        in_request = False

        async def request_data() -> None:
            nonlocal in_request
            if not in_request:
                in_request = True
                await asyncio.sleep(latency_s)

        async def answer_data() -> None:
            nonlocal in_request
            in_request = False

        await asyncio.gather(_pipe(client_r, up_w, request_data), _pipe(up_r, client_w, answer_data))

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT to pass requests to")
    parser.add_argument("--latency-ms", type=float, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.upstream, args.latency_ms / 1000))


if __name__ == "__main__":
    main()
