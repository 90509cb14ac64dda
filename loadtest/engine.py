"""The floor: the same workload on vLLM's AsyncLLM in process, with no HTTP in between.

    python -m loadtest.engine --model DIR --enforce-eager --max-model-len 2048 \\
        --kv-cache-memory-bytes 1073741824 --concurrency 1,16,64 --ignore-eos --out DIR

Prompts are rendered with the tokenizer's chat template and tokenized the way vLLM's chat
endpoint does it (template text, then ``add_special_tokens=False``), so the engine sees the
same token ids as behind either HTTP server. Every other flag is an ``AsyncEngineArgs`` flag.
Outputs have the same format as ``loadtest.bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench import add_load_args, add_workload_args, run_levels, run_meta
from loadtest.records import RequestRecord, TokenEvent, build_record
from loadtest.report import emit, level_results
from loadtest.stats import Slo
from loadtest.workload import ChatRequest


class EngineClient:
    """A ``send`` function for the runner, backed by an in-process AsyncLLM."""

    def __init__(self, engine: Any, tokenizer: Any, ignore_eos: bool) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.ignore_eos = ignore_eos
        self._ids = itertools.count()
        self._prompt_cache: dict[int, list[int]] = {}

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        key = id(req.messages)
        if key not in self._prompt_cache:
            text = self.tokenizer.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=True
            )
            self._prompt_cache[key] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompt_cache[key]

    async def send(self, req: ChatRequest) -> RequestRecord:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # Tokenizing is the servers' job too, but it happens before their clock starts (the
        # client's start is when the request leaves), so it is done before ours as well.
        prompt = {"prompt_token_ids": self.prompt_ids(req)}
        params = SamplingParams(
            max_tokens=req.max_tokens,
            ignore_eos=self.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        events: list[TokenEvent] = []
        n_tokens = 0
        clock = time.perf_counter
        start = clock()
        try:
            async for out in self.engine.generate(prompt, params, f"floor-{next(self._ids)}"):
                comp = out.outputs[0]
                if comp.token_ids:
                    events.append((clock(), comp.text))
                    n_tokens += len(comp.token_ids)
        except Exception as exc:  # an engine error is a failed request, as over HTTP
            return RequestRecord(req.index, start, error=f"{type(exc).__name__}: {exc}")
        return build_record(
            req.index,
            start,
            clock(),
            events,
            output_tokens=n_tokens,
            prompt_tokens=len(prompt["prompt_token_ids"]),
        )


def build_parser() -> argparse.ArgumentParser:
    """Our own flags; everything this parser does not know goes to vLLM's engine-args parser.

    Two parsers because the flag sets overlap (``--seed`` is both the workload seed and the
    engine's sampling seed): here ``--seed`` is the workload's, as in ``loadtest.bench``.
    """
    p = argparse.ArgumentParser(
        prog="python -m loadtest.engine",
        description=__doc__,
        epilog="Any other flag is passed to vLLM's AsyncEngineArgs (e.g. --model, "
        "--max-model-len, --enforce-eager, --kv-cache-memory-bytes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="folder for the results")
    p.add_argument("--label", default="engine", help="name of this run")
    p.add_argument("--no-plots", action="store_true")
    add_workload_args(p)
    add_load_args(p)
    return p


def engine_args_from(argv: Sequence[str]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m loadtest.engine (engine flags)")
    AsyncEngineArgs.add_cli_args(parser)
    engine_args = AsyncEngineArgs.from_cli_args(parser.parse_args(list(argv)))
    engine_args.disable_log_stats = True
    return engine_args


async def run(
    args: argparse.Namespace, engine_argv: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    from transformers import AutoTokenizer
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = engine_args_from(engine_argv)
    # The servers it is compared with both get the OpenAI server's batch defaults.
    engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        tokenizer = AutoTokenizer.from_pretrained(engine_args.tokenizer or engine_args.model)
        # The engine shares this process, so the client CPU figure includes it: no warning.
        runs = await run_levels(
            EngineClient(engine, tokenizer, args.ignore_eos).send, args, monitor_client=False
        )
    finally:
        engine.shutdown()
        # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails noisily
        # when it only runs at interpreter exit.
        del engine
    slo = Slo(args.slo_ttft_ms, args.slo_itl_ms)
    meta = run_meta(
        args,
        target="AsyncLLM (in process)",
        model=engine_args.model,
        label=args.label,
        engine_argv=list(engine_argv),
    )
    return meta, level_results(runs, slo), runs


def main(argv: Sequence[str] | None = None) -> int:
    args, engine_argv = build_parser().parse_known_args(argv)
    meta, levels, runs = asyncio.run(run(args, engine_argv))
    return emit(meta, levels, runs, args.out, plots=not args.no_plots)


if __name__ == "__main__":
    sys.exit(main())
