"""Fixtures for the load-test tests: a real server on a free loopback port, CPU engine.

``LOADTEST_SERVER`` picks the server: ``serve`` (default, ours: the run's shared ``python -m
serve``, tests/conftest.py) or ``vllm`` (vLLM's own OpenAI server, started here on the demo
model). ``LOADTEST_DEMO_MODEL_DIR`` names the demo model folder for it (default: the one the
e2e servers use, built once per checkout).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import DEMO_MODEL_NAME
from loadtest.servers import ServerProcess, engine_flags, free_port, vllm_command
from tests.support import DEMO_MODEL_DIR, ENGINE_ENV, TEST_API_KEY

READY_TIMEOUT_S = 300.0  # engine start on 2 shared cores is 15-60 s; this is only a bound
SERVED_NAME = DEMO_MODEL_NAME


def _kind() -> str:
    kind = os.environ.get("LOADTEST_SERVER", "serve")
    if kind not in ("serve", "vllm"):
        raise pytest.UsageError(f"LOADTEST_SERVER must be 'serve' or 'vllm', not {kind!r}")
    return kind


@pytest.fixture(scope="session")
def demo_model() -> Path:
    assert importlib.util.find_spec("vllm") is not None, "the set-up installs the vLLM engine"
    from serve.demo_model import ensure_built

    return ensure_built(os.environ.get("LOADTEST_DEMO_MODEL_DIR") or DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def server_api_key() -> str | None:
    """The key the server behind ``server_url`` wants (vLLM's, started here, wants none)."""
    return TEST_API_KEY if _kind() == "serve" else None


@pytest.fixture(scope="session")
def server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL (no /v1) of a running server on the demo model."""
    if _kind() == "serve":
        yield request.getfixturevalue("server").base_url
        return
    demo_model = request.getfixturevalue("demo_model")
    port = free_port()
    flags = engine_flags(
        str(demo_model),
        SERVED_NAME,
        max_model_len=2048,
        kv_cache_memory_bytes=512 << 20,
        enforce_eager=True,
    )
    srv = ServerProcess(
        "vllm",
        vllm_command(flags, port),
        port,
        log_path=tmp_path_factory.mktemp("server-log") / "vllm.log",
        ready_paths=("/health",),
        env=ENGINE_ENV,
    )
    with srv:
        srv.wait_ready(READY_TIMEOUT_S)
        yield srv.base_url
