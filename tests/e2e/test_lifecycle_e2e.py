"""Shutdown and failure on real server processes: SIGTERM drains streams in flight and exits 0;
a dead engine fails in-flight requests and probes, and the process exits non-zero."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    metric_value,
    running_server,
    tokens_lasting,
    wait_not_ready,
    wait_running,
    wait_until,
)


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], **extra}


async def read_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> str:
    body = chat(stream=True, max_tokens=max_tokens, ignore_eos=True)
    parts: list[str] = []
    async with client.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200
        async for chunk in resp.aiter_text():
            parts.append(chunk)
    return "".join(parts)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
async def test_sigterm_drains_streams_then_exits_zero(tmp_path: Path, how: str) -> None:
    """SIGTERM to the server process (an orchestrator), or Ctrl-C in a terminal: SIGINT to the
    whole process group, the engine core included, which must not cut the streams."""
    with running_server(tmp_path / "server.log", "--drain-timeout", "180") as server:
        url = f"{server.base_url}/v1/chat/completions"
        # Seconds long on this machine, whatever its speed: the signal must come mid-stream, and
        # the drain must wait for the streams to end by themselves.
        tokens = await asyncio.to_thread(tokens_lasting, server.base_url, 8)
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.create_task(read_stream(client, url, tokens)) for _ in range(3)]
            await wait_running(client, server.base_url, 3, 30)
            if how == "ctrl-c":
                os.killpg(server.proc.pid, signal.SIGINT)  # the server leads its own group
            else:
                server.proc.send_signal(signal.SIGTERM)
            ready_failed_after = await wait_not_ready(client, server.base_url, 10)
            refused = await client.post(url, json=chat(max_tokens=4))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            texts = await asyncio.gather(*streams)
        for text in texts:
            assert text.endswith("data: [DONE]\n\n"), "the stream in flight ran to completion"
            last = json.loads(text.split("\n\n")[-3].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] == "length"
        code = await asyncio.to_thread(server.proc.wait, 60)
        assert code == 0
        drained = re.search(r"drained in ([0-9.]+) s", server.log())
        assert drained, server.log()[-2000:]
        waited_for = re.search(r"waiting up to \S+ s for (\d+) request", server.log())
        assert waited_for and int(waited_for.group(1)) >= 1, "the signal came mid-stream"
        print(
            f"\n/ready failed {ready_failed_after * 1000:.0f} ms after SIGTERM; "
            f"drain of 3 streams took {drained.group(1)} s"
        )


async def test_dead_engine_fails_requests_and_exits_nonzero(tmp_path: Path) -> None:
    # The checks below run between the death and the exit: a delay that a busy machine cannot
    # outrun (the exit code is what the test is about, not how soon it comes).
    with running_server(tmp_path / "server.log", "--engine-dead-exit-delay", "12") as server:
        url = f"{server.base_url}/v1/chat/completions"
        engine_cores = [
            p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]  # fmt: skip
        assert engine_cores, "the engine core runs in its own process"
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.Event()
            stream = asyncio.create_task(read_stream_allowing_errors(client, url, first))
            await asyncio.wait_for(first.wait(), 30)
            for proc in engine_cores:
                proc.kill()
            text = await asyncio.wait_for(stream, 30)  # never a hang
            assert '"code":"engine_dead"' in text or not text.endswith("data: [DONE]\n\n")

            health = await client.get(f"{server.base_url}/health")
            assert health.status_code == 503
            assert (await client.get(f"{server.base_url}/ready")).status_code == 503
            refused = await client.post(url, json=chat(max_tokens=4))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_dead"
            metrics = (await client.get(f"{server.base_url}/metrics")).text
            assert metric_value(metrics, "avatar_engine_alive") == 0
        code = await asyncio.to_thread(server.proc.wait, 60)
        assert code == 1, "exits non-zero so that the orchestrator restarts it"
        wait_until(lambda: not psutil.pid_exists(server.proc.pid), 10)


async def read_stream_allowing_errors(
    client: httpx.AsyncClient, url: str, first: asyncio.Event
) -> str:
    parts: list[str] = []
    try:
        async with client.stream(
            "POST", url, json=chat(stream=True, max_tokens=ENDLESS_TOKENS, ignore_eos=True)
        ) as resp:
            async for chunk in resp.aiter_text():
                parts.append(chunk)
                first.set()
    except httpx.HTTPError:
        pass  # the connection may end without a final frame; what matters is that it ends
    return "".join(parts)
