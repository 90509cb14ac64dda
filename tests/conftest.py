"""The whole suite: which tests need the real engine (marked ``e2e``), the order tests run in, the
session's shared server, and the servers started ahead of the tests that use them.

``scripts/test.sh --fast`` runs ``-m "not e2e"``: every test that starts or talks to a real
engine must carry the mark. Tests in tests/e2e, and tests that use one of ENGINE_FIXTURES, get it
here; others (a load tool run against a server it starts) are marked in their modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.support import (
    SERVER_FIXTURES,
    TEST_API_KEY,
    Planned,
    ServerKey,
    ServerPool,
    ServerProcess,
    running_server,
    server_key,
)

HERE = Path(__file__).resolve().parent

# Fixtures that are, or stand on, a real server.
ENGINE_FIXTURES = frozenset({*SERVER_FIXTURES, "server_url", "persona_server"})

# Servers that tests start inside their own bodies, because the test ends them (a drain, a
# crash): planned here by test function, so that each is started ahead of its test too. A test
# can say the same with @pytest.mark.server_flags(...). A test whose flags no longer match its
# row starts its own server, as before; the run then names the unused one at its end.
IN_TEST_SERVERS: dict[str, tuple[str, ...]] = {
    "e2e/test_lifecycle_e2e.py::test_sigterm_drains_streams_then_exits_zero": (
        "--drain-timeout", "180",
    ),
    "e2e/test_lifecycle_e2e.py::test_dead_engine_fails_requests_and_exits_nonzero": (
        "--engine-dead-exit-delay", "12",
    ),
    # The --api-server-count servers start ahead too, by their tests' server_flags marks
    # (tests/e2e/test_multiproc_e2e.py).
}  # fmt: skip

# The engine tests run after all the others, so that their first servers start while the quick
# tests run; the GPU kit's dry run, which starts servers of its own, last.
ENGINE_ORDER = ("e2e", "loadtest", "device")


def _relative(item: pytest.Item) -> str:
    path = Path(str(item.path)).resolve()
    return path.relative_to(HERE).as_posix() if path.is_relative_to(HERE) else path.as_posix()


def _needs_engine(item: pytest.Item) -> bool:
    return (
        _relative(item).startswith("e2e/")
        or item.get_closest_marker("e2e") is not None
        or bool(ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    )


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_engine(item) and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("e2e") is None:
            return 0
        top = _relative(item).split("/", 1)[0]
        return 1 + (ENGINE_ORDER.index(top) if top in ENGINE_ORDER else len(ENGINE_ORDER))

    items.sort(key=rank)  # stable: otherwise in collection order


def _shared(item: pytest.Item) -> list[ServerKey]:
    names = getattr(item, "fixturenames", ())
    keys = [server_key(flags) for name, flags in SERVER_FIXTURES.items() if name in names]
    if "server_url" in names and os.environ.get("LOADTEST_SERVER", "serve") == "serve":
        keys.append(server_key(SERVER_FIXTURES["server"]))
    return keys


def _own(item: pytest.Item) -> tuple[str, ...] | None:
    marker = item.get_closest_marker("server_flags")
    if marker is not None:
        return tuple(marker.args)
    return IN_TEST_SERVERS.get(f"{_relative(item)}::{item.name.split('[', 1)[0]}")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Plan the servers the selected tests will start, in the order they will need them."""
    # Four: the quick tests run serially on one core, and the servers' starts take the other
    # (two left it idle for most of the quick tests, and the engine tests then waited for theirs).
    ahead = int(os.environ.get("AVATAR_TEST_SERVERS_AHEAD", "4"))
    if ahead <= 0 or os.environ.get("PYTEST_XDIST_WORKER") or session.config.option.collectonly:
        return
    plan: list[Planned] = []
    shared: dict[ServerKey, Planned] = {}
    for item in session.items:
        for key in _shared(item):  # one for the whole run
            if key not in shared:
                shared[key] = Planned(key, item.nodeid)
                plan.append(shared[key])
            shared[key].last_user = item.nodeid
        own = _own(item)
        if own is not None:  # one for each test
            plan.append(Planned(server_key(own), item.nodeid))
    if plan:
        log_dir = session.config._tmp_path_factory.mktemp("servers-ahead")  # type: ignore[attr-defined]
        support.POOL = ServerPool(log_dir, plan, ahead)
        support.POOL.advance()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if support.POOL is not None:
        support.POOL.advance()


def pytest_runtest_logfinish(nodeid: str) -> None:
    if support.POOL is not None:
        support.POOL.finished(nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    pool, support.POOL = support.POOL, None
    if pool is None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for planned in pool.close():
        flags = " ".join(planned.key[0])
        line = f"a server started ahead for {planned.last_user} went unused ({flags}): skipped, "
        if reporter is not None:
            reporter.write_line(
                line + "or the plan in tests/conftest.py is out of date", yellow=True
            )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The run's shared server (``SERVER_FIXTURES["server"]``): tests that need no other
    flags use this one and leave it as they found it."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log_path, *SERVER_FIXTURES["server"]) as srv:
        yield srv


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Room for 2 running and 2 waiting, no parser, no deadline (``SERVER_FIXTURES``): the soak
    (tests/loadtest/test_soak.py) and the forced calls without a parser (tests/e2e)."""
    log_path = tmp_path_factory.mktemp("small") / "server.log"
    with running_server(log_path, *SERVER_FIXTURES["small_server"]) as srv:
        yield srv


@pytest.fixture
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_API_KEY}"}
