"""Our unit tests against the GPU kit's vLLM release, here on the CPU, before any device time.

The kit carries an older vLLM (``VLLM_VERSION`` in prepare_carry.py: what the device image's
torch runs) than the one we build and test on. Our adapter's use of vLLM's Python API (parsers,
templates, request objects, argument parsing) must hold for both. On 2026-11-30 it did not: our
server failed to start twice on the H200 (``vllm.renderers.chat_utils`` and
``get_parser(tool_strict_level=...)`` are newer), which cost the whole device budget.

This check puts the kit's vLLM Python files (from its wheel, compiled parts left out) ahead of
the local vLLM on ``sys.path``, names the package a CPU build (so its platform detection picks
the CPU), and runs the unit tests that need no running engine. A failure here is one the
server would hit on the device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Unit tests of flags that only the newer vLLM has (its --log-level), and of the launcher of
# several front ends (multiproc: run only with BENCH_API_SERVERS=2, whose failure does not fail
# the kit).
DESELECT = (
    "tests/unit/test_settings.py::test_known_names_cover_frontend_and_engine",
    "tests/unit/test_multiproc.py",
)


def extract_sources(wheel: Path, out: Path, version: str) -> Path:
    """The wheel's Python files under ``out`` (once), with a dist-info that names a CPU build."""
    stamp = out / ".extracted"
    if not (stamp.exists() and stamp.read_text() == wheel.name):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith("vllm/") and name.endswith((".py", ".json", ".jinja")):
                    zf.extract(name, out)
        info = out / f"vllm-{version}+cpu.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        (info / "METADATA").write_text(metadata)
        stamp.write_text(wheel.name)
    return out


def run_unit_tests(sources: Path, python: str = sys.executable) -> int:
    """pytest's exit code for tests/unit with ``sources`` shadowing the local vLLM."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sources), str(ROOT)])}
    deselect = [f"--deselect={d}" if "::" in d else f"--ignore={d}" for d in DESELECT]
    cmd = [python, "-m", "pytest", "tests/unit", "-q", "-p", "no:cacheprovider", *deselect]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def sources_dir(work: Path, version: str) -> Path:
    return work / f"vllm-{version}-src"


def check(wheel: Path, version: str, work: Path) -> bool:
    print(f"== our unit tests on the kit's vLLM {version} (its Python files, on this CPU)")
    code = run_unit_tests(extract_sources(wheel, sources_dir(work, version), version))
    if code != 0:
        print(
            f"FAILED: the server would not work on the kit's vLLM {version}; fix the adapter "
            "(serve/engine) before spending device time.",
            file=sys.stderr,
        )
    return code == 0
