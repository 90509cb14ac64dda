"""The one interface between the HTTP layer and an inference engine.

The vLLM adapter (``vllm_engine.VllmEngine``) and the test fake (``fake.FakeEngine``) both satisfy
``Engine``. Nothing above this seam imports vLLM, so the HTTP layer can be tested in milliseconds
and an engine of another version can be slotted in behind it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Guided decoding: the answer is a JSON object, matching ``json_schema`` when one is given;
    or (vLLM's ``structured_outputs``) it matches ``regex``, is one of ``choice``, or is written
    in ``grammar`` (EBNF)."""

    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling settings in engine-neutral form; ``None`` means the engine's default."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    structured: StructuredOutput | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # The features below are served by a generation loop of their own (``detailed``): the plain
    # loop never looks at them.
    n: int = 1  # answers to the one prompt, each a ChoiceDelta ``index``
    logprobs: int | None = None  # alternatives per generated token (0: the chosen one only)
    prompt_logprobs: int | None = None  # likewise per prompt token (first delta only)
    detailed: bool = False  # yield ``ChoiceDelta``s: index, logprobs (set with any of the above)


@dataclass(frozen=True, slots=True)
class ChatConfig:
    """The operator's chat settings, with the meaning of vLLM's flags of the same names.

    ``chat_template`` is a file path or the template itself (None: the model's own);
    ``enable_auto_tool_choice`` with ``tool_call_parser`` reads tool calls out of free text;
    ``tool_parser_plugin`` is a file that registers more parsers.
    """

    chat_template: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    tool_parser_plugin: str | None = None


ToolChoice = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One chat request's tools and template inputs, in OpenAI's shapes (validated upstream).

    ``tools`` are ``{"type": "function", "function": {...}}`` objects. ``tool_choice`` "function"
    forces the call of ``tool_name``; "required" forces at least one call of any tool. A forced
    call is guided by the tool's schema, so its arguments always parse and match it.
    """

    config: ChatConfig
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: ToolChoice = "none"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    template_kwargs: Mapping[str, Any] | None = None
    include_reasoning: bool = True

    @property
    def calls_tools(self) -> bool:
        """The answer may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of one streamed tool call, in OpenAI's shape: a call's first fragment carries
    ``id`` and ``name``, later ones only more ``arguments`` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Adapter:
    """A LoRA adapter the engine applies to one request: a persona over the base model.

    ``name`` is the persona's public name (what a request's ``model`` says). ``id`` is the
    engine's key for the loaded weights and ``engine_name`` its name for them: a new load of a
    public name gets a new id *and* a new engine name, because vLLM tells adapters in a batch
    apart by name, and keys its prefix cache by it. A request in flight keeps the weights it
    started with while the public name moves on, and no request reuses KV blocks computed with
    an earlier load's weights.
    """

    name: str
    path: str
    id: int
    engine_name: str


@dataclass(slots=True)
class Delta:
    """What one engine step added to one request: new text, never the text so far.

    ``finish_reason`` is set on the last delta only: "stop", "length", "abort", or "tool_calls"
    (the answer called tools). An engine that fails the request raises ``EngineRequestError``
    instead of finishing it. ``num_prompt_tokens`` and ``num_cached_tokens`` (prompt tokens
    served from the prefix cache) are set on the first delta, and ``engine_times`` on it when the
    engine keeps them: when it queued the request, first scheduled it and made its first token,
    on the clock of ``time.perf_counter`` (the TTFT breakdown reads them).

    When the engine parses a chat answer (``Engine.parses``), ``text`` is what may be spoken and
    nothing else: thoughts go to ``reasoning``, tool calls to ``tool_calls``, and the last delta
    counts the reasoning tokens in ``num_reasoning_tokens``.
    """

    text: str
    num_tokens: int
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    engine_times: tuple[float, float, float] | None = None
    num_cached_tokens: int | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    num_reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    """One candidate token at one position: its id, text, log-probability and rank (1 is the
    likeliest; None where the engine does not rank it)."""

    token_id: int
    token: str
    logprob: float
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The log-probabilities at one position: the token there (``token_id``) and the candidates
    the engine reports, in the engine's order (the chosen token first, then by rank)."""

    token_id: int
    entries: tuple[LogprobEntry, ...]

    def chosen(self) -> LogprobEntry | None:
        return next((e for e in self.entries if e.token_id == self.token_id), None)


