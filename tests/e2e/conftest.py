"""Real servers (``python -m serve`` on the vLLM CPU engine, demo model) shared by the e2e tests:
``server`` and ``small_server`` (tests/conftest.py, the whole run's) and the ones below, each
started once. A test starts a server of its own only where it ends it (a drain, a crash) or needs
other flags."""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import IO

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
# written down. Drain tests have failed because their client saw its streams only once the server
# had sent them whole (BENCHMARKS.md, "Test command times"): this says what the test process
# was doing meanwhile. The stacks go to one file for the run (named at its end, passing tests'
# stalls included) and into the stalled test's captured stderr (shown when it fails).
LOOP_STALL_S = 3.0
STALLS: list[str] = []  # the tests whose loop stalled


@pytest.fixture(scope="session")
def stall_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IO[str]]:
    with (tmp_path_factory.getbasetemp() / "loop-stalls.txt").open("a+") as f:
        yield f


@pytest.fixture(autouse=True)
async def loop_stall_stacks(
    request: pytest.FixtureRequest, stall_file: IO[str]
) -> AsyncIterator[None]:
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        yield  # a test that does not run on the loop would look stalled throughout
        return

    async def beat() -> None:
        while True:
            faulthandler.dump_traceback_later(LOOP_STALL_S, file=stall_file)
            await asyncio.sleep(0.1)

    before = os.fstat(stall_file.fileno()).st_size
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        faulthandler.cancel_dump_traceback_later()
        if os.fstat(stall_file.fileno()).st_size > before:
            STALLS.append(request.node.nodeid)
            stall_file.seek(before)
            sys.stderr.write(f"event loop stalled over {LOOP_STALL_S} s:\n{stall_file.read()}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if STALLS:
        terminalreporter.write_line(
            f"event loop stalled over {LOOP_STALL_S} s in {len(STALLS)} engine test(s) "
            f"({', '.join(STALLS)}); every thread's stack: loop-stalls.txt in the run's "
            "pytest temporary folder",
            yellow=True,
        )
