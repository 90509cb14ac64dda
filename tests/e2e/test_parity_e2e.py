"""Parity with vLLM's OpenAI server (issue 24) on the real CPU engine: what eval harnesses,
benchmark clients and SDK code written for `vllm serve` send, through the official SDK where it
has the field. Greedy decoding (temperature 0) makes answers comparable across requests."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from tests.support import MODEL, TEST_API_KEY, ServerProcess

MESSAGES = [{"role": "user", "content": "Tell me about the museum."}]
GREEDY = {"temperature": 0.0}


def sdk(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url + "/v1", api_key=TEST_API_KEY, max_retries=0)


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_API_KEY}"}


async def test_chat_logprobs_cover_the_answer(server: ServerProcess) -> None:
    reply = await sdk(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 8
    # the random model writes stray bytes: its text shows them as U+FFFD, its tokens as ""
    text = (choice.message.content or "").replace("\ufffd", "")
    assert "".join(t.token for t in content).replace("\ufffd", "") == text
    for token in content:
        assert token.logprob <= 0.0 and len(token.top_logprobs) == 3
        # greedy: the chosen token is the likeliest one
        assert token.top_logprobs[0].token == token.token
        assert math.isclose(token.top_logprobs[0].logprob, token.logprob, abs_tol=1e-4)
    # streamed: the same tokens, each chunk with its own
    stream = await sdk(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, stream=True, **GREEDY,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed = [
        t.token
        async for chunk in stream
        for t in (chunk.choices[0].logprobs.content or [] if chunk.choices[0].logprobs else [])
    ]
    assert streamed == [t.token for t in content]


async def test_completions_batch_n_and_logprobs(server: ServerProcess) -> None:
    client = sdk(server)
    prompts = ["The museum opens at", "Our guide today is"]
    alone = [
        (await client.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY))
        .choices[0]
        .text
        for p in prompts
    ]
    batch = await client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, logprobs=0, **GREEDY
    )
    # choice i answers prompt i, exactly as the prompt alone is answered
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == alone
    for choice in batch.choices:
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert len(choice.logprobs.tokens) == 6
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs or [])
    # n answers per prompt (sampled: vLLM refuses n > 1 with greedy decoding, and so do we)
    sampled = await client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, n=2, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert sampled.usage is not None and sampled.usage.completion_tokens == 4 * 6
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, **GREEDY)
    # token-id prompts, streamed: each choice's pieces add up to the same answers
    ids = [[1, 50, 60, 70], [1, 80, 90]]
    whole = await client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
    stream = await client.completions.create(
        model=MODEL, prompt=ids, max_tokens=5, stream=True, **GREEDY
    )
    texts = ["", ""]
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


async def test_echo_and_prompt_logprobs(server: ServerProcess) -> None:
    client = sdk(server)
    prompt = "Welcome to the museum"
    reply = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1, **GREEDY
    )
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert lp.token_logprobs[0] is None, "the first prompt token has no context"
    assert len(lp.tokens) == reply.usage.prompt_tokens + 4  # type: ignore[union-attr]
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        headers=_headers(),
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0},
        timeout=60,
    )
    body = r.json()
    prompt_lps = body["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == body["usage"]["prompt_tokens"]
    assert all(len(p) >= 1 for p in prompt_lps[1:])


async def test_truncation_usage_and_structured_outputs(server: ServerProcess) -> None:
    client = sdk(server)
    reply = await client.completions.create(
        model=MODEL, prompt="one two three four five six seven eight", max_tokens=2,
        extra_body={"truncate_prompt_tokens": 3},
    )  # fmt: skip
    assert reply.usage is not None and reply.usage.prompt_tokens == 3
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    used = [chunk.usage.completion_tokens async for chunk in stream if chunk.usage]
    assert used[-1] == 4 and used == sorted(used) and len(used) >= 4
    answer = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["open", "closed"]}},
    )  # fmt: skip
    assert answer.choices[0].message.content in ("open", "closed")
    answer = await client.completions.create(
        model=MODEL, prompt="Code:", max_tokens=6,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}"}},
    )  # fmt: skip
    assert len(answer.choices[0].text) == 3 and answer.choices[0].text.isdigit()


async def test_routes_model_version_load(server: ServerProcess) -> None:
    client = sdk(server)
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nobody-serves-this")
    version = httpx.get(server.base_url + "/version", timeout=10).json()["version"]
    assert version.startswith("0.32")
    load = httpx.get(server.base_url + "/load", timeout=10).json()
    assert isinstance(load["server_load"], int) and load["server_load"] >= 0


async def test_vllm_refusals_and_other_roles(server: ServerProcess) -> None:
    client = sdk(server)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, stream_options={"include_usage": True}
        )
    assert refused.value.body["param"] == "stream_options"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, seed=2**63
        )
    assert "-9223372036854775808 to 9223372036854775807" in str(refused.value)
    # a role OpenAI does not have reaches the template, which renders it (as vLLM's does)
    reply = await client.chat.completions.create(
        model=MODEL, max_tokens=2,
        messages=[{"role": "narrator", "content": "Night falls."}, *MESSAGES],  # type: ignore[list-item]
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
