"""CPU time of a server's process tree, split into its front end and its engine.

A server on vLLM's async engine is several processes: the API process (ours: ``python -m
serve``; vLLM's: ``vllm serve``), with ``--api-server-count N`` a parent and N API children,
and the engine core, which vLLM starts as a child and names with ``setproctitle``:
``VLLM::EngineCore`` (``EngineCore_DP<n>`` with data parallelism), whose model runners are
``VLLM::Worker...`` processes below it (the CPU build runs one even with one device), and with
data parallelism a ``VLLM::DPCoordinator``. The prefix is ``VLLM_PROCESS_NAME_PREFIX``
(``VLLM`` by default), so only the ``::<name>`` part is matched.

Everything else in the tree is the **front end**: HTTP, SSE, detokenization, the output
processor, multiprocessing's resource tracker. That is the part two servers on the same engine
differ in, so it is the part whose CPU per output token is worth comparing.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Process titles vLLM gives the engine side (vllm/v1/engine/core.py, executor/
# multiproc_executor.py, engine/coordinator.py). Descendants of a match are engine too.
ENGINE_TITLE = re.compile(r"^\S*::(EngineCore|Worker|DPCoordinator)(_\w+)?$")
FRONT_END = "front_end"
ENGINE = "engine"
# The key under which a level's summary carries its front-end CPU per output token, so that
# compare's ratio and absolute tables treat it like any latency (lower is better).
SUMMARY_KEY = "front_end_cpu_us_per_token"


@dataclass(frozen=True)
class ProcInfo:
    """What classification needs of one process: its id, its parent's and its title."""

    pid: int
    ppid: int
    title: str


def is_engine_title(title: str) -> bool:
    return ENGINE_TITLE.search(title) is not None


def classify(procs: Iterable[ProcInfo]) -> dict[int, str]:
    """Role of each process: ``engine`` when it or an ancestor in the given set carries an
    engine title, else ``front_end``. Ancestry rather than the title alone, because an engine's
    helper processes (a worker's compile workers, say) keep their interpreter's plain title."""
    by_pid = {p.pid: p for p in procs}
    roles: dict[int, str] = {}

    def role(pid: int) -> str:
        chain: list[int] = []
        cur: int | None = pid
        while cur is not None and cur in by_pid and cur not in roles and cur not in chain:
            chain.append(cur)
            if is_engine_title(by_pid[cur].title):
                roles[cur] = ENGINE
                break
            parent = by_pid[cur].ppid
            cur = parent if parent != cur else None
        found = roles.get(cur, FRONT_END) if cur is not None else FRONT_END
        for c in chain:
            roles.setdefault(c, found)
        return roles[pid]

    for pid in by_pid:
        role(pid)
    return roles


def _title(proc: Any) -> str:
    """The title ``setproctitle`` wrote, else the start of the command line.

    setproctitle overwrites the command line (the first word is the title, the rest empty
    padding) and the kernel's 15-character ``comm``, which psutil's ``name()`` completes from
    the command line; either is read, whichever carries a ``::`` title.
    """
    cmd: list[str] = []
    with contextlib.suppress(Exception):
        cmd = [c for c in proc.cmdline() if c]
    names = cmd[:1]
    with contextlib.suppress(Exception):
        names.append(str(proc.name()))
    for n in names:
        if "::" in n:
            return n
    return " ".join(cmd[:4]) or (names[-1] if names else "?")


@dataclass
class TreeCpu:
    """CPU seconds (user + system) so far of a process tree, by role."""

    front_end_s: float = 0.0
    engine_s: float = 0.0
    processes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.front_end_s + self.engine_s

    def counts(self) -> dict[str, int]:
        out = {FRONT_END: 0, ENGINE: 0}
        for p in self.processes:
            out[p["role"]] += 1
        return out

    def titles(self) -> dict[str, list[str]]:
        """Which processes each role holds, for the report: a wrong split shows here."""
        out: dict[str, list[str]] = {FRONT_END: [], ENGINE: []}
        for p in self.processes:
            out[p["role"]].append(p["title"])
        return out


