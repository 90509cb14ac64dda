"""On a CPU with AMX, every process vLLM starts must hold the permission to use AMX before its
CPU attention runs (without it the worker died of SIGILL on its first forward pass)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    ARCH_GET_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1022, 18, 158
    def tiles_allowed():
        features = ctypes.c_ulong(0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(features)) != 0:
            sys.exit(3)
        return bool(features.value & (1 << XFEATURE_XTILEDATA))
    before = tiles_allowed()
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what each vLLM worker does when it starts
    print(before, tiles_allowed())
    """
)


def _has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_tile" in flags and sys.platform == "linux"


@pytest.mark.skipif(not _has_amx(), reason="this CPU has no AMX")
def test_a_fresh_vllm_process_may_use_amx_once_its_plugins_load() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out[-2:] == ["False", "True"], out  # not inherited: the plugin asked for it
