"""Parity with vLLM's OpenAI server (issue 24) on the fake engine: the HTTP shapes of batch
prompts, n, logprobs, echo, prompt_logprobs, usage per chunk, structured_outputs, the model,
version and load routes, and the refusals vLLM makes too."""

from __future__ import annotations

import json
from typing import Any

import httpx

from serve.engine.fake import WORDS, FakeEngine
from tests.unit.conftest import MODEL, chat_body


def _chunks(text: str) -> list[dict[str, Any]]:
    frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "a b c", "max_tokens": 3, **fields}


async def test_stream_options_without_stream_is_refused(client: httpx.AsyncClient) -> None:
    for path, body in (
        ("/v1/chat/completions", chat_body(stream_options={"include_usage": True})),
        ("/v1/completions", _completion(stream_options={"include_usage": True})),
    ):
        r = await client.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options"


async def test_a_batch_of_prompts_gets_one_choice_each(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post("/v1/completions", json=_completion(prompt=["a b", "c d e"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == "Hello there." for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 6
    assert sorted(ids for _, ids, _ in engine.seen) == [[1, 1], [1, 1, 1]]
    # token-id prompts, streamed: every choice ends, then the usage
    r = await client.post(
        "/v1/completions",
        json=_completion(prompt=[[1, 2], [3]], stream=True, stream_options={"include_usage": True}),
    )
    chunks = _chunks(r.text)
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "Hello there.", 1: "Hello there."}
    ends = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert ends.count("length") == 2
    assert chunks[-1]["usage"]["prompt_tokens"] == 3


async def test_batch_prompts_are_checked_one_by_one(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=_completion(prompt=[[1], []]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt.1", r.text
    r = await client.post("/v1/completions", json=_completion(prompt=[[1], [10**6]]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


async def test_completion_logprobs_zero_gives_the_chosen_token(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=_completion(logprobs=0))
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(WORDS[:3])
    assert lp["token_logprobs"] == [-0.1, -0.2, -0.3]
    chosen = zip(WORDS[:3], [-0.1, -0.2, -0.3], strict=True)
    assert lp["top_logprobs"] == [{w: v} for w, v in chosen]
    assert lp["text_offset"] == [0, 5, 11]
    r = await client.post("/v1/completions", json=_completion(logprobs=2))
    tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert [len(t) for t in tops] == [3, 3, 3]


async def test_chat_logprobs_and_top_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=2, logprobs=True, top_logprobs=2)
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["Hello", " there"]
    assert content[0]["bytes"] == list(b"Hello")
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hello", " there"]
    # streamed: each chunk carries its own tokens' logprobs
    r = await client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=2, logprobs=True, stream=True)
    )
    chunks = _chunks(r.text)
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks] == [
        "Hello",
        " there",
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_n_answers_each_with_its_index(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2, n=3))
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [
        "Hello there",
        " there.",
        ". How",
    ]
    assert body["usage"]["completion_tokens"] == 6
    r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2, n=2, stream=True))
    roles = [
        c["choices"][0]["index"] for c in _chunks(r.text) if "role" in c["choices"][0]["delta"]
    ]
    assert roles == [0, 1], "each choice opens with its role"
    # a batch of two prompts with n=2: choice i * n + j
    r = await client.post("/v1/completions", json=_completion(prompt=["a", "b c"], n=2))
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]


async def test_echo_puts_the_prompt_first(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=_completion(echo=True))
    assert r.json()["choices"][0]["text"] == "a b cHello there."
    r = await client.post("/v1/completions", json=_completion(echo=True, stream=True))
    assert _chunks(r.text)[0]["choices"][0]["text"] == "a b cHello"
    # with logprobs, the prompt's tokens come first, the first without a logprob
    r = await client.post("/v1/completions", json=_completion(echo=True, logprobs=0))
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][:3] == [None, -1.0, -1.0]
    assert lp["tokens"][3:] == list(WORDS[:3])
    assert lp["text_offset"][3] == len("a b c")


async def test_prompt_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(prompt_logprobs=0))
    prompt = r.json()["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == 3
    assert prompt[1] == {"2": {"logprob": -1.0, "rank": 1, "decoded_token": "t2"}}
    r = await client.post("/v1/completions", json=_completion(prompt_logprobs=1))
    assert r.json()["choices"][0]["prompt_logprobs"][0] is None
    r = await client.post("/v1/completions", json=_completion(prompt_logprobs=1, stream=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


async def test_continuous_usage_stats(client: httpx.AsyncClient) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    r = await client.post("/v1/completions", json=_completion(stream=True, stream_options=options))
    chunks = _chunks(r.text)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)


async def test_truncate_prompt_tokens_keeps_the_end(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(
        "/v1/completions", json=_completion(prompt="a bb ccc dddd", truncate_prompt_tokens=2)
    )
    assert r.json()["usage"]["prompt_tokens"] == 2
    assert engine.seen[-1][1] == [3, 4]
    r = await client.post("/v1/completions", json=_completion(truncate_prompt_tokens=10**6))
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


async def test_structured_outputs_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(
        "/v1/completions", json=_completion(structured_outputs={"choice": ["yes", "no"]})
    )
    assert r.status_code == 200
    assert engine.seen[-1][2].structured is not None
    assert engine.seen[-1][2].structured.choice == ("yes", "no")
    r = await client.post(
        "/v1/chat/completions",
        json=chat_body(structured_outputs={"regex": "a+"}, response_format={"type": "json_object"}),
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"


async def test_other_roles_reach_the_template(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [{"role": "narrator", "content": "dusk"}, {"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json=chat_body(messages=messages))
    assert r.status_code == 200
    assert engine.rendered[-1][0]["role"] == "narrator"


async def test_seed_out_of_range_names_the_range(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat_body(seed=2**63))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "seed"
    assert "-9223372036854775808 to 9223372036854775807" in error["message"]


async def test_model_version_and_load_routes(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/models/{MODEL}")
    card = r.json()
    assert card["id"] == MODEL and card["object"] == "model" and card["parent"] is None
    assert card["max_model_len"] == 256
    r = await client.get("/v1/models/nobody")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (await client.get("/version")).json() == {"version": "0.0.0+fake"}
    assert (await client.get("/load")).json() == {"server_load": 0}


async def test_plain_requests_keep_the_plain_path(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    await client.post("/v1/chat/completions", json=chat_body(stream=True))
    await client.post("/v1/completions", json=_completion(prompt=["one prompt"]))
    assert [options.detailed for _, _, options in engine.seen] == [False, False]
