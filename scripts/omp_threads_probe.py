"""The probe behind BENCHMARKS.md's "One OpenMP thread": a test server (the tests' flags, the
demo model) started with extra environment, N streams of M tokens at once, then tokens a second,
the server's CPU (its process tree) and the client's own event-loop lag.

    .venv/bin/python scripts/omp_threads_probe.py '{"OMP_NUM_THREADS": "1"}' 8 400
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.servers import ServerProcess  # noqa: E402
from tests.support import MODEL, TEST_API_KEY, free_port, server_command  # noqa: E402


async def stream(client: httpx.AsyncClient, port: int, tokens: int) -> tuple[float, int]:
    """One streamed answer of ``tokens`` tokens: its TTFT and its chunk count."""
    start, first, chunks = time.perf_counter(), 0.0, 0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
    }
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    async with client.stream("POST", url, headers=headers, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
                first = first or time.perf_counter() - start
    return first, chunks


async def main(server: ServerProcess, streams: int, tokens: int) -> dict[str, Any]:
    port = server.port
    async with httpx.AsyncClient(timeout=120) as client:
        await stream(client, port, 8)
        idle_from = server.cpu_seconds()
        await asyncio.sleep(2)
        idle = (server.cpu_seconds() - idle_from) / 2
        lags: list[float] = []

        async def lag_probe() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t - 0.01)

        cpu_from, start = server.cpu_seconds(), time.perf_counter()
        probe = asyncio.create_task(lag_probe())
        results = await asyncio.gather(*[stream(client, port, tokens) for _ in range(streams)])
        probe.cancel()
        wall = time.perf_counter() - start
        lags.sort()
        return {
            "conc": streams,
            "tok_s": round(sum(r[1] for r in results) / wall, 1),
            "wall": round(wall, 2),
            "ttft_max": round(max(r[0] for r in results), 3),
            "server_cpu": round((server.cpu_seconds() - cpu_from) / wall, 2),
            "idle_cpu": round(idle, 2),
            "client_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 1),
            "client_lag_max_ms": round(lags[-1] * 1000, 1),
        }


if __name__ == "__main__":
    extra = json.loads(sys.argv[1])
    port = free_port()
    # The tests' layout (the model in the engine core's process), and nothing else of theirs.
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra}
    cmd = server_command(port, "--api-key", TEST_API_KEY)
    with ServerProcess("ours", cmd, port, log_path=Path("/tmp/omp-probe.log"), env=env) as srv:
        srv.wait_ready(120)
        row = asyncio.run(main(srv, int(sys.argv[2]), int(sys.argv[3])))
    print(json.dumps({"env": extra, **row}))
