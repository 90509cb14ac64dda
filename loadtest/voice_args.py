"""The flags of ``python -m loadtest.voice``, and the options objects they make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loadtest.servers import add_server_args
from loadtest.voice_plan import FloatRange, VoiceWorkload
from loadtest.voice_report import REF_TPOT_MS, REF_TTFT_MS
from loadtest.voice_run import RunOptions
from loadtest.voice_session import SessionOptions
from loadtest.voice_speech import SpeechConfig
from loadtest.workload import IntRange

DEFAULTS = VoiceWorkload()


def _levels(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated session counts >= 1: {text!r}")
    return values


def _weights(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three weights P0,P1,P2: {text!r}")
    return values


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1: {text!r}")
    return value


def _priority(text: str) -> tuple[int, int]:
    confirmed, _, speculative = text.partition(",")
    return int(confirmed), int(speculative or confirmed)


def build_parser(doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.voice",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = p.add_argument_group("targets")
    t.add_argument(
        "--base-url",
        default=None,
        help="drive this running server (ending in /v1) instead of starting ours and vLLM's",
    )
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    t.add_argument("--label", default="", help="the --base-url target's name in the outputs")
    t.add_argument("--targets", default="ours,vllm", help="servers to start: ours, vllm or both")
    t.add_argument(
        "--sequential",
        action="store_true",
        help="one server at a time, each for its whole sweep (one GPU that cannot hold two)",
    )
    t.add_argument("--model", default=None, help="model folder or id (default: the demo model)")
    t.add_argument("--vllm-cmd", default=None, help="command that starts vLLM's server")
    t.add_argument("--ours-args", default="", help="flags for our server only (admission, ...)")
    t.add_argument(
        "--vllm-args",
        default="",
        help="flags for vLLM's server only, e.g. '--max-num-queued-reqs 64'",
    )
    t.add_argument(
        "--tool-call-parser",
        default="hermes",
        help="given to both servers, with --enable-auto-tool-choice, when turns call tools "
        "(vLLM's server refuses a forced call without a parser); the demo model writes Hermes "
        "calls; '' to give none",
    )
    add_server_args(p)
    # The voice prompts (persona, history, tools) need more room than the bench's 2048.
    p.set_defaults(served_model_name=None, max_model_len=4096)

    load = p.add_argument_group("load")
    load.add_argument(
        "--sessions",
        type=_levels,
        default=[4, 8, 16],
        help="offered concurrent sessions per level, comma-separated (default 4,8,16)",
    )
    load.add_argument("--duration", type=float, default=40.0, help="seconds of turns per level")
    load.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="after a level, seconds the turns in flight may take before they are cut",
    )
    load.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    load.add_argument("--seed", type=int, default=0)

    w = p.add_argument_group("sessions")
    w.add_argument("--turns", type=IntRange.parse, default=DEFAULTS.turns)
    w.add_argument(
        "--think-s",
        type=FloatRange.parse,
        default=DEFAULTS.think_s,
        help="the user's speech before each turn, s (default %(default)s)",
    )
    w.add_argument("--reply-tokens", type=IntRange.parse, default=DEFAULTS.reply_tokens)
    w.add_argument(
        "--persona-chars",
        type=IntRange.parse,
        default=DEFAULTS.persona_chars,
        help="persona system prompt length in characters (default %(default)s)",
    )
    w.add_argument(
        "--max-context-chars",
        type=int,
        default=DEFAULTS.max_context_chars,
        help="oldest exchanges are dropped beyond this prompt size (characters)",
    )
    w.add_argument(
        "--speculative",
        type=_weights,
        default=DEFAULTS.speculative_weights,
        help="weights of 0, 1 and 2 speculative requests per turn (default 0.3,0.5,0.2)",
    )
    w.add_argument(
        "--cancel-s",
        type=FloatRange.parse,
        default=DEFAULTS.cancel_s,
        help="a speculative request is cancelled this long after it is sent",
    )
    w.add_argument(
        "--barge-in",
        type=_share,
        default=DEFAULTS.barge_in,
        help="share of replies the user cuts (default %(default)s)",
    )
    w.add_argument(
        "--barge-in-s",
        type=FloatRange.parse,
        default=DEFAULTS.barge_in_s,
        help="seconds of speech heard before the cut (default %(default)s)",
    )
    w.add_argument(
        "--tool-share",
        type=_share,
        default=DEFAULTS.tool_share,
        help="share of turns that force a tool call; 0: no tools sent at all",
    )
    w.add_argument("--tool-tokens", type=int, default=DEFAULTS.tool_tokens)
    w.add_argument(
        "--tool-choice",
        choices=("none", "auto"),
        default="none",
        help="tool_choice of the requests that do not force a call (auto: a real model may "
        "call a tool on its own; the server needs auto tool choice on)",
    )
    w.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replies of exactly their drawn length (vLLM's extension; default on)",
    )
    w.add_argument(
        "--after-refusal",
        choices=("leave", "continue"),
        default="leave",
        help="a refused session goes to another replica (leave) or keeps talking here",
    )

    s = p.add_argument_group("speech and SLO")
    s.add_argument("--cps", type=float, default=15.0, help="speech rate, characters per second")
    s.add_argument("--min-sentence-chars", type=int, default=20)
    s.add_argument("--max-first-chars", type=int, default=100)
    s.add_argument("--slo", choices=("auto", "gpu", "scaled"), default="auto")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="override the TTFT SLO")
    s.add_argument("--slo-ttfs-ms", type=float, default=None, help="override the 1st-sentence SLO")
    s.add_argument("--slo-share", type=_share, default=0.95)
    s.add_argument("--underrun-ok", action="store_true", help="an underrun does not fail a turn")
    s.add_argument("--ref-ttft-ms", type=float, default=REF_TTFT_MS)
    s.add_argument("--ref-tpot-ms", type=float, default=REF_TPOT_MS)
    s.add_argument("--calibration-requests", type=int, default=12)
    s.add_argument(
        "--chars-per-token",
        type=float,
        default=None,
        help="pin the schedule's characters per reply token (default: measured)",
    )

    h = p.add_argument_group("what requests carry")
    h.add_argument("--send-slo-header", action="store_true", help="send x-slo-ttft-ms")
    h.add_argument(
        "--priority",
        type=_priority,
        default=None,
        metavar="CONFIRMED,SPECULATIVE",
        help="send vLLM's `priority` field (lower runs first; vLLM's server needs "
        "--scheduling-policy priority)",
    )

    p.add_argument("--out", type=Path, default=Path("results/voice"))
    p.add_argument("--no-plot", action="store_true")
    return p


def workload(args: argparse.Namespace) -> VoiceWorkload:
    return VoiceWorkload(
        seed=args.seed,
        turns=args.turns,
        think_s=args.think_s,
        reply_tokens=args.reply_tokens,
        persona_chars=args.persona_chars,
        max_context_chars=args.max_context_chars,
        speculative_weights=args.speculative,
        cancel_s=args.cancel_s,
        barge_in=args.barge_in,
        barge_in_s=args.barge_in_s,
        tool_share=args.tool_share,
        tool_tokens=args.tool_tokens,
    )


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        duration_s=args.duration,
        drain_s=args.drain,
        speech=SpeechConfig(args.cps, args.min_sentence_chars, args.max_first_chars),
        session=SessionOptions(
            tools=args.tool_share > 0,
            max_context_chars=args.max_context_chars,
            cps=args.cps,
            tool_tokens=args.tool_tokens,
            leave_on_refusal=args.after_refusal == "leave",
            tool_choice=args.tool_choice,
        ),
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        stall_timeout_s=args.stall_timeout,
        priority=args.priority,
        slo_header=args.send_slo_header,
    )
