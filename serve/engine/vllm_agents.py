"""vLLM's own machinery for agent-style chat, behind the engine seam: chat templates with tools,
tool-call and reasoning parsers (``vllm.parser``, ``vllm.tool_parsers``, ``vllm.reasoning``) and
guided decoding (structured outputs). Nothing here is hand-written parsing: each request gets one
of vLLM's ``Parser`` objects, and its ``parse_delta`` output is turned into engine-neutral deltas.

Used by ``vllm_engine`` (and by the fake engine in tests, so that scripted answers are parsed by
the very parsers the server runs). Only chat requests whose answer must be parsed come here:
``ChatSupport.parses`` says which; every other request keeps the plain per-token path.

A forced tool call (``tool_choice`` "required" or a named function) is always guided by the
tools' schemas: with a parser that has a structural tag (``hermes``: the call is written in the
model's own ``<tool_call>`` format) every argument schema is pinned, which vLLM's default leaves
free for tools without ``strict``; with any other parser, or none, the answer is the JSON that
vLLM's generic forced-call schema describes, parsed by vLLM's generic forced-call readers.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.parser import ParserManager
from vllm.parser.abstract_parser import DelegatingParser, Parser
from vllm.reasoning import ReasoningParser, ReasoningParserManager
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers import ToolParser, ToolParserManager

from serve.engine.base import (
    ChatConfig,
    ChatTurn,
    Delta,
    EngineInputError,
    SamplingOptions,
    StructuredOutput,
    ToolCallDelta,
)

# The GPU kit's vLLM (0.26.0) keeps load_chat_template in entrypoints and has no tool strict
# levels (its forced calls are always guided by the tools' full schema); 0.32.0 moved the one
# and added the other. Both are read here so that one adapter serves both releases.
try:
    from vllm.renderers.chat_utils import load_chat_template
except ImportError:  # vLLM 0.26.0
    from vllm.entrypoints.chat_utils import load_chat_template  # type: ignore[no-redef]
try:
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevel
except ImportError:  # vLLM 0.26.0
    ToolStrictLevel = None  # type: ignore[assignment,misc]
_STRICT_LEVELS = "tool_strict_level" in inspect.signature(ParserManager.get_parser).parameters


@dataclass(frozen=True, slots=True)
class _Parsers:
    """What one ``ChatConfig`` resolves to (once per process)."""

    template: str | None
    auto: type[Parser] | None  # free answers: tool_choice auto or none, reasoning
    forced: type[Parser] | None  # tool_choice required or named


class ChatSupport:
    """Templates and parsers of one model; shared by every request, holds no request state."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        model_config: Any = None,
        reasoning_parser: str | None = None,
        reasoning_parser_plugin: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._model_config = model_config
        self._model_name = str(getattr(model_config, "model", "") or "")
        if reasoning_parser_plugin:
            ReasoningParserManager.import_reasoning_parser(reasoning_parser_plugin)
        self._reasoning_name = reasoning_parser or None
        self._reasoning_cls: type[ReasoningParser] | None = None
        if self._reasoning_name:
            reasoning_cls = ParserManager.get_reasoning_parser(self._reasoning_name)
            assert reasoning_cls is not None
            reasoning_cls(tokenizer)  # fails now if the tokenizer lacks its markers
            self._reasoning_cls = reasoning_cls
        self._resolved: dict[ChatConfig, _Parsers] = {}
        self._lock = threading.Lock()  # templates may be rendered in worker threads

    @property
    def reasoning(self) -> bool:
        return self._reasoning_cls is not None

    def parses(self, turn: ChatTurn) -> bool:
        return self._reasoning_cls is not None or turn.calls_tools

    def check(self, config: ChatConfig) -> None:
        try:
            self._parsers(config)
        except (KeyError, TypeError, OSError, RuntimeError, ImportError) as exc:
            raise ValueError(str(exc)) from exc
        except VLLMValidationError as exc:  # a template path that cannot be read
            raise ValueError(str(exc)) from exc

    def _parsers(self, config: ChatConfig) -> _Parsers:
        found = self._resolved.get(config)
        if found is not None:
            return found
        with self._lock:
            if config not in self._resolved:
                self._resolved[config] = self._resolve(config)
            return self._resolved[config]

    def _resolve(self, config: ChatConfig) -> _Parsers:
        template = load_chat_template(config.chat_template) if config.chat_template else None
        if config.tool_parser_plugin:
            ToolParserManager.import_tool_parser(config.tool_parser_plugin)
        # The parser reads auto answers (the service allows "auto" only with
        # --enable-auto-tool-choice) and, given alone, still writes forced calls in its format.
        tool_name = config.tool_call_parser or None

        def composed(strict: str) -> type[Parser] | None:
            newer: dict[str, Any] = {}
            if _STRICT_LEVELS:  # vLLM 0.26.0 takes neither argument
                newer = {"tool_strict_level": strict, "tokenizer": self._tokenizer}
            return ParserManager.get_parser(
                tool_parser_name=tool_name,
                reasoning_parser_name=self._reasoning_name,
                enable_auto_tools=tool_name is not None,
                model_name=self._model_name,
                **newer,
            )

        auto = composed("auto")
        tool_cls = auto.tool_parser_cls if auto is not None else None
        if tool_cls is not None and (
            tool_cls.structural_tag_model is not None or tool_cls.supports_required_and_named
        ):
            # The parser guides forced calls itself; "parameter" pins every argument schema.
            forced = composed("parameter")
        else:
            forced = _json_forced_parser(self._reasoning_cls)
        return _Parsers(template, auto, forced)

    # -- render ------------------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping[str, Any]], turn: ChatTurn | None) -> str:
        kwargs: dict[str, Any] = {}
        template = None
        if turn is not None:
            template = self._parsers(turn.config).template
            if turn.template_kwargs:
                kwargs.update(turn.template_kwargs)
            if turn.tools:
                kwargs["tools"] = [dict(tool) for tool in turn.tools]
        try:
            return str(
                self._tokenizer.apply_chat_template(
                    [_template_message(m) for m in messages],
                    chat_template=template,
                    add_generation_prompt=True,
                    tokenize=False,
                    **kwargs,
                )
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
            raise EngineInputError(
                f"The chat template cannot render these messages: {exc}",
                param="messages",
                public=True,
            ) from exc

    # -- one request -------------------------------------------------------------------------

    def start(self, turn: ChatTurn, options: SamplingOptions, prompt_ids: list[int]) -> TurnParser:
        """The parser of one answer, with the guided decoding and detokenizer settings it needs."""
        parsers = self._parsers(turn.config)
        forced = turn.tool_choice in ("required", "function")
        cls = parsers.forced if forced else parsers.auto
        no_tool_parser = cls is None or cls.tool_parser_cls is None
        if turn.tool_choice == "auto" and turn.tools and no_tool_parser:
            raise EngineInputError(
                '"auto" tool choice needs --enable-auto-tool-choice and --tool-call-parser.',
                param="tool_choice",
                public=True,
            )
        assert cls is not None  # parses(turn) holds: a reasoning parser, or tools to call
        try:
            request = _vllm_request(turn, options.structured)
            parser = cls(
                self._tokenizer,
                list(request.tools or []) or None,
                model_config=self._model_config,
                chat_template_kwargs=dict(turn.template_kwargs or {}),
            )
            # vLLM's server adjusts the request only in these cases (online_renderer): the
            # adjustment is where forced calls get their grammar.
            if parser.reasoning_parser is not None or request.tool_choice != "none":
                adjusted = parser.adjust_request(request)
                assert isinstance(adjusted, ChatCompletionRequest)
                request = adjusted
            structured = request.extract_structured_outputs()
        except VLLMValidationError as exc:
            raise EngineInputError(str(exc), param=exc.parameter or "tools", public=True) from exc
        except (ValidationError, ValueError) as exc:
            raise EngineInputError(str(exc), param="tools", public=True) from exc
        return TurnParser(
            parser,
            request,
            prompt_ids,
            structured=structured,
            skip_special_tokens=bool(request.skip_special_tokens),
            reasoning_ended=_reasoning_ended(request, parser, prompt_ids),
            named=turn.tool_choice == "function",
            single_call=not turn.parallel_tool_calls,
        )


class TurnParser:
    """One answer's parser state: vLLM's ``Parser`` fed delta by delta."""

    __slots__ = (
        "_finished_reasons",
        "_named",
        "_parser",
        "_prompt_ids",
        "_request",
        "_single_call",
        "_token_ids",
        "_tools_streamed",
        "reasoning_ended",
        "skip_special_tokens",
        "structured",
    )

    def __init__(
        self,
        parser: Parser,
        request: ChatCompletionRequest,
        prompt_ids: list[int],
        *,
        structured: StructuredOutputsParams | None,
        skip_special_tokens: bool,
        reasoning_ended: bool | None,
        named: bool,
        single_call: bool,
    ) -> None:
        self._parser = parser
        self._request = request
        self._prompt_ids = prompt_ids
        self._named = named
        self._single_call = single_call
        self._tools_streamed = False
        self._token_ids: list[int] = []
        self.structured = structured
        self.skip_special_tokens = skip_special_tokens
        self.reasoning_ended = reasoning_ended

    def feed(self, text: str, token_ids: Sequence[int], finish_reason: str | None) -> Delta:
        """The engine-neutral delta of one engine step (``num_tokens`` counts every token)."""
        ids = list(token_ids)
        self._token_ids.extend(ids)
        finished = finish_reason is not None
        message = self._parser.parse_delta(
            delta_text=text,
            delta_token_ids=ids,
            request=self._request,
            prompt_token_ids=self._prompt_ids,
            finished=finished,
        )
        delta = Delta("", len(ids))
        if message is not None:
            delta.text = message.content or ""
            delta.reasoning = message.reasoning or ""
            if message.tool_calls:
                delta.tool_calls = self._calls(message.tool_calls)
                self._tools_streamed = self._tools_streamed or bool(delta.tool_calls)
        if finished:
            # OpenAI's rule: "tool_calls" when the answer called tools, except for a named
            # tool choice, which finishes with "stop".
            if finish_reason == "stop" and self._tools_streamed and not self._named:
                finish_reason = "tool_calls"
            delta.finish_reason = finish_reason
            delta.num_reasoning_tokens = _reasoning_tokens(self._parser, self._token_ids)
        return delta

    def _calls(self, calls: Sequence[Any]) -> tuple[ToolCallDelta, ...]:
        """vLLM's tool-call deltas in OpenAI's shape: a call opens with a fragment of its id and
        name alone; its arguments follow in fragments of their own. Some clients read only the
        first entry of a chunk, so the frames written from these carry one entry each."""
        out: list[ToolCallDelta] = []
        for call in calls:
            if self._single_call and call.index > 0:
                continue  # parallel_tool_calls false: one call only, as vLLM's server filters
            function = call.function
            name = function.name if function is not None else None
            arguments = (function.arguments or "") if function is not None else ""
            if call.id is not None or name:
                out.append(ToolCallDelta(call.index, call.id, name))
            if arguments:
                out.append(ToolCallDelta(call.index, arguments=arguments))
        return tuple(out)


def _json_forced_parser(reasoning_cls: type[ReasoningParser] | None) -> type[Parser]:
    """Forced calls without a parser that guides them: vLLM's generic forced-call JSON (a named
    call's arguments object, or a "required" array of ``{"name", "parameters"}``), guided by a
    schema built from the tools and read by vLLM's generic forced-call readers."""

    class _JsonForcedParser(DelegatingParser):
        reasoning_parser_cls = reasoning_cls
        tool_parser_cls = ToolParser  # the base class: its adjust_request sets that schema

    if ToolStrictLevel is not None:
        _JsonForcedParser.tool_strict_level = ToolStrictLevel.PARAMETER
    return _JsonForcedParser


def _reasoning_tokens(parser: Parser, token_ids: list[int]) -> int:
    """The answer's reasoning tokens, as vLLM's parser counts them (vLLM 0.26.0's ``Parser``
    has no count of its own: its reasoning parser counts)."""
    count = getattr(parser, "count_reasoning_tokens", None)
    if count is None:
        reasoning = parser.reasoning_parser
        count = reasoning.count_reasoning_tokens if reasoning is not None else None
    return int(count(token_ids)) if count is not None else 0


def _reasoning_ended(
    request: ChatCompletionRequest, parser: Parser, prompt_ids: list[int]
) -> bool | None:
    """The engine's ``reasoning_ended`` as vLLM's chat server decides it (True: guided decoding
    applies from the first token; None: the engine reads the prompt with its own parser)."""
    resolve = getattr(request, "resolve_reasoning_ended", None)
    if resolve is not None:
        return resolve(parser, prompt_ids)
    # vLLM 0.26.0 decides it inline in its chat server, alike.
    if not request.include_reasoning or getattr(request, "_grammar_from_tool_parser", False):
        return True
    if parser.reasoning_parser is not None:
        return bool(parser.is_reasoning_end(prompt_ids))
    return None


def guidable(schema: Any) -> Any:
    """A schema as guided decoding gets it, with xgrammar 0.2.8's gap closed: a string with
    minLength/maxLength is compiled to "any character but quote, backslash and newline", so a
    guided answer could hold a raw control character (seen: U+0007), which strict JSON parsers
    refuse, and after which vLLM's hermes parser streams the call's closing brace as arguments.
    Such a string becomes a pattern of the same lengths over printable characters (quote and
    backslash left out, so no escapes are needed). The model still sees the tool's own schema."""
    if isinstance(schema, list):
        return [guidable(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: guidable(value) for key, value in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    free = not any(key in out for key in ("pattern", "enum", "const", "format"))
    if out.get("type") == "string" and bounded and free:
        low = int(out.pop("minLength", 0))
        high = out.pop("maxLength", None)
        out["pattern"] = f'^[^\\u0000-\\u001f"\\\\]{{{low},{"" if high is None else int(high)}}}$'
    return out


def _vllm_request(turn: ChatTurn, structured: StructuredOutput | None) -> ChatCompletionRequest:
    """vLLM's request object, which its parsers read (tools, choice, response format); its
    schemas are the ``guidable`` ones, since vLLM builds the forced-call grammar from them."""
    choice: Any = turn.tool_choice
    if turn.tool_choice == "function":
        choice = {"type": "function", "function": {"name": turn.tool_name}}
    response_format: dict[str, Any] | None = None
    guided: dict[str, Any] | None = None  # vLLM's structured_outputs: regex, choice, grammar
    if structured is not None and (structured.regex or structured.choice or structured.grammar):
        guided = {
            "regex": structured.regex,
            "choice": list(structured.choice) if structured.choice else None,
            "grammar": structured.grammar,
        }
    elif structured is not None:
        if structured.json_schema is None:
            response_format = {"type": "json_object"}
        else:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": guidable(structured.json_schema)},
            }
    return ChatCompletionRequest.model_validate(
        {
            "model": "",
            "messages": [{"role": "user", "content": ""}],
            "tools": [guidable(tool) for tool in turn.tools] or None,
            "tool_choice": choice if turn.tools else None,
            "parallel_tool_calls": turn.parallel_tool_calls,
            "response_format": response_format,
            "structured_outputs": guided,
            "include_reasoning": turn.include_reasoning,
            "chat_template_kwargs": dict(turn.template_kwargs or {}) or None,
        }
    )


def structured_outputs(structured: StructuredOutput) -> StructuredOutputsParams:
    """Guided decoding of a plain answer (no parser involved)."""
    if structured.regex is not None:
        return StructuredOutputsParams(regex=structured.regex)
    if structured.choice is not None:
        return StructuredOutputsParams(choice=list(structured.choice))
    if structured.grammar is not None:
        return StructuredOutputsParams(grammar=structured.grammar)
    if structured.json_schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=guidable(structured.json_schema))


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it: tool-call arguments as objects, as vLLM's server
    passes them (arguments that do not parse become ``{}``: they live in the history, and
    refusing them would make every later turn of the conversation fail)."""
    out = dict(message)
    if out.get("content") is None:
        out["content"] = ""
    calls = out.get("tool_calls")
    if calls:
        converted = []
        for call in calls:
            function = dict(call["function"])
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                arguments = {}
            function["arguments"] = arguments if isinstance(arguments, dict) else {}
            converted.append({**call, "function": function})
        out["tool_calls"] = converted
    return out
