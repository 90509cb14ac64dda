"""The request path of the generation routes, in one place:

    validate (model, n, stop, context window) → render the prompt → sampling options
    → admission → engine → stream frames, or collect one answer.

Routes stay thin and call ``prepare_chat`` / ``prepare_completion`` then ``respond``. All
per-request state lives in ``Prepared`` and the request's ``RequestRecord``, never on the shared
service object.

The answer itself is written by ``serve.answers``: frames of a stream or one JSON body, plain
or parsed (tools to call, a reasoning parser).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from starlette.responses import Response

from serve import features
from serve.admission import Admission
from serve.admission_predictor import Demand
from serve.answers import (
    Prepared,
    choice_frames,
    collect_choices,
    collect_parsed,
    collect_plain,
    parsed_frames,
    plain_frames,
)
from serve.chat import chat_turn, engine_messages, request_schemas, structured_output
from serve.choices import Choices, generate_all
from serve.engine.base import (
    Adapter,
    ChatConfig,
    ChatTurn,
    Engine,
    SamplingOptions,
    StructuredOutput,
)
from serve.errors import APIError, invalid_request
from serve.personas import Personas
from serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from serve.request_record import RequestRecord
from serve.schemas import SchemaChecks
from serve.settings import Settings
from serve.streaming import ChunkFormat, SSEResponse
from serve.token_limits import (
    check_lengths,
    check_logit_bias,
    check_token_ids,
    fit_window,
    token_id,
)

# Prompts larger than this are rendered and tokenized in the renderer thread, not on the event
# loop. The tokenizer releases the GIL while it encodes (measured: a loop beside a thread that
# encodes 15,600 characters kept its 1 ms timer at 1.07 ms; beside the same encode on the loop
# it is held for all 6.4 ms of it), and with voice prompts of 1,000-6,500 characters encoding
# on the loop took 43 % of the front end's busy time at 512 sessions (BENCHMARKS.md, "The
# renderer thread"): every stream's next frame and every refusal waited behind it. Shorter
# prompts encode in under half a millisecond, about what the trip to the thread and back costs
# (0.5-0.8 ms there, on 2 busy cores). A chat prompt's size counts the tools and tool-call
# arguments too: the template writes them.
_OFFLOAD_CHARS = 1_024

_T = TypeVar("_T")


class GenerationService:
    def __init__(
        self, engine: Engine, settings: Settings, admission: Admission, personas: Personas
    ) -> None:
        self._engine = engine
        self._admission = admission
        self._personas = personas
        self._max_stop = settings.max_stop_sequences
        ms = settings.default_slo_ttft_ms
        self._default_budget = ms / 1000 if ms is not None else None
        # Our queue orders by priority only where the engine does (vLLM ignores it otherwise).
        self._priority_queue = engine.priority_scheduling
        self._log_prompts = settings.log_prompts
        self._chat = ChatConfig(
            chat_template=settings.chat_template,
            enable_auto_tool_choice=settings.enable_auto_tool_choice,
            tool_call_parser=settings.tool_call_parser,
            tool_parser_plugin=settings.tool_parser_plugin,
        )
        # Load the template and parsers now: a bad name fails at start-up, not on a request.
        engine.check_chat_config(self._chat)
        self._schemas = SchemaChecks()  # agents resend the same tools every turn
        # vLLM's server renders and tokenizes in a pool of --renderer-num-workers threads (one by
        # default): one thread keeps the prompts in arrival order, and leaves the other cores to
        # the loop and the engine rather than to threads contending for the GIL.
        self._renderer = ThreadPoolExecutor(engine.renderer_workers, "renderer")

    # -- validate and convert ------------------------------------------------------------

    async def prepare_chat(
        self,
        req: ChatCompletionRequest,
        record: RequestRecord,
        request_id: str,
        ttft_budget: float | None = None,
        priority: int | None = None,
    ) -> Prepared:
        record.parsed = time.perf_counter()
        adapter, priority = self._check_common(req, record, priority)
        self._admission.refuse_now(self._demand(record, 0, priority, ttft_budget))
        messages = engine_messages(req.messages)
        # A schema not checked before costs milliseconds, as does a long prompt: either moves
        # the work off the event loop.
        if _chat_chars(req, messages) > _OFFLOAD_CHARS or self._schemas.unchecked(
            request_schemas(req)
        ):
            turn, structured, prompt_ids = await self._off_loop(
                self._chat_prompt, req, messages, record
            )
        else:
            turn, structured, prompt_ids = self._chat_prompt(req, messages, record)
        if self._log_prompts:
            record.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        prompt_ids = features.truncate(
            prompt_ids, req.truncate_prompt_tokens, self._engine.max_model_len
        )
        parsed = self._engine.parses(turn)
        choices = features.plan(req, [prompt_ids], parsed=parsed)
        p = self._prepared(req, record, request_id, prompt_ids, "chatcmpl-", structured, choices)
        p.adapter, p.priority, p.ttft_budget = adapter, priority, ttft_budget
        p.turn = turn
        p.parsed = parsed
        return p

    async def _off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._renderer, fn, *args)

    def close(self) -> None:
        """At shutdown: a render in progress finishes, none starts."""
        self._renderer.shutdown(wait=False, cancel_futures=True)

    def _chat_prompt(
        self, req: ChatCompletionRequest, messages: list[dict[str, Any]], record: RequestRecord
    ) -> tuple[ChatTurn, StructuredOutput | None, list[int]]:
        turn = chat_turn(req, self._chat, self._schemas)
        structured = features.structured(req, self._schemas, structured_output(req, self._schemas))
        return turn, structured, self._render_and_encode(messages, turn, record)

    def _render_and_encode(
        self, messages: list[dict[str, Any]], turn: ChatTurn, record: RequestRecord
    ) -> list[int]:
        text = self._engine.render_chat(messages, turn)
        record.rendered = time.perf_counter()
        # The template already holds the special tokens (BOS, turn markers): add none twice.
        ids = self._engine.encode(text, add_special_tokens=False)
        record.tokenized = time.perf_counter()
        return ids

    async def prepare_completion(
        self,
        req: CompletionRequest,
        record: RequestRecord,
        request_id: str,
        ttft_budget: float | None = None,
        priority: int | None = None,
    ) -> Prepared:
        record.parsed = time.perf_counter()
        adapter, priority = self._check_common(req, record, priority)
        prompts = features.prompts(req.prompt)
        # Token ids are checked before the door: a request that is wrong whatever the load gets
        # its 400 under overload too, and a retry on another replica would not mend it.
        for n, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                check_token_ids(prompt, self._engine.vocab_size)
            if not prompt and not (isinstance(prompt, str) and self._engine.encode(prompt)):
                raise _empty_prompt(n, len(prompts))  # "" costs the tokenizer nothing
        self._admission.refuse_now(self._demand(record, 0, priority, ttft_budget))
        texts = [prompt for prompt in prompts if isinstance(prompt, str)]
        if sum(map(len, texts)) > _OFFLOAD_CHARS:
            encoded = await self._off_loop(self._encode_all, prompts)
        else:
            encoded = self._encode_all(prompts)
        if self._log_prompts and texts:
            record.prompt_text = "\n".join(texts)
        record.tokenized = time.perf_counter()
        window = self._engine.max_model_len
        ids = [features.truncate(i, req.truncate_prompt_tokens, window) for i in encoded]
        for n, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise _empty_prompt(n, len(ids))
        echo, echo_first = features.echo(self._engine, req, prompts, encoded, ids)
        choices = features.plan(req, ids, echo=echo, echo_first=echo_first)
        structured = features.structured(req, self._schemas, None)
        p = self._prepared(req, record, request_id, ids[0], "cmpl-", structured, choices)
        p.adapter, p.priority, p.ttft_budget = adapter, priority, ttft_budget
        return p

    def _encode_all(self, prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(self._engine.encode(prompt))
            else:  # checked in prepare_completion, before the door
                out.append(list(prompt))
        return out

    def _check_common(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        record: RequestRecord,
        priority_header: int | None,
    ) -> tuple[Adapter | None, int]:
        """Checks every generation request shares; returns the persona ``model`` names and the
        request's priority (the ``X-Vllm-Priority`` header wins over the body's field)."""
        adapter = self._personas.resolve(req.model)  # 404 for a name nobody serves
        record.model = req.model
        record.model_label = self._personas.label(req.model)
        features.check(req)
        stops = req.stop_list()
        if len(stops) > self._max_stop:
            raise invalid_request(
                f"`stop` may hold at most {self._max_stop} sequences.", param="stop"
            )
        if any(not s for s in stops):
            raise invalid_request("`stop` sequences must not be empty.", param="stop")
        if req.logit_bias:
            check_logit_bias(req.logit_bias, self._engine.vocab_size)
        check_lengths(req, self._engine.max_model_len)
        return adapter, priority_header if priority_header is not None else req.priority

    def _prepared(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        record: RequestRecord,
        request_id: str,
        prompt_ids: list[int],
        id_prefix: str,
        structured: StructuredOutput | None,
        choices: Choices | None = None,
    ) -> Prepared:
        chat = isinstance(req, ChatCompletionRequest)
        prompts = choices.prompts if choices is not None else [prompt_ids]
        record.prompt_tokens = sum(map(len, prompts))
        param = "messages" if chat else "prompt"
        window = self._engine.max_model_len
        max_tokens = min(fit_window(req, len(ids), param, window) for ids in prompts)
        fmt = ChunkFormat(
            chat=chat,
            response_id=id_prefix + uuid.uuid4().hex,
            created=int(time.time()),
            model=req.model,
        )
        options = _sampling_options(req, max_tokens, structured, choices)
        return Prepared(
            request_id,
            prompt_ids,
            options,
            req.stream,
            req.include_usage,
            fmt,
            reasoning=self._engine.reasoning,
            choices=choices,
        )

    def _demand(
        self, record: RequestRecord, tokens: int, priority: int, ttft_budget: float | None
    ) -> Demand:
        """The request as admission sees it. Built with no tokens right after the checks every
        request shares: what admission would refuse now whatever the prompt (past capacity, a
        budget already unattainable, a drain) is turned away before the prompt is rendered and
        tokenized, work the event loop then spares for the requests it serves at overload;
        ``respond`` builds it again with the prompt's tokens, and admission decides again."""
        demand = Demand(tokens, priority if self._priority_queue else 0)
        budget = ttft_budget if ttft_budget is not None else self._default_budget
        if budget is not None:
            # The budget counts from the request's arrival, as the client's clock does.
            demand.budget, demand.deadline = budget, record.arrival + budget
            record.ttft_budget = budget
        return demand

    # -- run ---------------------------------------------------------------------------------

    async def respond(self, p: Prepared, record: RequestRecord) -> Response:
        """Admit, start the engine, wait for its first delta, then stream or collect.

        ``p.ttft_budget`` (seconds, from ``x-slo-ttft-ms``; else the server's default) and
        ``p.priority`` go to admission and the engine.

        Waiting for the first delta before answering lets a request that fails to start get a
        real status (400, 503) instead of a 200 with an error frame; the first frame then goes
        out with the headers, so this costs no time to first token.
        """
        record.queued = time.perf_counter()
        if record.parsed is not None:
            self._admission.prepared(record.queued - record.parsed)
        tokens = len(p.prompt_ids) if p.choices is None else sum(map(len, p.choices.prompts))
        demand = self._demand(record, tokens, p.priority, p.ttft_budget)
        await self._admission.acquire(demand)
        record.admitted = time.perf_counter()
        if p.choices is None:
            stream = self._engine.generate(
                p.prompt_ids, p.options, p.request_id, p.turn, p.adapter, priority=p.priority
            )
        else:
            stream = generate_all(self._engine, p, p.choices)
        closed = False

        async def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            try:
                await stream.aclose()  # aborts the engine request if it is unfinished
            finally:
                self._admission.release(demand, *_decode_time(record))

        try:
            first = await anext(stream)
        except BaseException:
            await close()
            raise
        record.first_delta = time.perf_counter()
        self._admission.started(demand, first.num_cached_tokens)
        record.engine_times = first.engine_times
        if first.num_prompt_tokens is not None:
            record.prompt_tokens = first.num_prompt_tokens  # the engine's count is the truth
        if p.stream:
            frames = parsed_frames if p.parsed else plain_frames
            if p.choices is not None:
                frames = choice_frames
            return SSEResponse(frames(p, first, stream, record), close)
        try:
            collect = collect_parsed if p.parsed else collect_plain
            if p.choices is not None:
                collect = collect_choices
            body = await collect(p, first, stream, record)
        finally:
            await close()
        return Response(body, media_type="application/json")


