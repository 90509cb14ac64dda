"""Real servers (``python -m serve`` on the vLLM CPU engine, demo model) shared by the e2e tests:
``server`` and ``small_server`` (tests/conftest.py, the whole run's) and the ones below, each
started once. A test starts a server of its own only where it ends it (a drain, a crash) or needs
other flags."""

from __future__ import annotations

from collections.abc import Iterator

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
