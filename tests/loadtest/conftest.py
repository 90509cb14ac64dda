"""Fixtures for the load-test tests: a real server on a free loopback port, CPU engine.

``LOADTEST_SERVER`` picks the server: ``serve`` (default, ours: ``python -m serve``) or ``vllm``
(vLLM's own OpenAI server, the same engine flags). ``LOADTEST_DEMO_MODEL_DIR`` reuses an
already-built demo model instead of building one (about 10 s).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import DEMO_MODEL_NAME
from loadtest.servers import ServerProcess, engine_flags, free_port, ours_command, vllm_command

READY_TIMEOUT_S = 300.0  # engine start on 2 shared cores is 15-60 s; this is only a bound
SERVED_NAME = DEMO_MODEL_NAME


def _needs_engine() -> None:
    assert importlib.util.find_spec("vllm") is not None, "the set-up installs the vLLM engine"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_engine()
    from serve.demo_model import ensure_built

    given = os.environ.get("LOADTEST_DEMO_MODEL_DIR")
    return ensure_built(given or tmp_path_factory.mktemp("loadtest") / "demo-model")


@pytest.fixture(scope="session")
def server_url(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (no /v1) of a running server on the demo model; stopped at teardown."""
    kind = os.environ.get("LOADTEST_SERVER", "serve")
    port = free_port()
    flags = engine_flags(
        str(demo_model),
        SERVED_NAME,
        max_model_len=2048,
        kv_cache_memory_bytes=512 << 20,
        enforce_eager=True,
    )
    if kind == "serve":
        cmd, ready = ours_command(flags, port), ("/ready",)
    elif kind == "vllm":
        cmd, ready = vllm_command(flags, port), ("/health",)
    else:
        raise pytest.UsageError(f"LOADTEST_SERVER must be 'serve' or 'vllm', not {kind!r}")
    log = tmp_path_factory.mktemp("server-log") / f"{kind}.log"
    srv = ServerProcess(
        kind,
        cmd,
        port,
        log_path=log,
        ready_paths=ready,
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    with srv:
        srv.wait_ready(READY_TIMEOUT_S)
        yield srv.base_url
