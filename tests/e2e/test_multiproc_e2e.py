"""``--api-server-count 2``: two front-end processes over one engine core, on real processes.

Both serve, one scrape shows the sum over both, Ctrl-C (SIGINT to the whole process group, as a
terminal sends it) drains both, and the death of the engine core or of one front end ends the
whole server with exit code 1, which a SIGTERM arriving meanwhile does not change (the
single-process behaviour, tests/e2e/test_lifecycle_e2e.py, holds for N processes)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    ServerProcess,
    metric_value,
    running_server,
    tokens_lasting,
    wait_not_ready,
    wait_running,
    wait_until,
)

TWO = ("--api-server-count", "2")
DRAIN = ("--drain-timeout", "180", "--demo-personas")
DEATH = ("--engine-dead-exit-delay", "12")


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], **extra}


def children(server: ServerProcess, title: str) -> list[psutil.Process]:
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in procs if title in p.name() or title in " ".join(p.cmdline())]


def access_pids(server: ServerProcess) -> list[int]:
    """The process that wrote each generation access-log line."""
    pids = []
    for line in server.log().splitlines():
        match = re.search(r"\[(\d+)\] serve\.access: (\{.*\})$", line)
        if match and json.loads(match.group(2))["path"] == "/v1/chat/completions":
            pids.append(int(match.group(1)))
    return pids


async def stream_text(
    client: httpx.AsyncClient, url: str, first: asyncio.Event | None, n: int
) -> str:
    parts: list[str] = []
    try:
        async with client.stream(
            "POST", url, json=chat(stream=True, max_tokens=n, ignore_eos=True)
        ) as r:
            async for chunk in r.aiter_text():
                parts.append(chunk)
                if first is not None:
                    first.set()
    except httpx.HTTPError:
        pass  # after a death the connection may end without a final frame
    return "".join(parts)


@pytest.mark.server_flags(*TWO, *DRAIN)
async def test_two_front_ends_serve_metrics_add_up_and_ctrl_c_drains_both(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path / "server.log", *TWO, *DRAIN) as server:
        front_ends = children(server, "APIServer")
        assert len(front_ends) == 2 and len(children(server, "EngineCore")) == 1
        url = f"{server.base_url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=120) as client:
            # Concurrent requests: least-loaded accept spreads them over both processes. On a
            # loaded machine one process may still win a whole wave, so send waves until both
            # have served (bounded).
            results: list[httpx.Response] = []
            for _ in range(8):
                results += await asyncio.gather(
                    *(client.post(url, json=chat(max_tokens=6, ignore_eos=True)) for _ in range(16))
                )
                sent = len(results)
                wait_until(lambda: len(access_pids(server)) == sent, 10, what="access log")  # noqa: B023
                if len(set(access_pids(server))) == 2:
                    break
            assert all(r.status_code == 200 for r in results)
            tokens = sum(r.json()["usage"]["completion_tokens"] for r in results)
            assert tokens == 6 * len(results)
            assert set(access_pids(server)) == {p.pid for p in front_ends}, "both served"
            # The engine core reaches each front end through ipc paths that must outlive the
            # start-up: an engine core that connects late (a loaded machine) must find them.
            paths = {c.laddr for p in front_ends for c in p.net_connections("unix") if c.laddr}
            assert len(paths) >= 4 and all(Path(path).exists() for path in paths), paths  # noqa: ASYNC240

            # Any process answers a scrape with the sum over both.
            for _ in range(4):
                text = (await client.get(f"{server.base_url}/metrics")).text
                assert metric_value(
                    text, "avatar_requests_total", endpoint="chat", status="200"
                ) == len(results)
                assert metric_value(text, "avatar_generation_tokens_total") == tokens
                assert metric_value(text, "vllm:generation_tokens_total") == tokens
                assert metric_value(text, "avatar_engine_alive") == 1

            # Personas (--lora-modules) load in every front end, under the same engine ids: a
            # persona answers alike whichever process takes the request.
            loads = re.findall(
                r"\[(\d+)\] serve\.personas: persona demo-tutor loaded", server.log()
            )
            assert {int(pid) for pid in loads} == {p.pid for p in front_ends}
            # One at a time, each on a new connection (so either process may take it), so that
            # no batch of another size changes the greedy arithmetic.
            persona = chat(model="demo-tutor", max_tokens=8, temperature=0)
            close = {"Connection": "close"}
            answers = [await client.post(url, json=persona, headers=close) for _ in range(6)]
            texts = {r.json()["choices"][0]["message"]["content"] for r in answers}
            assert len(texts) == 1, texts

            # Seconds long on this machine, whatever its speed: the signal comes mid-stream, and
            # the drains wait for the streams to end by themselves.
            tokens = await asyncio.to_thread(tokens_lasting, server.base_url, 8)
            # A client of their own, on new connections. In one run the four streams reached the
            # server one after another, 20 s apart, while this client's pool held the idle
            # connections of the waves above (the cause is not proven).
            fresh = httpx.AsyncClient(timeout=120)
            streams = [asyncio.create_task(stream_text(fresh, url, None, tokens)) for _ in range(4)]
            await wait_running(client, server.base_url, 4, 60)
            # Every process of the group gets it, as from a terminal: only the parent may act
            # on it (the engine core would abort the streams, a front end would take the
            # parent's SIGTERM as a second signal and cut them). SIGTERM to the parent alone
            # takes the same path in the parent (tests/unit/test_multiproc.py).
            os.killpg(server.proc.pid, signal.SIGINT)
            await wait_not_ready(client, server.base_url, 15)
            texts = await asyncio.gather(*streams)
            await fresh.aclose()
        for text in texts:
            assert text.endswith("data: [DONE]\n\n"), "every stream in flight ran to completion"
            last = json.loads(text.split("\n\n")[-3].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] == "length"
        assert await asyncio.to_thread(server.proc.wait, 120) == 0
        assert server.log().count("drained in") == 2, "each front end drained"
        # The streams were still running at the signal.
        waited_for = re.findall(r"waiting up to \S+ s for (\d+) request", server.log())
        assert sum(map(int, waited_for)) >= 1, "the signal came mid-stream"


@pytest.mark.server_flags(*TWO, *DEATH)
async def test_engine_core_death_fails_requests_and_exits_nonzero(tmp_path: Path) -> None:
    with running_server(tmp_path / "server.log", *TWO, *DEATH) as server:
        front_ends = children(server, "APIServer")
        url = f"{server.base_url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.Event()
            # An answer no machine finishes within the test: the death comes mid-stream.
            stream = asyncio.create_task(stream_text(client, url, first, ENDLESS_TOKENS))
            await asyncio.wait_for(first.wait(), 30)
            for proc in children(server, "EngineCore"):
                proc.kill()
            text = await asyncio.wait_for(stream, 30)  # never a hang
            assert '"code":"engine_dead"' in text or not text.endswith("data: [DONE]\n\n")

            def both_dead() -> bool:
                # Each scrape lands on either process; both must report the death.
                return all(
                    httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
                    for _ in range(6)
                )

            wait_until(both_dead, 10, what="both front ends failing /health")
            refused = await client.post(url, json=chat(max_tokens=4))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_dead"
            # The orchestrator's SIGTERM, while the parent waits out the exit delay: the exit
            # code is decided and stays 1.
            server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 90) == 1
        wait_until(
            lambda: not any(p.is_running() and p.status() != "zombie" for p in front_ends),
            10,
            what="front ends gone",
        )


@pytest.mark.server_flags(*TWO)
async def test_one_front_end_dying_ends_the_server_nonzero(tmp_path: Path) -> None:
    with running_server(tmp_path / "server.log", *TWO) as server:
        front_ends = children(server, "APIServer")
        engine = children(server, "EngineCore")
        front_ends[1].kill()
        # The orchestrator's SIGTERM, while the parent notices the death or stops the rest:
        # the exit is still 1, and the rest still stops.
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.proc.wait, 90) == 1
        deadline = time.monotonic() + 30
        survivors = [p for p in [front_ends[0], *engine] if p.is_running()]
        while survivors and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            survivors = [p for p in survivors if p.is_running() and p.status() != "zombie"]
        assert not survivors, "the other front end and the engine core stopped with it"