class ProcessTree:
    """The processes of one server (the root and its descendants), classified once.

    Reading CPU then costs one ``/proc/<pid>/stat`` per process, cheap enough to sample many
    times a second. Call ``refresh()`` to pick up processes started since (an engine restart).
    A process that has exited keeps its last reading, so a reading never goes backwards.
    """

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self._procs: list[tuple[Any, int, str, str]] = []  # (psutil.Process, pid, role, title)
        self._last: dict[int, float] = {}
        self.refresh()

    def refresh(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        infos: list[ProcInfo] = []
        keep: list[Any] = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                infos.append(ProcInfo(p.pid, p.ppid(), _title(p)))
                keep.append(p)
        roles = classify(infos)
        self._procs = [
            (p, info.pid, roles[info.pid], info.title) for p, info in zip(keep, infos, strict=True)
        ]

    def read(self) -> TreeCpu:
        import psutil

        out = TreeCpu()
        for proc, pid, role, title in self._procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                # Own user + system only: CPU of children the process has reaped belongs to
                # processes that are gone, not to this one's work during the load.
                self._last[pid] = t.user + t.system
            cpu = self._last.get(pid, 0.0)
            if role == ENGINE:
                out.engine_s += cpu
            else:
                out.front_end_s += cpu
            out.processes.append({"pid": pid, "role": role, "title": title, "cpu_s": cpu})
        return out


def tree_cpu(root_pid: int) -> TreeCpu:
    """One reading of a whole tree, walked afresh."""
    return ProcessTree(root_pid).read()


def us_per_token(cpu_s: float | None, tokens: int | float | None) -> float | None:
    """Microseconds of CPU per output token; None when either is unknown or no token came."""
    if cpu_s is None or not tokens:
        return None
    return 1e6 * cpu_s / float(tokens)


def level_cpu(
    front_end_s: float, engine_s: float, wall_s: float, output_tokens: int, **extra: Any
) -> dict[str, Any]:
    """A level's server CPU: seconds, per output token, and as busy cores over its wall time."""
    return {
        "front_end_s": front_end_s,
        "engine_s": engine_s,
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "front_end_us_per_token": us_per_token(front_end_s, output_tokens),
        "engine_us_per_token": us_per_token(engine_s, output_tokens),
        "front_end_cores": front_end_s / wall_s if wall_s > 0 else None,
        "engine_cores": engine_s / wall_s if wall_s > 0 else None,
    } | extra


def attach_cpu(level: dict[str, Any], cpu: dict[str, Any]) -> None:
    """Put a level's server CPU on it, and its front-end µs/token in its summary."""
    level["server_cpu"] = cpu
    level["summary"][SUMMARY_KEY] = cpu["front_end_us_per_token"]


def probe_cpu(tree: ProcessTree) -> Callable[[], dict[str, Any]]:
    """A ``run_levels`` probe: a timestamped reading of the tree's CPU by role."""

    def read() -> dict[str, Any]:
        r = tree.read()
        return {"t": time.monotonic(), "front_end_s": r.front_end_s, "engine_s": r.engine_s}

    return read


def cpu_from_probe(level: dict[str, Any], tree: ProcessTree) -> dict[str, Any]:
    """The server CPU of a level measured with ``probe_cpu`` readings before and after it."""
    before, after = level["probe"]["before"], level["probe"]["after"]
    return level_cpu(
        after["front_end_s"] - before["front_end_s"],
        after["engine_s"] - before["engine_s"],
        after["t"] - before["t"],
        int(level["summary"]["total_output_tokens"]),
        span="level",
        **tree_facts(tree),
    )


def tree_facts(tree: ProcessTree) -> dict[str, Any]:
    r = tree.read()
    return {"processes": r.counts(), "titles": r.titles()}


class CpuSampler:
    """Samples a ``ProcessTree`` in a thread, to read its CPU at instants known only afterwards.

    vLLM's benchmark client is a child process that spends seconds importing, loading a
    tokenizer and (on vLLM's server) calling ``/tokenize`` before its load starts, and reports
    the load's start and end only in its result file. Its request timestamps come from
    ``time.perf_counter()``, which on Linux is the same system-wide monotonic clock as
    ``time.monotonic()`` here, so the tree's CPU at those instants is interpolated from the
    samples. Sampling costs the load generator nothing: it runs in another process.
    """

    def __init__(self, tree: ProcessTree, interval_s: float = 0.02) -> None:
        self.tree = tree
        self.interval_s = interval_s
        self.times: list[float] = []
        self.front_end: list[float] = []
        self.engine: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        r = self.tree.read()
        self.times.append(time.monotonic())
        self.front_end.append(r.front_end_s)
        self.engine.append(r.engine_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def at(self, t: float) -> tuple[float, float]:
        """(front end, engine) CPU seconds at monotonic time ``t``, linearly interpolated."""
        return interpolate(self.times, self.front_end, t), interpolate(self.times, self.engine, t)


def interpolate(times: Sequence[float], values: Sequence[float], t: float) -> float:
    """``values`` at ``t`` between the samples around it; clamped to the first and last."""
    if not times:
        raise ValueError("no samples")
    i = bisect.bisect_right(times, t)
    if i == 0:
        return values[0]
    if i == len(times):
        return values[-1]
    t0, t1 = times[i - 1], times[i]
    v0, v1 = values[i - 1], values[i]
    return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
