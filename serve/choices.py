"""Requests with more than one answer, or with more than text in each: a batch of prompts, ``n``
answers per prompt, log-probabilities, the echoed prompt, usage on every chunk.

Such a request is ``Choices`` on its ``Prepared``; ``GenerationService.respond`` then starts it
with ``generate_all`` and ``serve.answers`` writes it with ``choice_frames`` or
``collect_choices``, chosen once per request. A request without these features never touches
this module: its per-token path is the plain one.

Choice ``i * n + j`` is the j-th answer to prompt i (OpenAI's and vLLM's numbering). Each prompt
is one engine request (id ``<request id>-<i>`` when there are several), whose n answers are
vLLM's parallel sampling (one request, n children).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve.engine.base import ChoiceDelta, Delta, Engine

if TYPE_CHECKING:
    from serve.answers import Prepared


@dataclass(slots=True)
class Choices:
    prompts: list[list[int]]  # one engine request each
    n: int = 1
    # Log-probability candidates to write per token: chat's top_logprobs, completions'
    # logprobs; None: no logprobs.
    logprobs: int | None = None
    prompt_logprobs: bool = False  # write vLLM's prompt_logprobs
    echo: tuple[str, ...] | None = None  # completions: each prompt's text, before its answers
    # With echo and logprobs: each prompt's first token's text (it has no logprob).
    echo_first: tuple[str, ...] = ()
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)

    @property
    def total(self) -> int:
        return len(self.prompts) * self.n


_DONE = object()


def generate_all(
    engine: Engine, p: Prepared, choices: Choices
) -> AsyncGenerator[ChoiceDelta, None]:
    """The deltas of every choice, as the engine makes them. Closing it aborts every request."""
    if len(choices.prompts) == 1:
        return _one(engine, p, choices.prompts[0])
    return _merged(engine, p, choices)


async def _one(engine: Engine, p: Prepared, ids: list[int]) -> AsyncGenerator[ChoiceDelta, None]:
    stream = engine.generate(ids, p.options, p.request_id, p.turn, p.adapter, p.priority)
    try:
        async for delta in stream:
            yield _checked(delta)
    finally:
        await stream.aclose()


async def _merged(
    engine: Engine, p: Prepared, choices: Choices
) -> AsyncGenerator[ChoiceDelta, None]:
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        stream = engine.generate(
            ids, p.options, f"{p.request_id}-{i}", p.turn, p.adapter, p.priority
        )
        try:
            async for delta in stream:
                choice = _checked(delta)
                choice.index += i * choices.n
                queue.put_nowait(choice)
            queue.put_nowait(_DONE)
        except Exception as exc:  # cancellation passes through: the merger is closing
            queue.put_nowait(exc)
        finally:
            await stream.aclose()  # aborts an unfinished engine request

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(choices.prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, ChoiceDelta)
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _checked(delta: Delta) -> ChoiceDelta:
    if not isinstance(delta, ChoiceDelta):  # an engine that ignored SamplingOptions.detailed
        raise TypeError("the engine did not report choices")
    return delta
