"""The one interface between the HTTP layer and an inference engine.

The vLLM adapter (``vllm_engine.VllmEngine``) and the test fake (``fake.FakeEngine``) both satisfy
``Engine``. Nothing above this seam imports vLLM, so the HTTP layer can be tested in milliseconds
and an engine of another version can be slotted in behind it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol


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


@dataclass(slots=True)
class Delta:
    """What one engine step added to one request: new text, never the text so far.

    ``finish_reason`` is set on the last delta only: "stop", "length" or "abort".
    ``num_prompt_tokens`` is set on the first delta, and ``engine_times`` on it when the engine
    keeps them: when it queued the request, first scheduled it and made its first token, on the
    clock of ``time.perf_counter`` (the TTFT breakdown reads them).
    """

    text: str
    num_tokens: int
    finish_reason: str | None = None
    num_prompt_tokens: int | None = None
    engine_times: tuple[float, float, float] | None = None


class EngineError(Exception):
    """Base of the errors an engine reports to the HTTP layer."""


class EngineDeadError(EngineError):
    """The engine has died; no request can be served until the process restarts."""


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
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``0 <= id < vocab_size``."""
        ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """Apply the model's chat template with a generation prompt; return the prompt text."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenize a prompt. A rendered chat prompt already holds its special tokens."""
        ...

    def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Stream deltas for one request. Closing the generator early aborts the request."""
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
