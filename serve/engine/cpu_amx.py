"""A vLLM general plugin (entry point ``vllm.general_plugins``): on a CPU with AMX, ask Linux for
the AMX tile state before vLLM's CPU kernels use it.

vLLM 0.32's CPU attention takes its AMX kernel whenever the CPU has AMX and the KV cache is
bf16, but nothing in vLLM asks the kernel for the permission to use AMX registers (arch_prctl
``ARCH_REQ_XCOMP_PERM``, which torch's ``_init_amx`` makes): the worker then dies of SIGILL on
its first forward pass, and the engine with it, unless some oneDNN matmul happened to ask
first. Seen on this project's 2-core machines once they ran on hosts with AMX.

vLLM runs its general plugins in every process it starts, its CPU workers (spawned, so no
permission is inherited) included; installing this package registers the plugin, so vLLM's own
server in the same environment gets it too (the benchmarks compare like with like).
"""

from __future__ import annotations


def allow_amx() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - vLLM always brings torch
        return
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    init_amx = getattr(torch.cpu, "_init_amx", None)
    if supported is not None and init_amx is not None and supported():
        init_amx()
