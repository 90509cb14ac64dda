"""vLLM's request features beyond the plain answer: checked here, at the door, and turned into
``Choices`` (several answers, logprobs, echo, usage per chunk) and sampling options.

vLLM's own rules where it has them (``vllm/entrypoints/openai/*/protocol.py``):
``stream_options`` needs ``stream``; ``top_logprobs`` needs ``logprobs``; ``prompt_logprobs`` is
not streamed; ``structured_outputs`` is one constraint, and not beside ``response_format``;
``continuous_usage_stats`` needs ``include_usage``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve.choices import Choices
from serve.engine.base import Engine, StructuredOutput
from serve.errors import invalid_request
from serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from serve.schemas import SchemaChecks


def check(req: SamplingFields) -> None:
    """Rules across fields, before any work."""
    if req.stream_options is not None and not req.stream:
        raise invalid_request(
            "`stream_options` can only be set when `stream` is true.", param="stream_options"
        )
    if req.prompt_logprobs is not None and req.stream and req.prompt_logprobs != 0:
        raise invalid_request(
            "`prompt_logprobs` are not available when `stream` is true.",
            param="prompt_logprobs",
        )
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        raise invalid_request("`top_logprobs` needs `logprobs` set to true.", param="top_logprobs")


def logprobs(req: SamplingFields) -> int | None:
    """Candidates per generated token to ask of the engine; None: no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    assert isinstance(req, CompletionRequest)
    return req.logprobs


def plan(
    req: SamplingFields,
    prompts: list[list[int]],
    *,
    parsed: bool = False,
    echo: Sequence[str] | None = None,
    echo_first: Sequence[str] = (),
) -> Choices | None:
    """The request's ``Choices``, or None when it is a plain answer (the plain path)."""
    top = logprobs(req)
    continuous = req.stream and req.continuous_usage
    if (
        len(prompts) == 1
        and req.n == 1
        and top is None
        and req.prompt_logprobs is None
        and echo is None
        and not continuous
    ):
        return None
    if parsed:
        # Tools to call, or thoughts apart: the parsers read one answer's text.
        raise invalid_request(
            "`n` > 1, `logprobs`, `prompt_logprobs` and `continuous_usage_stats` are not "
            "supported on answers parsed for tools or reasoning.",
            param=_first_set(req),
        )
    return Choices(
        prompts,
        n=req.n,
        logprobs=top,
        prompt_logprobs=req.prompt_logprobs is not None,
        echo=tuple(echo) if echo is not None else None,
        echo_first=tuple(echo_first),
        continuous_usage=continuous,
    )


def sampling(req: SamplingFields, choices: Choices | None) -> dict[str, Any]:
    """The ``SamplingOptions`` fields of the detailed path (none for a plain answer)."""
    if choices is None:
        return {}
    prompt = req.prompt_logprobs
    if prompt is None and choices.echo is not None and choices.logprobs is not None:
        prompt = choices.logprobs  # echo with logprobs: the prompt's come back too (vLLM's)
    return {
        "n": choices.n,
        "logprobs": choices.logprobs,
        "prompt_logprobs": prompt,
        "detailed": True,
    }


def truncate(ids: list[int], keep: int | None, window: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: the window)."""
    if keep is None:
        return ids
    if keep == -1:
        keep = window
    if keep > window:
        raise invalid_request(
            f"`truncate_prompt_tokens` ({keep}) must not exceed the context window ({window}).",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    return ids[-keep:] if keep else []


def structured(
    req: SamplingFields, checks: SchemaChecks, response_format: StructuredOutput | None
) -> StructuredOutput | None:
    """vLLM's ``structured_outputs`` as guided decoding, else ``response_format``'s."""
    so = req.structured_outputs
    if so is None:
        return response_format
    if response_format is not None:
        raise invalid_request(
            "Set `structured_outputs` or `response_format`, not both.",
            param="structured_outputs",
        )
    given = [
        name
        for name, value in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object or None),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise invalid_request(
            "`structured_outputs` takes exactly one of `json`, `regex`, `choice`, `grammar`, "
            f"`json_object`; got {len(given)}.",
            param="structured_outputs",
        )
    if so.json_ is not None:
        reason = checks.check(so.json_)
        if reason is not None:
            raise invalid_request(
                f"Invalid JSON Schema: {reason}.", "structured_outputs.json", "invalid_value"
            )
        return StructuredOutput(json_schema=so.json_)
    if so.choice is not None:
        return StructuredOutput(choice=tuple(so.choice))
    if so.regex is not None or so.grammar is not None:
        return StructuredOutput(regex=so.regex, grammar=so.grammar)
    return StructuredOutput()


def prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completions prompt as a batch: each a string or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(t, int) for t in prompt):  # an empty list too: an empty prompt
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def echo(
    engine: Engine,
    req: CompletionRequest,
    given: list[str | list[int]],
    encoded: list[list[int]],
    ids: list[list[int]],
) -> tuple[list[str] | None, list[str]]:
    """With ``echo``, each prompt as the engine saw it (a string as sent; token ids, or a
    truncated prompt, decoded), and with logprobs too each prompt's first token's text."""
    if not req.echo:
        return None, []
    texts = [
        prompt if isinstance(prompt, str) and kept is whole else engine.decode(kept)
        for prompt, whole, kept in zip(given, encoded, ids, strict=True)
    ]
    first = [engine.decode(kept[:1]) for kept in ids] if req.logprobs is not None else []
    return texts, first


def _first_set(req: SamplingFields) -> str:
    if req.n != 1:
        return "n"
    if logprobs(req) is not None:
        return "logprobs"
    if req.prompt_logprobs is not None:
        return "prompt_logprobs"
    return "stream_options.continuous_usage_stats"
