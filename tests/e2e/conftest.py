"""Real servers (``python -m serve`` on the vLLM CPU engine, demo model) shared by the e2e tests:
``server`` and ``small_server`` (tests/conftest.py, the whole run's) and the ones below, each
started once. A test starts a server of its own only where it ends it (a drain, a crash) or needs
other flags."""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support import SERVER_FIXTURES, ServerProcess, running_server


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Admission limits and a deadline (``SERVER_FIXTURES``)."""
    log_path = tmp_path_factory.mktemp("limited") / "server.log"
    with running_server(log_path, *SERVER_FIXTURES["limited_server"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("reasoning") / "server.log"
    with running_server(log_path, *SERVER_FIXTURES["reasoning_server"]) as srv:
        yield srv


# How long an engine test's event loop may go without running before every thread's stack is
# printed (into the test's captured stderr, shown when it fails). Drain tests have failed because
# their client saw its streams only once the server had sent them whole (BENCHMARKS.md, "Test
# command times"): this says what the test process was doing meanwhile.
LOOP_STALL_S = 3.0


@pytest.fixture(autouse=True)
async def loop_stall_stacks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        yield  # a test that does not run on the loop would look stalled throughout
        return

    async def beat() -> None:
        while True:
            faulthandler.dump_traceback_later(LOOP_STALL_S)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        faulthandler.cancel_dump_traceback_later()
