"""Request models, validated once at the door; nothing on the per-token path validates again.

Unknown fields are ignored, as OpenAI's own server does, so clients written for other servers
work unchanged. Types are strict: ``"max_tokens": "5"`` is refused, not coerced. Fields that
agent frameworks send and that change nothing here (``metadata``, ``store``...) are accepted;
fields that would change the answer but are not implemented are declared ``Refused``, so a
request that sets them gets a 400 naming the field instead of a silently different answer.
Rules that span fields (a tool message answers an earlier call, a named tool exists) are the
service's (``serve.service``), which knows the positions to name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serve.schemas import nesting_error, text_nesting_error

NonNegInt = Annotated[int, Field(ge=0)]
# OpenAI's rule for function and schema names.
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# OpenAI's limit: each tool costs a schema check and prompt text.
MAX_TOOLS = 128
MAX_N = 128  # answers per prompt
MAX_PROMPTS = 256  # prompts in one completions request


def _refuse(value: Any) -> Any:
    # Unset-like values (null, false, 0, empty) ask for nothing, so they pass.
    if value is None or value is False or value == 0 or value == [] or value == {}:
        return value
    raise ValueError("this server does not support this field")


Refused = Annotated[Any, AfterValidator(_refuse)]

_INT64 = 2**63


def _int64(value: int) -> int:
    # The engine's random generator takes an int64: say the range, not only the bound crossed.
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"must be an integer from {-_INT64} to {_INT64 - 1}")
    return value


Int64 = Annotated[int, AfterValidator(_int64)]


# Client JSON that code below walks recursively (jsonschema, the chat template, vLLM, xgrammar):
# bounded here, so a value nested too deep is a 400 naming its field, not a RecursionError.
def _bounded(value: Any) -> Any:
    return _raise_if(nesting_error(value), value)


def _bounded_schema(value: Any) -> Any:
    return _raise_if(nesting_error(value, schema=True), value)


def _bounded_text(value: str) -> str:
    return _raise_if(text_nesting_error(value), value)


def _raise_if(reason: str | None, value: Any) -> Any:
    if reason is not None:
        raise ValueError(reason)
    return value


Schema = Annotated[dict[str, Any], AfterValidator(_bounded_schema)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    # JSON text, as OpenAI sends it; the engine parses it for the chat template.
    arguments: Annotated[str, AfterValidator(_bounded_text)]


class ToolCall(_Request):
    """A call an assistant made earlier in the conversation."""

    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"; it is rendered as "system". Other roles
    # go to the chat template as they are, as vLLM passes them (the template decides).
    role: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
    # Null only for an assistant message that holds tool_calls (checked by the service).
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: Name
    description: str | None = None
    parameters: Schema | None = None  # a JSON Schema of an object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchema(_Request):
    name: Name
    description: str | None = None
    schema_: Schema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None  # required with type json_schema (service)


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries the usage so far.
    continuous_usage_stats: bool = False


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one constraint on the answer."""

    json_: Schema | None = Field(None, alias="json")
    regex: Annotated[str, Field(min_length=1, max_length=65_536)] | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[str, Field(min_length=1, max_length=65_536)] | None = None
    json_object: bool | None = None
    structural_tag: Refused = None  # use tools: the tool-call parser writes the model's tags


class SamplingFields(_Request):
    """Fields shared by chat and text completions, OpenAI's and vLLM's extensions alike."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # int64, as the engine's random generator takes it.
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # Answers per prompt: vLLM's parallel sampling (one engine request, n children).
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    # Accepted and without effect here: they identify, store or bill, and change no answer.
    user: str | None = None
    # Implemented: a bias per token id (a string key, as JSON objects have), -100 to 100.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM's: log-probabilities of each prompt token (non-streaming only; -1: all).
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None = None
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context window holds).
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    # vLLM's guided decoding: regex, choice, grammar or JSON (or response_format on chat).
    structured_outputs: StructuredOutputs | None = None
    # Refused: each would change the answer, and this server does not implement it.
    best_of: Refused = None
    use_beam_search: Refused = None
    stop_token_ids: Refused = None
    bad_words: Refused = None
    allowed_token_ids: Refused = None
    include_stop_str_in_output: Refused = None
    guided_json: Refused = None
    guided_regex: Refused = None
    guided_choice: Refused = None
    guided_grammar: Refused = None
    # vLLM's extra sampling fields, so benchmark clients written for vLLM work unchanged.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False
    # vLLM's: lower is served earlier when the engine runs --scheduling-policy priority; ignored
    # otherwise, as vLLM ignores it. The X-Vllm-Priority header wins over it (vLLM's rule).
    priority: Int64 = 0

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's rule: usage on every chunk needs include_usage as well."""
        options = self.stream_options
        return bool(options and options.include_usage and options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}; its
    # shape is checked by the service, which can say which part is wrong.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Annotated[Any, AfterValidator(_bounded)]] | None = None
    # vLLM's: false leaves the thoughts out of the answer (a reasoning parser still splits them).
    include_reasoning: bool = True
    # As vLLM's server does: "none" renders the template with enable_thinking false, any other
    # effort with it true, unless chat_template_kwargs says otherwise.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    logprobs: bool = False
    # Alternatives per token, with logprobs (OpenAI's limit is 20; the engine's --max-logprobs
    # decides, 20 by default).
    top_logprobs: NonNegInt | None = None
    # Refused chat fields: each would change the answer.
    functions: Refused = None
    function_call: Refused = None
    audio: Refused = None
    prediction: Refused = None
    web_search_options: Refused = None
    chat_template: Refused = None
    documents: Refused = None
    continue_final_message: Refused = None
    echo: Refused = None
    verbosity: Refused = None
    modalities: list[Literal["text"]] | None = None
    add_generation_prompt: Literal[True] = True
    skip_special_tokens: Literal[True] = True

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens; the newer one wins.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # A string, token ids, or a batch of either: one choice per prompt (n per prompt).
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | list[int]
        | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: bool = False  # the prompt comes back before the answer
    logprobs: NonNegInt | None = None  # alternatives per token besides the chosen one

    def requested_max_tokens(self) -> int | None:
        # The legacy completions API defaults to 16 tokens when max_tokens is absent.
        return self.max_tokens if self.max_tokens is not None else 16


# A persona's name is what clients send as `model`, and a metrics label: printable, bounded.
AdapterName = Annotated[str, Field(pattern=r"^[^\s\x00-\x1f]{1,256}$")]


class LoadAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter``, vLLM's body: a persona's name and its adapter folder."""

    lora_name: AdapterName
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False  # replace a persona already loaded under this name


class UnloadAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter``, vLLM's body (its ``lora_int_id`` is ignored)."""

    lora_name: AdapterName
