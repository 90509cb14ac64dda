"""The GPU-benchmark kit (scripts/device/) without a GPU.

Fast tests: the carry planner's splitting and packing, the manifest round trip from
``prepare_carry.write_calls`` through the device side's ``stage`` and ``assemble`` on fake
wheels, and the benchmark model's tokenizer padding on a tiny CPU build. The dry runs
(``run_gpu_bench.sh --dry-run``: both servers on the CPU engine with the demo model; and with
``--personas``) are e2e tests, run side by side, about 1-2 minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def _load(name: str) -> ModuleType:
    # scripts/ is not a package: load the modules by path.
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "device" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prepare = _load("prepare_carry")
gpu_bench = _load("gpu_bench")
gpu_personas = _load("gpu_personas")


def test_budget_leaves_room_for_the_tree() -> None:
    assert prepare.per_call_budget(1 * MIB, 2 * MIB) == 61 * MIB
    with pytest.raises(ValueError):
        prepare.per_call_budget(63 * MIB + 1, 0)


def test_split_cuts_only_large_files_into_full_parts_and_a_rest() -> None:
    items = prepare.split_items([("big.whl", 250), ("small.whl", 40)], budget=100)
    big = [i for i in items if i.source == "big.whl"]
    assert [i.name for i in big] == ["big.whl.part000", "big.whl.part001", "big.whl.part002"]
    assert [i.size for i in big] == [100, 100, 50]
    assert [i.offset for i in big] == [0, 100, 200]
    assert sum(i.size for i in big) == 250
    small = [i for i in items if i.source == "small.whl"]
    assert small == [prepare.Item("small.whl", 40, "small.whl")]


def test_pack_respects_the_budget_and_keeps_every_item() -> None:
    rng = random.Random(1)
    files = [(f"w{k}.whl", rng.randint(1, 300)) for k in range(40)]
    items = prepare.split_items(files, budget=100)
    calls = prepare.pack_calls(items, budget=100)
    assert all(c.size <= 100 for c in calls)
    packed = sorted(i.name for c in calls for i in c.items)
    assert packed == sorted(i.name for i in items)
    # First-fit decreasing is never worse than 11/9 OPT + 1; OPT >= total / budget.
    total = sum(size for _, size in files)
    assert len(calls) <= 11 / 9 * -(-total // 100) + 1


def test_plan_names_one_folder_per_call_and_benches_last() -> None:
    calls = prepare.pack_calls(prepare.split_items([("a.whl", 150), ("b.whl", 30)], 100), 100)
    lines = prepare.plan_lines(calls, budget=100, tree_bytes=10)
    runs = [line for line in lines if line.startswith("call ")]
    assert len(runs) == len(calls) == 2
    assert '.device-carry/c1"' in runs[0] and "--stage-only" in runs[0]
    assert '.device-carry/c2"' in runs[1] and "--stage-only" not in runs[1]
    # The persona step comes after, optional, carrying nothing (the machine holds it all).
    assert "--personas" in lines[-1] and "carry=[]" in lines[-1] and "optional" in lines[-1]


def test_manifest_round_trip_reassembles_identical_wheels(tmp_path: Path) -> None:
    rng = random.Random(2)
    src = tmp_path / "src"
    src.mkdir()
    wheels = {}
    for name, size in (("big", 2500), ("mid", 700), ("tiny", 30)):
        p = src / f"{name}-1.0-py3-none-any.whl"
        p.write_bytes(rng.randbytes(size))
        wheels[name] = p
    files = sorted((p.name, p.stat().st_size) for p in wheels.values())
    calls = prepare.pack_calls(prepare.split_items(files, 1000), 1000)
    carry = tmp_path / "carry"
    prepare.write_calls(carry, calls, wheels)
    prepare.write_calls(carry, calls, wheels)  # idempotent
    stage_dir = tmp_path / "stage"

    # One folder per call, as the device sees them arrive; the last one completes the set.
    dirs = sorted(carry.glob("c*"))
    assert len(dirs) == len(calls) >= 3
    for k, _ in enumerate(dirs, 1):
        visible = tmp_path / f"visible{k}"
        visible.mkdir()
        (visible / f"c{k}").symlink_to(carry / f"c{k}")
        missing = gpu_bench.stage(stage_dir, visible)
        assert len(missing) == len(dirs) - k
    out = gpu_bench.assemble(stage_dir)
    assert sorted(p.name for p in out) == sorted(p.name for p in wheels.values())
    for p in out:
        assert p.read_bytes() == (src / p.name).read_bytes()


def test_damaged_part_is_refused(tmp_path: Path) -> None:
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    whl.write_bytes(b"a" * 300)
    calls = prepare.pack_calls(prepare.split_items([(whl.name, 300)], 200), 200)
    carry = tmp_path / "carry"
    prepare.write_calls(carry, calls, {"x": whl})
    part = next(carry.glob("c1/*.part*"))
    part.write_bytes(b"b" * part.stat().st_size)
    with pytest.raises(SystemExit, match="checksum"):
        gpu_bench.stage(tmp_path / "stage", carry)


def test_tiny_bench_model_tokenizer_covers_the_model_vocab(tmp_path: Path) -> None:
    import torch  # noqa: F401  (the engine set-up installs it; the model build needs it)
    from transformers import AutoTokenizer

    shape = dict(gpu_bench.LLAMA_8B) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 2048,
    }
    model = gpu_bench.build_model(tmp_path / "m", layers=1, device="cpu", shape=shape)
    config = json.loads((model / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model))
    assert len(tok) == config["vocab_size"] == 2048
    # Every id the model can sample decodes to visible text; prompts still use the BPE merges.
    assert str(tok.decode([2047])).strip()
    assert all(i < 1100 for i in tok.encode("Hello, how are you today?", add_special_tokens=False))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]


def test_frontend_cpu_per_token_counts_only_the_tokens_between_scrapes() -> None:
    before = (
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 40.0\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0\n'
        "vllm:generation_tokens_total_created 1.7e9\n"
    )
    after = (
        "process_cpu_seconds_total 42.5\n"
        'vllm:generation_tokens_total{engine="0",model_name="m"} 51000.0\n'
    )
    assert gpu_bench.frontend_cpu_us_per_token(before, after) == pytest.approx(50.0)
    assert gpu_bench.frontend_cpu_us_per_token("", after) is None
    assert gpu_bench.frontend_cpu_us_per_token(after, after) is None  # no tokens in between


def _fake_level() -> dict[str, object]:
    ms = {"p50": 5.0, "p99": 6.0}
    summary = {"completed": 3, "errors": 0, "output_token_throughput": 10.0}
    return {"level": 1, "summary": {**summary, "ttft_ms": ms, "itl_ms": ms}}


def _bench_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, starts: object, api_servers: int = 0
) -> tuple[list[str], int]:
    """Run ``gpu_bench.bench`` with servers that start when ``starts(name, eager)`` says so."""
    tried: list[str] = []

    def fake_target(name: str, cmd: list[str], *rest: object) -> dict[str, object]:
        eager = "--enforce-eager" in cmd
        tried.append(f"{name}{'-eager' if eager else ''}")
        if not starts(name, eager):  # type: ignore[operator]
            raise gpu_bench.NotReady(f"{name} exited")
        return {"levels": [_fake_level()]}

    monkeypatch.setattr(gpu_bench, "_bench_target", fake_target)
    args = gpu_bench.argparse.Namespace(
        budget_s=500.0, work=str(tmp_path / "w"), out=str(tmp_path / "o"), model="m",
        max_model_len=4096, kv_cache_memory_bytes=0, enforce_eager=False, engine_extra="",
        bench_args="", python="python3", ready_cap_s=300.0, api_servers=api_servers,
    )  # fmt: skip
    code = gpu_bench.bench(args)
    return tried, code


def test_a_start_that_needs_eager_mode_sets_it_for_both_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried, _ = _bench_with(tmp_path, monkeypatch, lambda name, eager: eager)
    assert tried == ["ours", "ours-eager", "vllm-eager"]
    table = (tmp_path / "o" / "summary.md").read_text()
    assert "ours/vllm conc 1:" in table and "flags differ" not in table


def test_a_server_broken_either_way_leaves_the_other_on_default_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried, _ = _bench_with(tmp_path, monkeypatch, lambda name, eager: name == "vllm")
    assert tried == ["ours", "ours-eager", "vllm"]
    table = (tmp_path / "o" / "summary.md").read_text()
    assert "ours  FAILED" in table and "flags differ" in table


def test_several_front_ends_run_last_and_their_failure_fails_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried, code = _bench_with(
        tmp_path, monkeypatch, lambda name, eager: name != "ours_x2" or eager, api_servers=2
    )
    assert tried == ["ours", "vllm", "ours_x2", "ours_x2-eager"]
    assert code == 0
    tried, code = _bench_with(
        tmp_path, monkeypatch, lambda name, eager: name != "ours_x2", api_servers=2
    )
    assert tried[-1] == "ours_x2-eager" and code == 0, "the two servers' figures still count"


def _persona_args(tmp_path: Path, budget_s: float = 270.0) -> object:
    return gpu_personas.argparse.Namespace(
        model="/m", out=str(tmp_path / "o"), work=str(tmp_path / "w"), python="python3",
        personas=8, rank=16, max_model_len=4096, kv_cache_memory_bytes=0, enforce_eager=False,
        engine_extra="--gpu-memory-utilization 0.85", budget_s=budget_s,
        persona_args="--concurrency 16,64 --duration 8 --rounds 2",
    )  # fmt: skip


def test_persona_step_runs_the_persona_bench_on_the_kits_flags(tmp_path: Path) -> None:
    cmd = gpu_personas.persona_command(_persona_args(tmp_path), 240.0, eager=False)
    joined = " ".join(cmd)
    assert cmd[:3] == ["python3", "-m", "loadtest.personas"]
    for part in ("--personas 8", "--lora-rank 16", "--no-enforce-eager", "--budget-s 240",
                 "--served-model-name bench", "--env VLLM_ENABLE_V1_MULTIPROCESSING=1",
                 "--concurrency 16,64 --duration 8 --rounds 2"):  # fmt: skip
        assert part in joined, part
    assert "--engine-args=--enable-prefix-caching --gpu-memory-utilization 0.85" in cmd
    assert "--enforce-eager" in gpu_personas.persona_command(_persona_args(tmp_path), 240.0, True)


def _fake_persona_report(out: Path) -> None:
    from loadtest.personas_report import build_report

    def level(tok_s: float) -> dict[str, object]:
        ms = {"p50": 20.0, "p99": 40.0}
        summary = {"output_token_throughput": tok_s, "ttft_ms": ms, "itl_ms": ms}
        return {"level": 16, "summary": summary, "adapters_together": 8, "warnings": []}

    meta = {"model": "/m", "personas": 8, "rank": 16, "rounds": 1, "mode": "concurrency"}
    report = build_report(meta, {"base": [[level(1000)]], "personas": [[level(900)]]}, False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personas.json").write_text(json.dumps(report))
    (out / "personas.md").write_text("# Persona adapters vs the base model\n")
    (out / "ours.log").write_text("server log")


def test_persona_step_retries_a_failed_start_once_in_eager_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[bool] = []

    def fake_run(cmd: list[str], timeout_s: float) -> int:
        eager = "--enforce-eager" in cmd
        tried.append(eager)
        out = Path(cmd[cmd.index("--out") + 1])
        if eager:
            _fake_persona_report(out)
            return 0
        out.mkdir(parents=True)
        (out / "ours.log").write_text("torch.compile failed")
        return 1

    monkeypatch.setattr(gpu_personas, "run_once", fake_run)
    assert gpu_personas.run(_persona_args(tmp_path)) == 0
    assert tried == [False, True]
    out = tmp_path / "o"
    table = (out / "personas-summary.md").read_text()
    assert "personas/base conc 16: tok/s 0.90x" in table and "--enforce-eager" in table
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "personas-all.tar.gz", "personas-summary.md", "personas/personas.json",
        "personas/personas.md",
    ]  # fmt: skip
    with tarfile.open(out / "personas-all.tar.gz") as tar:
        names = tar.getnames()
    assert "personas-bench/personas-first-try/ours.log" in names, "the failed start's log too"


def test_persona_step_without_time_for_a_retry_reports_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[list[str]] = []
    monkeypatch.setattr(gpu_personas, "run_once", lambda cmd, timeout_s: tried.append(cmd) or 1)
    assert gpu_personas.run(_persona_args(tmp_path, budget_s=100.0)) == 1
    assert len(tried) == 1
    assert "personas: FAILED" in (tmp_path / "o" / "personas-summary.md").read_text()


DRY_RUNS = {  # test name -> run_gpu_bench.sh arguments
    "test_dry_run_writes_results_and_prints_the_table": ("--dry-run",),
    "test_persona_dry_run_serves_the_adapters_and_prints_the_ratios": ("--dry-run", "--personas"),
}
DRY_RUN_MODEL = Path(os.environ.get("BENCH_MODEL_DIR") or "/tmp/avatar-dry-run/model")


class DryRuns:
    """The two dry runs side by side (each is mostly one server starting after another: one
    core's work), each as the test would run it alone, into its own OUT folder."""

    def __init__(self, base: Path, selected: list[str]) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for name in selected:
            if self.procs and not (DRY_RUN_MODEL / "DEMO_MODEL_VERSION").is_file():
                # The first run builds the shared demo model: the next waits for it rather
                # than build the same folder at the same moment.
                first = next(iter(self.procs.values()))
                deadline = time.monotonic() + 180
                while not (DRY_RUN_MODEL / "DEMO_MODEL_VERSION").is_file():
                    if first.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
            with (
                (base / f"{name}.stdout").open("w") as stdout,
                (base / f"{name}.stderr").open("w") as stderr,
            ):
                self.procs[name] = subprocess.Popen(
                    ["bash", str(ROOT / "scripts/device/run_gpu_bench.sh"), *DRY_RUNS[name]],
                    cwd=ROOT,
                    env={**os.environ, "OUT": str(self.out(name))},
                    stdout=stdout,
                    stderr=stderr,
                    text=True,
                )

    def out(self, name: str) -> Path:
        return self.base / name / "out"

    def result(self, name: str) -> subprocess.CompletedProcess[str]:
        proc = self.procs[name]
        code = proc.wait(timeout=400)
        stdout = (self.base / f"{name}.stdout").read_text()
        stderr = (self.base / f"{name}.stderr").read_text()
        return subprocess.CompletedProcess(proc.args, code, stdout, stderr)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def dry_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DryRuns]:
    selected = [n for n in DRY_RUNS if any(i.name == n for i in request.session.items)]
    runs = DryRuns(tmp_path_factory.mktemp("dry-runs"), selected)
    try:
        yield runs
    finally:
        runs.stop()


