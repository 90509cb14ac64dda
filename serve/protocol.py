"""Request models, validated once at the door; nothing on the per-token path validates again.

Unknown fields are ignored, as OpenAI's own server does, so clients written for other servers
work unchanged. Types are strict: ``"max_tokens": "5"`` is refused, not coerced.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegInt = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"; it is rendered as "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by chat and text completions, OpenAI's and vLLM's extensions alike."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # int64, as the engine's random generator takes it.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    n: Annotated[int, Field(ge=1)] = 1
    user: str | None = None
    # vLLM's extra sampling fields, so benchmark clients written for vLLM work unchanged.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens; the newer one wins.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # A string, a one-string list, or token ids, as OpenAI's legacy completions accept.
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | list[int]
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        # The legacy completions API defaults to 16 tokens when max_tokens is absent.
        return self.max_tokens if self.max_tokens is not None else 16
