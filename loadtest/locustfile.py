"""Locust user for avatar chat: streams replies and reports TTFT, ITL and end-to-end latency.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --model avatar-demo \\
        --ignore-eos --headless -u 32 -r 8 -t 2m --csv results/locust

Locust's own entry for the POST stops its clock when the response headers arrive, which for a
stream says nothing about the reply. So each request also fires its own entries, with request
type ``SSE``: ``ttft`` (time to first token), ``itl`` (one entry per gap between token chunks),
``ttfs`` (time to first sentence end) and ``e2e`` (whole reply; its "size" is output tokens).

With ``--slo-ttft-ms`` / ``--slo-itl-ms``, ``ttft`` and ``itl`` entries over the target are
reported as failures, so Locust's failure ratio on those rows is the SLO miss ratio.
Every option also reads an environment variable (``LOADTEST_MODEL``, ``OPENAI_API_KEY``, ...).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from locust import FastHttpUser, between, events, task

try:
    import loadtest  # noqa: F401
except ImportError:
    # `locust -f loadtest/locustfile.py` puts only loadtest/ on sys.path; without an installed
    # package, make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtest import DEMO_MODEL_NAME
from loadtest.payload import auth_headers, chat_payload
from loadtest.records import RequestRecord
from loadtest.sse import RawLine, record_from_sse
from loadtest.workload import ChatRequest, IntRange, build_workload

REQUEST_TYPE = "SSE"
# Sending the same list from every user keeps runs comparable with loadtest.bench's.
_WORKLOAD_SIZE = 10_000


class SloViolation(Exception):
    """Reported as the 'failure' of a ttft/itl entry that missed its target."""


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--model", env_var="LOADTEST_MODEL", default=DEMO_MODEL_NAME, help="model name to request"
    )
    parser.add_argument("--api-key", env_var="OPENAI_API_KEY", default="", help="bearer token")
    parser.add_argument(
        "--slo-ttft-ms",
        env_var="LOADTEST_SLO_TTFT_MS",
        type=float,
        default=0.0,
        help="report ttft over this as a failure (0: off)",
    )
    parser.add_argument(
        "--slo-itl-ms",
        env_var="LOADTEST_SLO_ITL_MS",
        type=float,
        default=0.0,
        help="report itl gaps over this as failures (0: off)",
    )
    parser.add_argument(
        "--max-tokens",
        env_var="LOADTEST_MAX_TOKENS",
        default="20:200",
        help="reply length cap, N or LO:HI",
    )
    parser.add_argument(
        "--turns",
        env_var="LOADTEST_TURNS",
        default="1:4",
        help="user turns per conversation, N or LO:HI",
    )
    parser.add_argument(
        "--workload-seed", env_var="LOADTEST_SEED", type=int, default=0, help="workload seed"
    )
    parser.add_argument(
        "--ignore-eos",
        env_var="LOADTEST_IGNORE_EOS",
        action="store_true",
        default=False,
        help="send ignore_eos=true (vLLM extension)",
    )
    parser.add_argument(
        "--think-time-s",
        env_var="LOADTEST_THINK_TIME_S",
        type=float,
        default=0.5,
        help="a user waits up to this long between turns",
    )


_requests: Iterator[ChatRequest] | None = None
_requests_lock = threading.Lock()


def _next_request(options: Any) -> ChatRequest:
    global _requests
    with _requests_lock:
        if _requests is None:
            reqs = build_workload(
                _WORKLOAD_SIZE,
                seed=options.workload_seed,
                turns=IntRange.parse(options.turns),
                max_tokens=IntRange.parse(options.max_tokens),
            )
            _requests = itertools.cycle(reqs)
        return next(_requests)


def _fire(
    name: str, response_time_ms: float, length: int = 0, exc: Exception | None = None
) -> None:
    events.request.fire(
        request_type=REQUEST_TYPE,
        name=name,
        response_time=response_time_ms,
        response_length=length,
        exception=exc,
        context={},
    )


def report(rec: RequestRecord, slo_ttft_ms: float = 0.0, slo_itl_ms: float = 0.0) -> None:
    """Fire the SSE entries for one successful request."""
    if rec.ttft is not None:
        ttft_ms = rec.ttft * 1000
        miss = slo_ttft_ms and ttft_ms > slo_ttft_ms
        _fire("ttft", ttft_ms, exc=SloViolation(f"ttft > {slo_ttft_ms:g} ms") if miss else None)
    for gap in rec.itl:
        gap_ms = gap * 1000
        miss = slo_itl_ms and gap_ms > slo_itl_ms
        _fire("itl", gap_ms, exc=SloViolation(f"itl > {slo_itl_ms:g} ms") if miss else None)
    if rec.ttfs is not None:
        _fire("ttfs", rec.ttfs * 1000)
    if rec.e2e is not None:
        _fire("e2e", rec.e2e * 1000, length=rec.output_tokens or 0)


class AvatarChatUser(FastHttpUser):
    """One avatar session: a streaming chat turn, a short pause, the next turn."""

    def wait_time(self) -> float:
        return between(0.0, self.environment.parsed_options.think_time_s)(self)

    @task
    def chat_turn(self) -> None:
        opts = self.environment.parsed_options
        req = _next_request(opts)
        payload = chat_payload(opts.model, req, ignore_eos=opts.ignore_eos)
        lines: list[RawLine] = []
        clock = time.perf_counter
        start = clock()
        with self.client.post(
            "/v1/chat/completions",
            json=payload,
            headers=auth_headers(opts.api_key),
            stream=True,
            catch_response=True,
            name="/v1/chat/completions",
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                # readline on the underlying response: FastResponse.iter_content(n) waits for
                # n bytes, which would batch chunks together and hide the real gaps.
                raw = resp._response
                assert raw is not None
                while line := raw.readline(b"\n"):
                    lines.append((clock(), line))
            except Exception as exc:  # a broken stream is a failed request
                resp.failure(f"stream broken: {type(exc).__name__}: {exc}")
                return
            rec = record_from_sse(req.index, start, clock(), lines)
            if rec.error:
                resp.failure(rec.error)
                return
            resp.success()
        report(rec, opts.slo_ttft_ms, opts.slo_itl_ms)
