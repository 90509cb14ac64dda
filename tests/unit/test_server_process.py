"""One front end (``serve/server.py``: uvicorn, the app, the exit code) over the fake engine, in a
process of its own: real signals, a real socket. An exit code decided as 1 stays 1; a client
that stops reading is let go after ``--write-timeout``, its slot freed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from tests.support import ROOT, free_port, metric_value, wait_until
from tests.unit.conftest import KEY, chat_body

# argv: port, then "dies" (the engine dies once serving, and its shutdown waits for the file
# argv[3]: the window in which an orchestrator's SIGTERM arrives) or "serves" (a long context,
# one slot, a one-second write timeout).
_SERVER = """
import asyncio, pathlib, sys
from serve.engine.fake import FakeEngine
from serve.server import serve_engine
from tests.unit.conftest import make_settings

port, mode = int(sys.argv[1]), sys.argv[2]

class SlowToStop(FakeEngine):
    async def shutdown(self):
        print("engine shutting down", flush=True)
        async with asyncio.timeout(60):
            while not pathlib.Path(sys.argv[3]).exists():
                await asyncio.sleep(0.02)
        await super().shutdown()

async def main():
    if mode == "dies":
        engine = SlowToStop()
        asyncio.get_running_loop().call_later(0.2, engine.kill)
        settings = make_settings(engine_dead_exit_delay=0)
    else:
        engine = FakeEngine(max_model_len=300_000)
        settings = make_settings(write_timeout=1, max_running_requests=1)
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    return await serve_engine(settings, engine, 0.0)

sys.exit(asyncio.run(main()))
"""


@contextmanager
def fake_server(*args: str) -> Iterator[subprocess.Popen[str]]:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield server
    finally:
        server.kill()
        server.wait(10)


def test_a_sigterm_while_the_engine_stops_keeps_exit_code_1(tmp_path: Path) -> None:
    """The engine died (exit 1 decided); the orchestrator's SIGTERM arrives while the server
    shuts the engine down. The process must still exit 1 (it was killed by the signal, exit
    143, once uvicorn had put the default handlers back)."""
    release = tmp_path / "release"
    with fake_server(str(free_port()), "dies", str(release)) as server:
        out = server.stdout
        assert out is not None
        lines: list[str] = []

        def shutting_down() -> bool:
            lines.append(out.readline())
            return "engine shutting down" in lines[-1] or server.poll() is not None

        wait_until(shutting_down, 60, 0, "the engine shutting down")
        # Sent before the release: the process handles it before it can see the file.
        server.send_signal(signal.SIGTERM)
        release.touch()
        code = server.wait(30)
        rest = out.read()
        assert code == 1, "".join(lines) + rest
        assert "SIGTERM ignored" in rest


def test_a_client_that_stops_reading_is_let_go_and_its_slot_freed() -> None:
    """A real socket that never reads a long stream: once the kernel's buffers and uvicorn's
    are full, the server's writes wait; after --write-timeout the request ends (499), the
    engine request is aborted, and the one slot serves the next client."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with fake_server(str(port), "serves") as server:

        def ready() -> bool:
            return server.poll() is not None or httpx.get(f"{base}/ready").status_code == 200

        wait_until(ready, 60, 0.05, "ready")
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        body = orjson.dumps(chat_body(stream=True, max_tokens=250_000, ignore_eos=True))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(head.encode() + body)  # and never reads a byte of the answer

            def let_go() -> bool:
                text = httpx.get(f"{base}/metrics").text
                return (
                    metric_value(text, "avatar_requests_total", status="499") == 1
                    and metric_value(text, "avatar_requests_running") == 0
                    and metric_value(text, "avatar_engine_unfinished_requests") == 0
                )

            wait_until(let_go, 60, 0.1, "the stalled request let go")
            headers = {"Authorization": f"Bearer {KEY}"}
            r = httpx.post(f"{base}/v1/chat/completions", json=chat_body(), headers=headers)
            assert r.status_code == 200, "the slot serves the next client"


def test_sigusr1_prints_every_threads_stack() -> None:
    """An operator (or a test whose server never came ready) sends SIGUSR1 to see where a server
    process waits; the process goes on running."""
    code = (
        "import os, signal, threading\n"
        "from serve.server import enable_stack_dumps\n"
        "enable_stack_dumps()\n"
        "def waiting_in_a_thread(): threading.Event().wait()\n"
        "threading.Thread(target=waiting_in_a_thread, daemon=True).start()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('still running')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Current thread" in done.stderr and "waiting_in_a_thread" in done.stderr
    assert done.stdout.strip() == "still running"