@dataclass(slots=True)
class ChoiceDelta(Delta):
    """A delta of a detailed request (``SamplingOptions.detailed``): which answer it belongs to
    (``index``, 0 to n-1), its tokens' ids and log-probabilities when asked for, and on the first
    delta the prompt's (``prompt_logprobs``: None at the first position, which has no context)."""

    index: int = 0
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class EngineError(Exception):
    """Base of the errors an engine reports to the HTTP layer."""


class EngineDeadError(EngineError):
    """The engine has died; no request can be served until the process restarts."""


class EngineRequestError(EngineError):
    """The engine failed one request and serves on (vLLM ends such a request with finish
    reason "error": a grammar that failed, a KV transfer that failed, an input it could not
    process). Never a normal finish: the client must see an error, and may retry."""


class EngineBusyError(EngineError):
    """The engine's own admission valve refused the request (vLLM's ``--max-num-queued-reqs`` or
    ``--max-num-queued-tokens``, set by the operator): it is at capacity, and the request never
    started. A refusal to retry shortly, or on another replica, like our own at capacity."""


class EngineInputError(EngineError):
    """The engine refused a request's input (for example a token outside the vocabulary).

    ``public`` says the message is written for the client (the engine's own validation), so
    it may be shown; otherwise the client gets a generic message. ``param`` names the field.
    """

    def __init__(self, message: str, *, param: str | None = None, public: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.public = public


class Engine(Protocol):
    """An inference engine as the HTTP layer sees it."""

    @property
    def max_model_len(self) -> int:
        """The context window in tokens: prompt plus generated tokens must fit in it."""
        ...

    @property
    def is_alive(self) -> bool:
        """False once the engine has died (liveness)."""
        ...

    @property
    def version(self) -> str:
        """The engine's version (vLLM's, for its ``/version`` route)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``0 <= id < vocab_size``."""
        ...

    @property
    def reasoning(self) -> bool:
        """A reasoning parser is configured: chat answers carry their thoughts apart."""
        ...

    @property
    def priority_scheduling(self) -> bool:
        """The engine orders its waiting requests by ``priority`` (vLLM's
        ``--scheduling-policy priority``); otherwise first come, first served."""
        ...

    @property
    def max_num_seqs(self) -> int | None:
        """Requests the engine runs in one batch at most (vLLM's ``--max-num-seqs``), if known."""
        ...

    @property
    def renderer_workers(self) -> int:
        """Threads that render and tokenize prompts off the event loop (vLLM's
        ``--renderer-num-workers``, 1 by default)."""
        ...

    def check_chat_config(self, config: ChatConfig) -> None:
        """Load what ``config`` names (template, parsers); ValueError if this engine cannot."""
        ...

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], turn: ChatTurn | None = None
    ) -> str:
        """Apply the chat template with a generation prompt; return the prompt text.

        Messages are OpenAI's (roles system, user, assistant with ``tool_calls``, tool with
        ``tool_call_id``; content a string or None). The turn's tools and template kwargs go to
        the template. A template that refuses the conversation raises ``EngineInputError``.
        """
        ...

    def parses(self, turn: ChatTurn) -> bool:
        """Whether ``generate`` splits this turn's answer into text, reasoning and tool calls.

        When it does not, a delta's ``text`` is the raw answer and nothing else is set.
        """
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenize a prompt. A rendered chat prompt already holds its special tokens."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of token ids (a prompt given as ids, echoed back)."""
        ...

    def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        turn: ChatTurn | None = None,
        adapter: Adapter | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one request. Closing the generator early aborts the request.

        ``adapter``: the persona to answer as (loaded with ``load_adapter``); None, the base.
        ``priority``: lower is served earlier, when ``priority_scheduling`` (ignored otherwise,
        as vLLM ignores it).

        ``turn`` is the chat request's tools and settings (None for a text completion): tool
        choices that force a call are guided by the tools' schemas, and the answer is parsed
        when ``parses(turn)``. A refused input raises ``EngineInputError`` before the first delta.
        """
        ...

    @property
    def max_adapter_rank(self) -> int | None:
        """The largest LoRA rank the engine holds; None when it serves no adapters."""
        ...

    async def load_adapter(self, adapter: Adapter) -> None:
        """Load an adapter's weights so requests may use it at once.

        A folder the engine cannot use (missing, unreadable, a rank above ``max_adapter_rank``,
        weights shaped for another model) raises ``EngineInputError`` with a public message;
        the engine keeps serving.
        """
        ...

    def num_unfinished_requests(self) -> int:
        """Requests the engine holds that have not finished (running or waiting inside it)."""
        ...

    def kv_cache_usage(self) -> float | None:
        """Fraction of the KV cache in use, 0..1, when the engine reports it."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and release its resources."""
        ...
