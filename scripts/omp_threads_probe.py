"""The probe behind BENCHMARKS.md's "One OpenMP thread": a test server (the tests' flags, the
demo model) started with extra environment, N streams of M tokens at once, then tokens a second,
the server's CPU (its process tree, from /proc) and the client's own event-loop lag.

    .venv/bin/python scripts/omp_threads_probe.py '{"OMP_NUM_THREADS": "1"}' 8 400
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import MODEL, TEST_API_KEY, free_port, server_command  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User and system time of ``pid`` and its children so far."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    total = 0.0
    for p in [pid, *map(int, children.stdout.split())]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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


def start(extra_env: dict[str, str], log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    # The tests' layout (the model in the engine core's process), and nothing else of theirs.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra_env}
    proc = subprocess.Popen(
        server_command(port, "--api-key", TEST_API_KEY),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, port


async def wait_ready(client: httpx.AsyncClient, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("not ready in 120 s")


async def main(
    proc: subprocess.Popen[bytes], port: int, streams: int, tokens: int
) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120) as client:
        await wait_ready(client, port)
        await stream(client, port, 8)
        idle_from = cpu_seconds(proc.pid)
        await asyncio.sleep(2)
        idle = (cpu_seconds(proc.pid) - idle_from) / 2
        lags: list[float] = []

        async def lag_probe() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t - 0.01)

        cpu_from, start = cpu_seconds(proc.pid), time.perf_counter()
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
            "server_cpu": round((cpu_seconds(proc.pid) - cpu_from) / wall, 2),
            "idle_cpu": round(idle, 2),
            "client_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 1),
            "client_lag_max_ms": round(lags[-1] * 1000, 1),
        }


if __name__ == "__main__":
    extra = json.loads(sys.argv[1])
    with Path("/tmp/omp-probe.log").open("wb") as log:
        server, server_port = start(extra, log)
        try:
            row = asyncio.run(main(server, server_port, int(sys.argv[2]), int(sys.argv[3])))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    print(json.dumps({"env": extra, **row}))
