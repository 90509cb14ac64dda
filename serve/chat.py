"""A chat request's conversation and tools, checked and put in the engine's neutral form.

The request models (``serve.protocol``) check each field's shape; the rules here span fields or
positions: an assistant message may omit its content only when it calls tools, a tool message
answers a call made just before it, a named tool choice names a tool of the request, a schema is
a schema. Each refusal names the exact field (``messages.3.tool_call_id``), as OpenAI does.
Checking a schema costs milliseconds, so the checks are remembered (``serve.schemas``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve.engine.base import ChatConfig, ChatTurn, StructuredOutput, ToolChoice
from serve.errors import APIError, invalid_request
from serve.protocol import ChatCompletionRequest, ChatMessage
from serve.schemas import SchemaChecks

# Template variables the server sets itself; a request may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "chat_template", "tokenize", "documents"}
)


def engine_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as the engine takes it: OpenAI's message shapes, text parts joined."""
    out: list[dict[str, Any]] = []
    open_calls: set[str] = set()  # ids of the calls a tool message may answer now
    for i, m in enumerate(messages):
        content = m.text()
        if m.role == "tool":
            if m.tool_call_id is None:
                raise _missing(f"messages.{i}.tool_call_id")
            if m.tool_call_id not in open_calls:
                raise invalid_request(
                    f"A tool message must answer a call of the assistant message before it; "
                    f"no call has the id `{m.tool_call_id}`.",
                    f"messages.{i}.tool_call_id",
                    "invalid_value",
                )
        else:
            open_calls = set()
            if m.tool_call_id is not None:
                raise _only(f"messages.{i}.tool_call_id", "tool")
        if m.tool_calls and m.role != "assistant":
            raise _only(f"messages.{i}.tool_calls", "assistant")
        if content is None and not m.tool_calls:
            raise _missing(f"messages.{i}.content")
        message: dict[str, Any] = {
            # "developer" is OpenAI's newer name for "system".
            "role": "system" if m.role == "developer" else m.role,
            "content": content,
        }
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            open_calls = {call.id for call in m.tool_calls}
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def request_schemas(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The JSON Schemas that ``chat_turn`` and ``structured_output`` check."""
    schemas = [t.function.parameters for t in req.tools or () if t.function.parameters is not None]
    fmt = req.response_format
    schema = fmt.json_schema.schema_ if fmt is not None and fmt.json_schema is not None else None
    if fmt is not None and fmt.type == "json_schema" and schema is not None:
        schemas.append(schema)
    return schemas


def chat_turn(req: ChatCompletionRequest, config: ChatConfig, checks: SchemaChecks) -> ChatTurn:
    """The request's tools, tool choice and template inputs, checked."""
    tools = tuple(tool.model_dump(exclude_none=True) for tool in req.tools or ())
    names: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        fn = tool.function
        if fn.name in names:
            raise invalid_request(
                f"Tool names must be unique; `{fn.name}` is given twice.",
                f"tools.{i}.function.name",
                "invalid_value",
            )
        names.add(fn.name)
        if fn.parameters is not None:
            _check_schema(checks, fn.parameters, f"tools.{i}.function.parameters", object_root=True)
    choice, name = _tool_choice(req.tool_choice, names, config)
    return ChatTurn(
        config=config,
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        template_kwargs=_template_kwargs(req) or None,
        include_reasoning=req.include_reasoning,
    )


def structured_output(req: ChatCompletionRequest, checks: SchemaChecks) -> StructuredOutput | None:
    """``response_format`` as guided decoding (None for plain text)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput()
    if fmt.json_schema is None:
        raise _missing("response_format.json_schema")
    schema = fmt.json_schema.schema_
    if schema is None:  # OpenAI's schema is optional: then any JSON object will do
        return StructuredOutput()
    _check_schema(checks, schema, "response_format.json_schema.schema", object_root=False)
    return StructuredOutput(json_schema=schema)


def _tool_choice(
    raw: str | dict[str, Any] | None, names: set[str], config: ChatConfig
) -> tuple[ToolChoice, str | None]:
    if raw is None:  # OpenAI's default: auto when there are tools
        raw = "auto" if names else "none"
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise invalid_request(
                "`tool_choice` must be none, auto, required or "
                '{"type": "function", "function": {"name": ...}}.',
                "tool_choice",
                "invalid_value",
            )
        if raw == "none":
            return "none", None
        if not names:
            raise invalid_request(
                f"`tool_choice` {raw} needs `tools`.", "tool_choice", "invalid_value"
            )
        if raw == "auto" and not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise invalid_request(
                '`tool_choice` "auto" needs a server started with --enable-auto-tool-choice '
                'and --tool-call-parser; "required" or a named function work without them.',
                "tool_choice",
                "invalid_value",
            )
        return ("auto" if raw == "auto" else "required"), None
    if raw.get("type") != "function":
        raise invalid_request(
            '`tool_choice.type` must be "function".', "tool_choice.type", "invalid_value"
        )
    function = raw.get("function")
    if not isinstance(function, Mapping):
        raise _missing("tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str):
        raise _missing("tool_choice.function.name")
    if name not in names:
        raise invalid_request(
            f"`tool_choice` names the function `{name}`, which is not in `tools`.",
            "tool_choice.function.name",
            "invalid_value",
        )
    return "function", name


def _template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if req.reasoning_effort is not None:
        # vLLM's rule: an effort switches a template's thinking on, "none" off.
        kwargs["enable_thinking"] = req.reasoning_effort != "none"
    for key, value in (req.chat_template_kwargs or {}).items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise invalid_request(
                f"`{key}` is set by the server and cannot be a template kwarg.",
                f"chat_template_kwargs.{key}",
                "invalid_value",
            )
        kwargs[key] = value
    return kwargs


def _check_schema(
    checks: SchemaChecks, schema: dict[str, Any], param: str, *, object_root: bool
) -> None:
    reason = checks.check(schema)
    if reason is not None:
        raise invalid_request(f"Invalid JSON Schema: {reason}.", param, "invalid_value")
    if object_root and schema.get("type", "object") != "object":
        raise invalid_request(
            "Function parameters must be a JSON Schema of an object.", param, "invalid_value"
        )


def _missing(param: str) -> APIError:
    return invalid_request(
        f"Missing required parameter: `{param}`.", param, "missing_required_parameter"
    )


def _only(param: str, role: str) -> APIError:
    return invalid_request(
        f"`{param.rsplit('.', 1)[-1]}` belongs only to {role} messages.", param, "invalid_value"
    )
