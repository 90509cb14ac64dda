"""One real server (``python -m serve`` on the vLLM CPU engine, demo model) per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import TEST_API_KEY, ServerProcess, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log_path, "--api-key", TEST_API_KEY) as srv:
        yield srv


@pytest.fixture
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_API_KEY}"}
