"""vLLM's outputs of a detailed request (``SamplingOptions.detailed``): n answers to one prompt,
the log-probabilities of the tokens generated and of the prompt's, as vLLM's sampler and output
processor compute them (``SamplingParams.n``, ``logprobs``, ``prompt_logprobs``).

A loop of its own: a request without these features never runs it, so the plain loop of
``vllm_engine`` keeps its per-token work. With n > 1 vLLM runs one child request per answer
and each DELTA output carries one child's ``CompletionOutput`` (its ``index``), finished on its
own ``finish_reason``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any

from serve.engine.base import ChoiceDelta, EngineRequestError, LogprobEntry, TokenLogprobs


async def detailed(
    stream: AsyncGenerator[Any, None],
    request_id: str,
    tokenizer: Any,
    engine_times: Callable[[Any], tuple[float, float, float] | None],
) -> AsyncGenerator[ChoiceDelta, None]:
    first = True
    async for out in stream:
        for completion in out.outputs:
            reason = completion.finish_reason
            if reason == "error":
                raise EngineRequestError(f"the engine failed request {request_id}")
            ids = tuple(completion.token_ids)
            delta = ChoiceDelta(completion.text, len(ids), reason, index=completion.index)
            delta.token_ids = ids
            if completion.logprobs is not None:
                delta.logprobs = tuple(
                    _position(token_id, step, tokenizer)
                    for token_id, step in zip(ids, completion.logprobs, strict=False)
                )
            if first:
                prompt = out.prompt_token_ids or ()
                delta.num_prompt_tokens = len(prompt)
                delta.num_cached_tokens = out.num_cached_tokens
                delta.engine_times = engine_times(out.metrics)
                if out.prompt_logprobs is not None:
                    delta.prompt_logprobs = tuple(
                        None if step is None else _position(token_id, step, tokenizer)
                        for token_id, step in zip(prompt, out.prompt_logprobs, strict=False)
                    )
                first = False
            yield delta


def _position(token_id: int, step: Mapping[int, Any], tokenizer: Any) -> TokenLogprobs:
    return TokenLogprobs(token_id, tuple(_entries(step.items(), tokenizer)))


def _entries(items: Iterable[tuple[int, Any]], tokenizer: Any) -> Iterable[LogprobEntry]:
    for token_id, lp in items:
        text = lp.decoded_token
        if text is None:
            text = tokenizer.decode([token_id])
        yield LogprobEntry(int(token_id), str(text), float(lp.logprob), lp.rank)