def _empty_prompt(n: int, count: int) -> APIError:
    return invalid_request("The prompt is empty.", param="prompt" if count == 1 else f"prompt.{n}")


def _decode_time(record: RequestRecord) -> tuple[float | None, int]:
    """Seconds between the first and last token, and the gaps in them (what a decode step
    takes now, for admission's predictor)."""
    if record.first_token is None or record.last_token is None:
        return None, 0
    return record.last_token - record.first_token, len(record.gaps)


def _chat_chars(req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> int:
    """About how many characters the chat template writes: contents, tool-call arguments and
    the tools (their schemas as JSON)."""
    size = sum(len(m["content"] or "") for m in messages)
    size += sum(len(c.function.arguments) for m in req.messages for c in m.tool_calls or ())
    for tool in req.tools or ():
        fn = tool.function
        size += len(fn.name) + len(fn.description or "")
        if fn.parameters is not None:
            size += len(orjson.dumps(fn.parameters))
    return size


def _sampling_options(
    req: SamplingFields,
    max_tokens: int,
    structured: StructuredOutput | None,
    choices: Choices | None = None,
) -> SamplingOptions:
    """The request's sampling fields in the engine's neutral form."""
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        structured=structured,
        logit_bias=tuple((token_id(k), v) for k, v in (req.logit_bias or {}).items()),
        **features.sampling(req, choices),
    )