@pytest.mark.e2e
def test_dry_run_writes_results_and_prints_the_table(dry_runs: DryRuns) -> None:
    out = dry_runs.out("test_dry_run_writes_results_and_prints_the_table")
    proc = dry_runs.result("test_dry_run_writes_results_and_prints_the_table")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("ours", "vllm"):
        for fname in ("results.json", "summary.csv", "latency_throughput.png"):
            assert (out / name / fname).is_file(), f"{name}/{fname}"
        levels = json.loads((out / name / "results.json").read_text())["levels"]
        assert [lv["level"] for lv in levels] == [1, 2]
        assert all(lv["summary"]["completed"] == 4 for lv in levels)
    assert (out / "summary.md").is_file()
    assert (out / "bench-all.tar.gz").is_file()
    # The device tool brings back at most 8 files, at most 2 folders down.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    lines = str(proc.stdout).strip().splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:2] == ["srv", "conc"]]
    assert heads, lines[-12:]
    table = lines[heads[-1] :]  # the table is the last thing printed
    assert len(table) == 1 + 4 + 2 + 2, table  # header, 2 levels x 2 servers, ratios, CPU
    assert any(line.startswith("ours/vllm conc 2:") for line in table), table
    for name in ("ours", "vllm"):
        assert any(line.startswith(f"{name} front-end CPU: ") for line in table), table


