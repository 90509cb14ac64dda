from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deploylib


@pytest.fixture(scope="session")
def tools() -> None:
    """Pinned kubectl/kustomize, hadolint, kubernetes-validate, promql-parser in .tools/."""
    deploylib.ensure_tools()


@pytest.fixture(scope="session")
def rendered(tools, tmp_path_factory) -> dict[str, list[dict]]:
    return deploylib.render_all(tmp_path_factory.mktemp("kustomize"))


@pytest.fixture(scope="session")
def contract() -> deploylib.ServerContract:
    try:
        return deploylib.load_contract()
    except deploylib.ContractUnavailable as e:
        # The server package is part of this repository: its absence is a failure, not a skip.
        pytest.fail(str(e))
