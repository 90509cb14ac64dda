"""The persona workload (each conversation sent to its persona's adapter) and the persona
benchmark's server flags, /metrics checks, ABBA rounds, budget and report. No engine: the
benchmark's passes are faked; the real run is ``python -m loadtest.personas`` (BENCHMARKS.md)
and, on the CPU engine, the GPU kit's dry run (tests/device)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loadtest import bench, personas
from loadtest.conversations import PERSONAS
from loadtest.payload import chat_payload
from loadtest.personas_report import (
    adapters_together,
    build_report,
    check_level,
    markdown,
    served_requests,
    summary_lines,
)
from loadtest.workload import build_workload, persona_adapter_names, route_to_personas

ORDER = sorted(PERSONAS)


def test_adapter_names_are_the_personas_then_numbered_sets() -> None:
    assert persona_adapter_names(8) == ORDER
    assert persona_adapter_names(3) == ORDER[:3]
    assert persona_adapter_names(10) == [*ORDER, f"{ORDER[0]}-2", f"{ORDER[1]}-2"]
    with pytest.raises(ValueError):
        persona_adapter_names(0)


def test_eight_adapters_each_conversation_to_the_one_named_after_its_persona() -> None:
    reqs = build_workload(200, seed=3)
    routed = route_to_personas(reqs, persona_adapter_names(8))
    assert [r.model for r in routed] == [r.persona for r in reqs]
    # Only the model changes: the same prompts, lengths and order as the base run.
    assert [(r.index, r.messages, r.max_tokens) for r in routed] == [
        (r.index, r.messages, r.max_tokens) for r in reqs
    ]
    assert all(r.model is None for r in reqs), "the input list is left alone"


def test_fewer_adapters_than_personas_share_them_by_persona() -> None:
    names = persona_adapter_names(3)
    routed = route_to_personas(build_workload(300, seed=1), names)
    by_persona: dict[str, set[str | None]] = {}
    for r in routed:
        by_persona.setdefault(r.persona, set()).add(r.model)
    # A conversation always reaches the same adapter (its prefix cache stays with it) ...
    assert all(len(models) == 1 for models in by_persona.values())
    assert by_persona[ORDER[4]] == {names[4 % 3]}
    # ... and every adapter serves some conversation.
    assert set().union(*by_persona.values()) == set(names)


def test_more_adapters_than_personas_take_turns_within_a_persona() -> None:
    names = persona_adapter_names(16)
    routed = route_to_personas(build_workload(300, seed=2), names)
    seen = Counter(r.model for r in routed)
    assert set(seen) == set(names)
    tutor = [r.model for r in routed if r.persona == "language_tutor"]
    assert tutor[:4] == ["language_tutor", "language_tutor-2"] * 2


def test_the_request_names_its_model_in_the_body() -> None:
    req = build_workload(1)[0]
    assert chat_payload("base", req, ignore_eos=False)["model"] == "base"
    routed = route_to_personas([req], persona_adapter_names(8))[0]
    assert chat_payload("base", routed, ignore_eos=True)["model"] == req.persona


def test_bench_personas_flag_routes_the_measured_levels() -> None:
    args = bench.build_parser().parse_args(["--personas", "8", "--num-requests", "12"])
    assert [r.model for r in bench.workload_for(args, 12)] == [
        r.persona for r in bench.workload_for(bench.build_parser().parse_args([]), 12)
    ]
    plain = bench.build_parser().parse_args([])
    assert all(r.model is None for r in bench.workload_for(plain, 12))
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--personas", "-1"])


def test_server_flags_serve_every_adapter_at_once() -> None:
    adapters = {"a": Path("/x/a"), "b": Path("/x/b"), "c": Path("/x/c")}
    flags = personas.server_flags(adapters, rank=8)
    assert flags == [
        "--enable-lora", "--max-loras", "3", "--max-cpu-loras", "3", "--max-lora-rank", "8",
        "--lora-modules", "a=/x/a", "b=/x/b", "c=/x/c",
    ]  # fmt: skip
    # vLLM accepts only some caps: a rank between them gets the next one up.
    assert personas.server_flags(adapters, rank=12)[6] == "16"
    with pytest.raises(ValueError):
        personas.lora_rank_cap(1024)


HIST = "avatar_e2e_request_latency_seconds"
LORA = "vllm:lora_requests_info"


def _scrape(counts: dict[str, int], lora: list[tuple[str, float]]) -> str:
    lines = [f"# TYPE {HIST} histogram"]
    for model, n in counts.items():
        for reason in ("stop", "length"):  # several label sets per model are summed
            lines.append(
                f'{HIST}_count{{endpoint="chat",model="{model}",finish_reason="{reason}"}} {n}'
            )
    lines.append(f"# TYPE {LORA} gauge")
    for running, stamp in lora:
        lines.append(
            f'{LORA}{{max_lora="8",running_lora_adapters="{running}",'
            f'waiting_lora_adapters=""}} {stamp}'
        )
    return "\n".join(lines) + "\n"


def test_metrics_tell_where_requests_went_and_how_many_adapters_ran_together() -> None:
    before = _scrape({"base": 5, "a": 1}, [("a,b,c,d,e", 100.0)])
    after = _scrape(
        {"base": 5, "a": 4, "b": 2}, [("a,b,c,d,e", 100.0), ("a,b", 205.0), ("b,a,c", 210.0)]
    )
    # x2: each model has a stop and a length series
    assert served_requests(before, after) == {"a": 6, "b": 4}
    # Only steps since the level began count: the five-adapter step was before it.
    assert adapters_together(after, since=200.0) == 3
    assert adapters_together(_scrape({}, [("", 300.0)]), since=200.0) == 0
    assert adapters_together(_scrape({"base": 1}, []), since=0.0) is None
    assert served_requests("", after) == {"a": 8, "b": 4, "base": 10}


def test_routing_checks_flag_requests_that_missed_their_adapter() -> None:
    names = ["a", "b"]
    assert check_level({"served": {"base": 9}}, "base", "base", names) == []
    assert check_level({"served": {"a": 4, "b": 5}}, "personas", "base", names) == []
    assert (
        "served by the base model"
        in check_level({"served": {"a": 4, "b": 1, "base": 4}}, "personas", "base", names)[0]
    )
    assert "['b']" in check_level({"served": {"a": 9}}, "personas", "base", names)[0]
    assert "other models" in check_level({"served": {"base": 1, "a": 1}}, "base", "base", names)[0]


def _level(tok_s: float, ttft_p50: float, together: int | None) -> dict[str, Any]:
    ms = {"p50": ttft_p50, "p99": 2 * ttft_p50}
    summary = {"output_token_throughput": tok_s, "ttft_ms": ms, "itl_ms": {"p50": 5.0, "p99": 9.0}}
    return {"level": 8, "summary": summary, "adapters_together": together, "warnings": []}


def _meta(rounds: int) -> dict[str, Any]:
    return {
        "model": "m", "personas": 8, "rank": 8, "targets": ["q_proj", "v_proj"],
        "seeds": "1000-1007", "server_flags": ["--enable-lora"], "rounds": rounds,
        "mode": "concurrency", "seed": 0, "turns": "1:4", "max_tokens": "16:64",
        "ignore_eos": True, "num_requests": [32], "duration": None, "order": "ABBA",
    }  # fmt: skip


def test_rounds_alternate_abba_and_the_report_pairs_them() -> None:
    calls: list[tuple[str, int]] = []
    # personas: 90 then 80 tok/s against base's 100; TTFT 1.5x then 1.2x base's.
    figures = {("base", 1): (100, 10), ("personas", 1): (90, 15), ("personas", 2): (80, 12),
               ("base", 2): (100, 10)}  # fmt: skip

    async def one_pass(mode: str, rnd: int) -> list[dict[str, Any]]:
        calls.append((mode, rnd))
        tok_s, ttft = figures[(mode, rnd)]
        return [_level(tok_s, ttft, 8 if mode == "personas" else 0)]

    saved: list[int] = []
    results, cut = asyncio.run(
        personas.run_rounds(2, one_pass, after_round=lambda res, _: saved.append(len(res["base"])))
    )
    assert calls == [("base", 1), ("personas", 1), ("personas", 2), ("base", 2)]
    assert not cut and saved == [1, 2], "the report is rewritten after every round"
    report = build_report(_meta(2), results, cut)
    ratio = report["ratios"]["personas_vs_base"]["8"]
    assert ratio["output tok/s"]["median"] == pytest.approx(0.85)
    assert (ratio["output tok/s"]["min"], ratio["output tok/s"]["max"]) == (0.8, 0.9)
    assert ratio["TTFT p50"]["median"] == pytest.approx(1.35)
    lines = summary_lines(report)
    assert any(line.startswith("personas/base conc 8: tok/s 0.85x (0.80-0.90)") for line in lines)
    assert any(line.endswith("conc 8: 8 of 8") for line in lines)
    md = markdown(report)
    assert "| 8 | 0.85 (0.80-0.90) | 1.35 (1.20-1.50) |" in md
    assert "32 requests per level and mode" in md


def test_a_round_that_would_not_fit_the_budget_is_not_started() -> None:
    now = [0.0]

    async def one_pass(mode: str, rnd: int) -> list[dict[str, Any]]:
        now[0] += 40.0  # every pass takes 40 s
        return [_level(100, 10, None)]

    # 80 s for round 1; round 2 needs 80 more and only 70 are left.
    results, cut = asyncio.run(
        personas.run_rounds(3, one_pass, deadline=150.0, clock=lambda: now[0])
    )
    assert cut and [len(results[m]) for m in ("base", "personas")] == [1, 1]
    report = build_report(_meta(3), results, cut)
    assert report["meta"]["rounds_done"] == 1
    assert "cut by --budget-s after 1 of 3 rounds" in summary_lines(report)
    # A round cut in the middle (a killed run's last save) counts only complete pairs.
    results["base"].append([_level(100, 10, None)])
    assert build_report(_meta(3), results, False)["meta"]["rounds_done"] == 1


def test_defaults_fit_a_small_machine() -> None:
    args = personas.build_parser().parse_args([])
    assert (args.personas, args.lora_rank, args.rounds) == (8, 8, 2)
    assert args.concurrency == [8] and args.ignore_eos
    assert bench.level_size(args, "concurrency", 8) == 32, "a few dozen requests a level"
    args = personas.build_parser().parse_args(["--env", "VLLM_ENABLE_V1_MULTIPROCESSING=1"])
    assert dict(kv.split("=", 1) for kv in args.env) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # the user's value wins
        "OMP_NUM_THREADS": "1",  # the default one OpenMP thread stays
    }