@pytest.mark.e2e
def test_persona_dry_run_serves_the_adapters_and_prints_the_ratios(dry_runs: DryRuns) -> None:
    out = dry_runs.out("test_persona_dry_run_serves_the_adapters_and_prints_the_ratios")
    proc = dry_runs.result("test_persona_dry_run_serves_the_adapters_and_prints_the_ratios")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "personas" / "personas.json").read_text())
    assert report["meta"]["rounds_done"] == 2 and report["meta"]["rank"] == 16
    for mode in ("base", "personas"):
        for levels in report["results"][mode]:
            assert [lv["level"] for lv in levels] == [2, 4]
            assert all(lv["summary"]["completed"] == 8 for lv in levels)
    # The server really served the adapters: base levels reached the base model only, and
    # persona levels reached adapters only, several of them in one engine step.
    for levels in report["results"]["base"]:
        assert all(set(lv["served"]) == {"bench"} for lv in levels), levels[0]["served"]
    for levels in report["results"]["personas"]:
        for lv in levels:
            assert "bench" not in lv["served"] and sum(lv["served"].values()) == 8
        # Which requests overlap depends on timing; at concurrency 4 some step holds several.
        assert max(lv["adapters_together"] for lv in levels) >= 2, levels
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    lines = str(proc.stdout).strip().splitlines()
    assert any(line.startswith("personas/base conc 4: tok/s ") for line in lines), lines[-12:]
    assert lines[0].startswith("personas vs base: 8 rank-16 adapters"), lines[:3]
