"""The adapter over vLLM's async engine (``vllm.v1.engine.async_llm.AsyncLLM``).

With ``vllm_agents`` (templates with tools, tool-call and reasoning parsers, guided decoding),
the only modules of the request path that import vLLM. It turns engine-neutral
``SamplingOptions`` into ``SamplingParams`` with DELTA output, so each step yields only the new
text and per-token work does not grow with the length of the answer, and it turns vLLM's
exceptions into the engine-neutral ones of ``base``. A chat answer that must be parsed (tools
to call, a reasoning parser) goes through a loop of its own, so the plain loop stays as cheap.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.version import __version__ as VLLM_VERSION

from serve.engine.base import (
    Adapter,
    ChatConfig,
    ChatTurn,
    Delta,
    EngineBusyError,
    EngineDeadError,
    EngineInputError,
    EngineRequestError,
    SamplingOptions,
)
from serve.engine.vllm_agents import ChatSupport, TurnParser, structured_outputs
from serve.engine.vllm_detailed import detailed as _detailed

log = logging.getLogger(__name__)

try:  # vLLM's own admission valves (--max-num-queued-reqs/-tokens), new since 0.26.0
    from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError

    _ENGINE_BUSY: tuple[type[Exception], ...] = (QueueOverflowError, MaxQueuedTokensError)
except ImportError:  # the GPU kit's older release: no valve, nothing to catch
    _ENGINE_BUSY = ()


class _SchedulerStatsProbe(StatLoggerBase):
    """Keeps the latest scheduler stats (KV-cache usage) for our own gauges.

    vLLM's Prometheus logger keeps running beside it, so ``vllm:*`` metrics are unchanged.
    """

    def __init__(self, vllm_config: Any, engine_index: int = 0, sink: list[float] | None = None):
        self.sink = sink if sink is not None else [0.0]

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.sink[0] = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass


# We are an OpenAI API server, so the engine gets the batch defaults that `vllm serve` gets. The
# default context (ENGINE_CONTEXT) has none of its own: on an H100/H200 it left the scheduler at
# 2048 batched tokens where `vllm serve` uses 8192 and 1024 sequences (seen on the first GPU run).
SERVER_USAGE = UsageContext.OPENAI_API_SERVER


def engine_config(args: AsyncEngineArgs) -> VllmConfig:
    """The engine's whole configuration, with the OpenAI server's hardware-dependent defaults."""
    return args.create_engine_config(SERVER_USAGE)


class VllmEngine:
    """``Engine`` over one in-process ``AsyncLLM`` shared by every request."""

    def __init__(self, llm: AsyncLLM, kv_cache_usage: list[float]) -> None:
        self._llm = llm
        self._kv_cache_usage = kv_cache_usage
        self._tokenizer = llm.get_tokenizer()
        self._max_model_len = int(llm.model_config.max_model_len)
        # vLLM's own rule (renderers.validate_token_ids): an id is in the vocabulary when it is
        # at most the larger of the tokenizer's last id and the model's last embedding row.
        last_tokenizer_id = getattr(self._tokenizer, "max_token_id", len(self._tokenizer) - 1)
        self._vocab_size = max(int(last_tokenizer_id) + 1, llm.model_config.get_vocab_size())
        # --reasoning-parser is an engine flag (it also steers guided decoding in the core).
        so_config = llm.vllm_config.structured_outputs_config
        self._chat = ChatSupport(
            self._tokenizer,
            model_config=llm.model_config,
            reasoning_parser=so_config.reasoning_parser or None,
            reasoning_parser_plugin=so_config.reasoning_parser_plugin or None,
        )

    @classmethod
    def from_engine_args(
        cls,
        engine_args: dict[str, Any],
        *,
        vllm_config: VllmConfig | None = None,
        client: dict[str, Any] | None = None,
    ) -> VllmEngine:
        """Start the engine from ``AsyncEngineArgs`` fields (loading the model takes a while).

        With ``client`` (vLLM's client config: ``client_index``, ``client_count`` and the engine
        core's addresses) this is one of several front ends attached to an engine core that
        was launched apart, as ``vllm serve --api-server-count`` does; nothing is loaded here.
        """
        args = AsyncEngineArgs(**engine_args)
        kv_cache_usage = [0.0]  # written by the probe on each engine step, read at scrape time

        def probe(vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
            return _SchedulerStatsProbe(vllm_config, engine_index, kv_cache_usage)

        client = dict(client or {})
        llm = AsyncLLM.from_vllm_config(
            vllm_config if vllm_config is not None else engine_config(args),
            usage_context=SERVER_USAGE,
            stat_loggers=[probe],
            enable_log_requests=args.enable_log_requests,
            disable_log_stats=args.disable_log_stats,
            client_count=client.pop("client_count", 1),
            client_index=client.pop("client_index", 0),
            client_addresses=client or None,
        )
        return cls(llm, kv_cache_usage)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def is_alive(self) -> bool:
        return not self._llm.errored

    @property
    def version(self) -> str:
        return VLLM_VERSION

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def reasoning(self) -> bool:
        return self._chat.reasoning

    @property
    def priority_scheduling(self) -> bool:
        return str(self._llm.vllm_config.scheduler_config.policy) == "priority"

    @property
    def max_num_seqs(self) -> int | None:
        return int(self._llm.vllm_config.scheduler_config.max_num_seqs)

    @property
    def renderer_workers(self) -> int:
        return int(self._llm.model_config.renderer_num_workers)

    def check_chat_config(self, config: ChatConfig) -> None:
        self._chat.check(config)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], turn: ChatTurn | None = None
    ) -> str:
        return self._chat.render(messages, turn)

    def parses(self, turn: ChatTurn) -> bool:
        return self._chat.parses(turn)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids)))

    @property
    def max_adapter_rank(self) -> int | None:
        lora = self._llm.vllm_config.lora_config
        return int(lora.max_lora_rank) if lora is not None else None

    async def load_adapter(self, adapter: Adapter) -> None:
        if self.max_adapter_rank is None:
            raise EngineInputError("The engine serves no adapters (start it with --enable-lora).")
        try:
            # The engine core's workers read and check the files, between two engine steps.
            await self._llm.add_lora(_lora_request(adapter))
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the engine is not running") from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError("the engine is not running") from exc
            raise EngineInputError(
                f"The adapter `{adapter.name}` cannot be loaded: {_worker_error(exc)}",
                param="lora_path",
                public=True,
            ) from exc

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        turn: ChatTurn | None = None,
        adapter: Adapter | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[Delta, None]:
        first = True
        stream = None
        parser: TurnParser | None = None
        try:
            if turn is not None and self._chat.parses(turn):
                parser = self._chat.start(turn, options, prompt_token_ids)
            params = _sampling_params(options, parser)
            stream = self._llm.generate(
                {"prompt_token_ids": prompt_token_ids},
                params,
                request_id,
                lora_request=_lora_request(adapter) if adapter is not None else None,
                reasoning_ended=parser.reasoning_ended if parser is not None else None,
                priority=priority,  # vLLM's FCFS scheduler ignores it, its priority one heeds it
            )
            if options.detailed:
                # n answers, log-probabilities: a loop of their own, so the plain one stays as is.
                async for choice in _detailed(stream, request_id, self._tokenizer, _engine_times):
                    yield choice
                return
            async for out in stream:
                completion = out.outputs[0]
                reason = completion.finish_reason if out.finished else None
                if reason == "error":
                    # vLLM's request-scoped failure (grammar, KV load, preprocessing): the
                    # engine serves on, but this answer is lost and must not look finished.
                    raise EngineRequestError(f"the engine failed request {request_id}")
                if parser is None:
                    delta = Delta(completion.text, len(completion.token_ids), reason)
                else:
                    delta = parser.feed(completion.text, completion.token_ids, reason)
                if first:
                    delta.num_prompt_tokens = len(out.prompt_token_ids or prompt_token_ids)
                    delta.num_cached_tokens = out.num_cached_tokens
                    delta.engine_times = _engine_times(out.metrics)
                    first = False
                yield delta
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the engine is not running") from exc
        except _ENGINE_BUSY as exc:
            raise EngineBusyError(str(exc)) from exc
        except VLLMValidationError as exc:
            # Written for the client (and a client error, not a ValueError, since vLLM 0.27).
            message = exc.args[0] if exc.args else str(exc)
            raise EngineInputError(str(message), param=exc.parameter, public=True) from exc
        except (ValueError, TypeError) as exc:
            guided = options.structured is not None or (
                parser is not None and parser.structured is not None
            )
            if first and guided:
                # The guided-decoding grammar was refused (vLLM checks it when the request is
                # added): the schema is the client's, so the message is for the client.
                raise EngineInputError(
                    f"The schema cannot be used for guided decoding: {exc}",
                    param=_schema_param(options, turn),
                    public=True,
                ) from exc
            # Other input errors of vLLM's (SamplingParams checks) are ValueErrors.
            raise EngineInputError(str(exc)) from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError("the engine is not running") from exc
            raise
        finally:
            # Closing vLLM's generator now (not at garbage collection) aborts an unfinished
            # request at once: that is how a client that left frees its engine slot.
            if stream is not None:
                await stream.aclose()

    def engine_core_died(self) -> None:
        """Told from outside that the engine core has died (``--api-server-count``: the launcher
        owns the core and watches it). Fails every request of this front end, as vLLM's own
        monitor does for a front end that owns its core (``MPClient.start_engine_core_monitor``).
        """
        core = self._llm.engine_core
        if core.resources.engine_dead:
            return
        log.critical("the engine core has died")
        core.resources.engine_dead = True
        core.shutdown()

    def num_unfinished_requests(self) -> int:
        # AsyncLLM.get_num_unfinished_requests() is new in recent releases; the output
        # processor's count is what it returns, and exists in older releases too.
        return int(self._llm.output_processor.get_num_unfinished_requests())

    def kv_cache_usage(self) -> float | None:
        return self._kv_cache_usage[0]

    async def shutdown(self) -> None:
        self._llm.shutdown()


def _lora_request(adapter: Adapter) -> LoRARequest:
    # vLLM identifies an adapter by lora_name (LoRARequest.__eq__/__hash__, the batch's set of
    # active adapters, the prefix-cache key): each load's engine name is its own.
    return LoRARequest(
        lora_name=adapter.engine_name, lora_int_id=adapter.id, lora_path=adapter.path
    )


def _worker_error(exc: Exception) -> str:
    """The worker's own reason from vLLM's wrapper ("Call to add_lora method failed: Worker
    failed with error '<reason>', please check the stack trace above ..."), else the message."""
    text = str(exc)
    start = text.find("error '")
    end = text.rfind("', please")
    if start != -1 and end > start:
        text = text[start + len("error '") : end]
    return text.rstrip(".")


def _engine_times(stats: Any) -> tuple[float, float, float] | None:
    """The engine core's stamps of a request's first output (queued, scheduled, first token).

    They are ``time.monotonic()`` in the engine-core process; on Linux that is the clock
    ``time.perf_counter`` reads too (CLOCK_MONOTONIC, system-wide). Absent without stats.
    """
    if stats is None:
        return None
    times = (
        getattr(stats, "queued_ts", 0.0),
        getattr(stats, "scheduled_ts", 0.0),
        getattr(stats, "first_token_ts", 0.0),
    )
    return times if all(t > 0.0 for t in times) else None


def _schema_param(options: SamplingOptions, turn: ChatTurn | None) -> str:
    if turn is not None and turn.tool_choice in ("required", "function"):
        return "tools"
    return "response_format" if options.structured is not None else "tools"


def _sampling_params(options: SamplingOptions, parser: TurnParser | None) -> SamplingParams:
    kwargs: dict[str, Any] = {
        "max_tokens": options.max_tokens,
        "stop": list(options.stop) or None,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "min_tokens": options.min_tokens,
        "ignore_eos": options.ignore_eos,
        "seed": options.seed,
        "output_kind": RequestOutputKind.DELTA,
    }
    if options.logit_bias:
        kwargs["logit_bias"] = dict(options.logit_bias)
    if options.detailed:
        kwargs.update(n=options.n, logprobs=options.logprobs)
        kwargs["prompt_logprobs"] = options.prompt_logprobs
    if parser is not None:
        # The parser's request decides: a forced call's grammar replaces the response format.
        kwargs["structured_outputs"] = parser.structured
        kwargs["skip_special_tokens"] = parser.skip_special_tokens
    elif options.structured is not None:
        kwargs["structured_outputs"] = structured_outputs(options.structured)
    # Leave unset fields to vLLM's defaults rather than restating them here.
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    return SamplingParams(**kwargs)
