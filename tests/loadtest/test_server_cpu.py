"""Front-end CPU per output token (loadtest.cpu, compare) and vLLM's benchmark client's results
mapped into compare's summaries (loadtest.vllm_client). No engine: fake and dummy processes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import servers, vllm_client
from loadtest.compare import build_parser, cpu_lines, markdown, ratios
from loadtest.compare_report import FRONT_END_LABEL, absolute, server_cpu
from loadtest.cpu import (
    ENGINE,
    FRONT_END,
    SUMMARY_KEY,
    CpuSampler,
    ProcessTree,
    ProcInfo,
    attach_cpu,
    classify,
    cpu_from_probe,
    interpolate,
    level_cpu,
    us_per_token,
)
from loadtest.report import format_table
from tests.support import wait_until

DATA = Path(__file__).parent / "data"


def _roles(*procs: tuple[int, int, str]) -> dict[int, str]:
    return classify(ProcInfo(pid, ppid, title) for pid, ppid, title in procs)


def test_classify_vllm_serve_with_api_servers_and_workers() -> None:
    # `vllm serve --api-server-count 2` on one device: a parent, two API children, the engine
    # core, its worker, a helper below the worker with a plain title, the resource tracker.
    roles = _roles(
        (100, 1, "/venv/bin/python /venv/bin/vllm serve model"),
        (101, 100, "VLLM::APIServer_0"),
        (102, 100, "VLLM::APIServer_1"),
        (103, 100, "VLLM::EngineCore"),
        (104, 103, "VLLM::Worker_TP0"),
        (105, 104, "/venv/bin/python -c from multiprocessing.spawn import spawn_main"),
        (106, 100, "/venv/bin/python -B -c from multiprocessing.resource_tracker import main"),
    )
    assert {p for p, r in roles.items() if r == FRONT_END} == {100, 101, 102, 106}
    assert {p for p, r in roles.items() if r == ENGINE} == {103, 104, 105}


def test_classify_data_parallel_custom_prefix_and_ours() -> None:
    roles = _roles(
        (10, 1, "python -m serve --port 8000"),
        (11, 10, "MYAPP::EngineCore_DP0"),  # VLLM_PROCESS_NAME_PREFIX=MYAPP
        (12, 10, "MYAPP::EngineCore_DP1"),
        (13, 10, "VLLM::DPCoordinator"),
        (14, 11, "VLLM::Worker_DP0_TP0"),
        # Not engine titles: a front end whose name merely mentions one, an API server.
        (15, 10, "python -m serve --note EngineCore"),
        (16, 10, "VLLM::APIServer_DP0"),
    )
    assert roles == {
        10: FRONT_END,
        11: ENGINE,
        12: ENGINE,
        13: ENGINE,
        14: ENGINE,
        15: FRONT_END,
        16: FRONT_END,
    }


def test_classify_survives_a_parent_loop() -> None:
    assert _roles((1, 2, "a"), (2, 1, "b")) == {1: FRONT_END, 2: FRONT_END}


# A front end (the root) that starts an "engine core" which starts a "worker", each titled as
# vLLM titles them; the worker burns CPU_S of CPU, then all three wait to be killed.
_DUMMY = textwrap.dedent(
    """
    import subprocess, sys, time
    import setproctitle
    role = sys.argv[1]
    if role == "root":
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "engine", sys.argv[2]])
    elif role == "engine":
        setproctitle.setproctitle("VLLM::EngineCore")
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "worker", sys.argv[2]])
    else:
        setproctitle.setproctitle("VLLM::Worker")
        while time.process_time() < 0.6:
            pass
    sys.stdin.read()  # blocks until the test kills the group
    """
)


@pytest.fixture
def dummy_server() -> Iterator[subprocess.Popen[bytes]]:
    pytest.importorskip("setproctitle")
    proc = subprocess.Popen(
        [sys.executable, "-c", _DUMMY, "root", _DUMMY],
        stdin=subprocess.PIPE,
        start_new_session=True,  # its own group: the teardown stops all three
    )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_process_tree_splits_real_processes_by_title(
    dummy_server: subprocess.Popen[bytes],
) -> None:
    def titled() -> ProcessTree | None:
        tree = ProcessTree(dummy_server.pid)
        titles = tree.read().titles()
        return tree if titles[ENGINE] == ["VLLM::EngineCore", "VLLM::Worker"] else None

    tree = wait_until(titled, 60, what="the dummy tree's titles")
    reading = tree.read()
    assert reading.counts() == {FRONT_END: 1, ENGINE: 2}
    assert "python" in reading.titles()[FRONT_END][0]

    # The worker's 0.6 s of CPU lands on the engine side, not on the front end.
    done = wait_until(lambda: r if (r := tree.read()).engine_s >= 0.6 else None, 60)
    assert done.front_end_s < 0.5  # the root only started an interpreter and waits
    assert done.total_s == pytest.approx(done.front_end_s + done.engine_s)


def test_sampler_interpolates_on_the_clock_children_use(
    dummy_server: subprocess.Popen[bytes],
) -> None:
    # vLLM's client stamps requests with time.perf_counter() in its own process; the window
    # is looked up on this process's time.monotonic(): the two must be one clock.
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(repr(time.perf_counter()))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert t0 <= float(out.stdout) <= time.monotonic()

    tree = wait_until(
        lambda: t if (t := ProcessTree(dummy_server.pid)).read().counts()[ENGINE] == 2 else None,
        60,
    )
    with CpuSampler(tree, interval_s=0.01) as sampler:
        wait_until(lambda: tree.read().engine_s >= 0.6, 60)
    fe0, en0 = sampler.at(sampler.times[0])
    fe1, en1 = sampler.at(sampler.times[-1])
    assert en1 >= 0.6 and en1 >= en0 and fe1 >= fe0
    assert len(sampler.times) > 2
    assert sampler.engine == sorted(sampler.engine)  # a reading never goes backwards
    mid = (sampler.times[0] + sampler.times[-1]) / 2
    assert en0 <= sampler.at(mid)[1] <= en1
    assert sampler.at(sampler.times[-1] + 100) == (fe1, en1)  # clamped past the end


def test_interpolate() -> None:
    times, values = [0.0, 1.0, 3.0], [10.0, 20.0, 40.0]
    assert interpolate(times, values, 0.5) == pytest.approx(15.0)
    assert interpolate(times, values, 2.0) == pytest.approx(30.0)
    assert interpolate(times, values, -1.0) == 10.0
    assert interpolate(times, values, 9.0) == 40.0
    with pytest.raises(ValueError):
        interpolate([], [], 0.0)


def test_us_per_token_arithmetic() -> None:
    cpu = level_cpu(0.5, 2.0, 10.0, 5000)
    assert cpu["front_end_us_per_token"] == pytest.approx(100.0)
    assert cpu["engine_us_per_token"] == pytest.approx(400.0)
    assert cpu["front_end_cores"] == pytest.approx(0.05)
    assert cpu["engine_cores"] == pytest.approx(0.2)
    assert us_per_token(1.0, 0) is None and us_per_token(None, 10) is None
    assert level_cpu(0.1, 0.1, 0.0, 0)["front_end_us_per_token"] is None


class _FakeTree:
    def __init__(self) -> None:
        from loadtest.cpu import TreeCpu

        self.reading = TreeCpu(
            1.0,
            2.0,
            [
                {"pid": 1, "role": FRONT_END, "title": "python -m serve", "cpu_s": 1.0},
                {"pid": 2, "role": ENGINE, "title": "VLLM::EngineCore", "cpu_s": 2.0},
            ],
        )

    def read(self) -> Any:
        return self.reading


def _level(level: float, fe_s: float, tokens: int, ttft: float = 10.0) -> dict[str, Any]:
    lv: dict[str, Any] = {
        "mode": "concurrency",
        "level": level,
        "summary": {
            "total_output_tokens": tokens,
            "ttft_ms": {"p50": ttft, "p99": ttft},
            "itl_ms": {"p50": 1.0, "p99": 2.0},
            "output_token_throughput": 100.0,
        },
        "probe": {
            "before": {"t": 100.0, "front_end_s": 5.0, "engine_s": 50.0},
            "after": {"t": 110.0, "front_end_s": 5.0 + fe_s, "engine_s": 58.0},
        },
    }
    attach_cpu(lv, cpu_from_probe(lv, _FakeTree()))  # type: ignore[arg-type]
    return lv


def test_cpu_from_probe_and_pairing_within_rounds() -> None:
    lv = _level(1, 0.2, 1000)
    assert lv["server_cpu"]["front_end_us_per_token"] == pytest.approx(200.0)
    assert lv["server_cpu"]["engine_us_per_token"] == pytest.approx(8000.0)
    assert lv["server_cpu"]["front_end_cores"] == pytest.approx(0.02)
    assert lv["server_cpu"]["processes"] == {FRONT_END: 1, ENGINE: 1}
    assert lv["summary"][SUMMARY_KEY] == pytest.approx(200.0)

    engine_level = {"mode": "concurrency", "level": 1, "summary": dict(lv["summary"])}
    del engine_level["summary"][SUMMARY_KEY]  # the raw engine has no front end
    results = {
        # round 1: ours 100 vs vLLM 200 µs/token (0.5); round 2: 300 vs 200 (1.5)
        "ours": [[_level(1, 0.1, 1000)], [_level(1, 0.3, 1000)]],
        "vllm": [[_level(1, 0.4, 2000)], [_level(1, 0.2, 1000)]],
        "engine": [[engine_level], [engine_level]],
    }
    pair = ratios(results, "ours", "vllm")["1"][FRONT_END_LABEL]
    assert (pair["min"], pair["max"], pair["median"]) == pytest.approx((0.5, 1.5, 1.0))
    assert FRONT_END_LABEL not in ratios(results, "ours", "engine")["1"]
    table = server_cpu(results)
    assert set(table) == {"ours", "vllm"}
    ours = table["ours"]["1"]["front_end_us_per_token"]
    assert (ours["min"], ours["max"], ours["n"]) == pytest.approx((100.0, 300.0, 2))
    report = {
        "meta": {"rounds": 2, "mode": "concurrency", "client": "ours", "skipped": {}},
        "ratios": {"ours_vs_vllm": ratios(results, "ours", "vllm")},
        "absolute": absolute(results),
        "server_cpu": table,
        "idle_peer_cpu": {},
    }
    md = markdown(report)
    assert FRONT_END_LABEL in md and "## Server CPU per output token" in md
    assert "| ours | 1 | 200.0 (100.0-300.0) |" in md
    assert "1 front end, 1 engine" in md
    assert "front-end CPU 100.0 µs/token" in cpu_lines(results["ours"][0])


def _vllm_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["--client", "vllm", *extra])


def test_vllm_client_command_uses_vllms_own_flags() -> None:
    args = _vllm_args("--concurrency", "4", "--seed", "3")
    cmd = vllm_client.bench_command(
        args,
        base_url="http://127.0.0.1:9",
        model_name="avatar-demo",
        tokenizer="/m",
        mode="concurrency",
        level=4,
        num_prompts=32,
        result_dir=Path("/r"),
        result_name="x.json",
        label="ours round 1",
    )
    assert cmd[:3] == [sys.executable, "-m", "loadtest.vllm_client"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    for key, value in {
        "--backend": "openai-chat",
        "--endpoint": "/v1/chat/completions",
        "--model": "avatar-demo",
        "--tokenizer": "/m",
        "--dataset-name": "random",
        "--num-prompts": "32",
        "--max-concurrency": "4",
        "--seed": "3",
    }.items():
        assert value in cmd[cmd.index(key) + 1], (key, flags)
    assert "--save-detailed" in cmd and "--ignore-eos" in cmd
    # vLLM's own parser takes every flag, as the child will. (In this process: collecting the
    # suite has loaded vLLM already; a child would spend seconds importing it again.)
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:
        parsed = parser.parse_args(cmd[3:])
    except SystemExit as exc:
        pytest.fail(f"vLLM's benchmark parser refused the command ({exc}): {cmd[3:]}")
    assert [parsed.max_concurrency, parsed.metric_percentiles, parsed.save_detailed] == [
        4,
        "50,90,99",
        True,
    ]

    rate = vllm_client.bench_command(
        _vllm_args("--rate", "2", "--max-concurrency", "8"),
        base_url="u",
        model_name="m",
        tokenizer="t",
        mode="rate",
        level=2.0,
        num_prompts=16,
        result_dir=Path("/r"),
        result_name="x.json",
        label="l",
    )
    assert rate[rate.index("--request-rate") + 1] == "2"
    assert rate[rate.index("--max-concurrency") + 1] == "8"


def test_vllm_result_maps_into_compare_summary() -> None:
    # Recorded from vLLM 0.32.0's client (6 requests, concurrency 2) against our server.
    result = json.loads((DATA / "vllm_bench_result.json").read_text())
    s = vllm_client.summary_from_result(result)
    assert s["completed"] == 6 and s["errors"] == 0 and s["requests"] == 6
    assert s["total_output_tokens"] == 593
    assert s["output_token_throughput"] == pytest.approx(result["output_throughput"])
    assert s["ttft_ms"]["p50"] == pytest.approx(result["median_ttft_ms"])
    assert s["ttft_ms"]["p99"] == pytest.approx(result["p99_ttft_ms"])
    assert s["itl_ms"]["p99"] == pytest.approx(result["p99_itl_ms"])
    assert s["itl_ms"]["count"] == sum(len(x) for x in result["itls"])
    assert s["e2e_ms"]["p50"] == pytest.approx(result["median_e2el_ms"])
    assert s["goodput"] is None and s["ttfs_ms"]["p50"] is None

    start, end = vllm_client.load_window(result)  # type: ignore[misc]
    assert start == min(result["start_times"])
    assert end == pytest.approx(
        max(t + lat for t, lat in zip(result["start_times"], result["latencies"], strict=True))
    )
    assert end - start == pytest.approx(result["duration"], rel=0.05)
    assert vllm_client.load_window({"duration": 1.0}) is None
    assert not set(vllm_client.DETAILED_FIELDS) & set(vllm_client.trimmed(result))

    lv = {"mode": "concurrency", "level": 2.0, "summary": s, "client": {"cpu_fraction": None}}
    attach_cpu(lv, level_cpu(0.0593, 1.0, end - start, s["total_output_tokens"]))
    assert s[SUMMARY_KEY] == pytest.approx(100.0)
    table = format_table([lv])  # what compare prints for each turn
    assert table.splitlines()[1].split()[:3] == ["2", "6", "0"]


async def test_vllm_client_skips_the_raw_engine(tmp_path: Path) -> None:
    from loadtest.compare import run_compare

    args = _vllm_args("--targets", "engine", "--model", str(tmp_path), "--out", str(tmp_path))
    report = await run_compare(args)  # nothing to start: the only target is skipped
    assert "HTTP endpoint" in report["meta"]["skipped"]["engine"]
    assert report["meta"]["targets"] == [] and report["results"] == {}
    assert "Skipped engine: vLLM's benchmark client needs" in markdown(report)


async def test_vllm_client_refuses_duration() -> None:
    with pytest.raises(SystemExit, match="duration"):
        await vllm_client.run_sweep(
            _vllm_args("--duration", "5"),
            "u",
            "t",
            None,
            Path("/nonexistent"),  # type: ignore[arg-type]
        )


def test_server_ports_are_never_a_connections_local_port() -> None:
    """The harness's ports lie below the kernel's ephemeral range, the range every outgoing
    connection's local port comes from, so a client cannot take a server's port before it binds
    (a dry run's server died of ``address already in use``); and a port in use is never given."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {servers.free_port() for _ in range(200)}
        assert taken.getsockname()[1] not in ports
    assert all(port < low for port in ports) and len(ports) > 150
    for port in list(ports)[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
