"""Do the device image's packages and what the kit carries import what a request reaches?

The kit carries only the part of vLLM's dependencies the GPU path imports (``PINS`` in
prepare_carry.py); the rest was left out by a trace made once. A request can reach modules that
trace never saw: on 2026-11-30 (GPU run 3) every forced tool call failed on the card, because
vLLM 0.26.0 imports ``lmformatenforcer`` while it validates any structured-output request, and
the kit did not carry it. The unit tests could not see it: here the local environment has it.

This check imports the modules a request of the benchmark reaches (our server's, vLLM's server,
every structured-output backend, the Hermes tool parser, Qwen3's reasoning parser) in a Python
that sees only the standard library, the kit's vLLM Python files, this repository, and the
local installs of the distributions the image has (``image-packages.txt``) or the kit carries.
A module that would be missing on the card is missing here, and the import says which. Code
that guards an optional import with ``try/except ImportError`` takes the same branch as there.
It checks names, not versions or compiled code.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from prepare_carry import normalize

ROOT = Path(__file__).resolve().parents[2]
IMAGE_PACKAGES = Path(__file__).with_name("image-packages.txt")

# What a benchmark request reaches beyond start-up: the forced tool calls of the voice step go
# through structured-output validation, which imports every backend's module (vLLM 0.26.0,
# SamplingParams._validate_structured_outputs).
MODULES = (
    "serve.cli",
    "serve.app",
    "serve.engine.vllm_engine",
    "serve.engine.vllm_agents",
    "vllm.entrypoints.openai.api_server",
    "vllm.v1.structured_output.backend_xgrammar",
    "vllm.v1.structured_output.backend_guidance",
    "vllm.v1.structured_output.backend_lm_format_enforcer",
    "vllm.v1.structured_output.backend_outlines",
    "vllm.tool_parsers.hermes_tool_parser",
    "vllm.reasoning.qwen3_engine_reasoning_parser",
)


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {normalize(line) for line in lines if line}


def filtered_site(allowed: set[str], out: Path, wheels: Mapping[str, Path] = {}) -> list[str]:
    """Links in ``out`` to the top-level files of every local distribution in ``allowed``
    (modules, packages, their ``.libs`` folders and dist-info), so that nothing else imports;
    an allowed one with no local install is unpacked from its carried wheel, if ``wheels``
    has it. Returns the allowed names found in neither."""
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name not in allowed or name in seen or not dist.files:
            continue
        seen.add(name)
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}:
            src = Path(str(dist.locate_file(top)))
            link = out / top
            if src.exists() and not link.exists() and not top.endswith(".pth"):
                link.symlink_to(src)
    for name in sorted(allowed - seen):
        wheel = wheels.get(name)
        if wheel is not None:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(out)
            seen.add(name)
    return sorted(allowed - seen)


def check_imports(
    sources: Path,
    carried: Mapping[str, Path],
    modules: Sequence[str] = MODULES,
    image: Path = IMAGE_PACKAGES,
    python: str = sys.executable,
) -> tuple[bool, str]:
    """Imports ``modules`` with only the image's and the carried distributions (name: wheel)
    installed. Returns (all imported, the child's report)."""
    wheels = {normalize(name): wheel for name, wheel in carried.items()}
    allowed = image_packages(image) | set(wheels)
    allowed.discard("vllm")  # the kit's own Python files stand in for it
    with tempfile.TemporaryDirectory(prefix="kit-site-") as tmp:
        filtered_site(allowed, Path(tmp), wheels)
        # -S: no site-packages but the filtered one; the kit's vLLM files come first.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PYTHONPATH"] = os.pathsep.join([str(sources), str(ROOT), tmp])
        child = (
            "import importlib, sys, traceback\n"
            "bad = 0\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as exc:\n"
            "        bad += 1\n"
            "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
            "print(f'{len(sys.argv) - 1 - bad} of {len(sys.argv) - 1} imported')\n"
            "sys.exit(1 if bad else 0)\n"
        )
        proc = subprocess.run(
            [python, "-S", "-c", child, *modules],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    return proc.returncode == 0, (proc.stdout + proc.stderr[-2000:]).strip()


def check(sources: Path, carried: Mapping[str, Path]) -> bool:
    print("== what a request imports, with only the image's and the carried packages")
    ok, report = check_imports(sources, carried)
    print(report)
    if not ok:
        print(
            "FAILED: a module above would be missing on the device; carry its distribution "
            "(PINS in prepare_carry.py) or keep the request from reaching it.",
            file=sys.stderr,
        )
    return ok
