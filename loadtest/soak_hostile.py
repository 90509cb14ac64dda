"""The hostile requests of the soak: each must be refused with its own 4xx and OpenAI's error body.

A case is a name, the one status it must get, and a few seeded variants of the same mistake.
Bodies are raw bytes, so that what JSON cannot say (``NaN``, a truncated object, bytes that are
not UTF-8) can be sent as well.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# How the headers of a request are made (see ``headers_for``).
HEADERS_OK = "ok"
HEADER_MODES = {
    HEADERS_OK: None,
    "no_auth": None,
    "wrong_key": "Bearer soak-wrong-key",
    "basic_auth": "Basic c29hazpzb2Fr",
    "empty_bearer": "Bearer ",
}


def headers_for(
    mode: str, api_key: str | None, content_type: str = "application/json"
) -> dict[str, str]:
    """Request headers for ``mode``; ``content_type`` overrides the JSON content type."""
    headers = {"Content-Type": content_type}
    if mode == HEADERS_OK:
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
    elif HEADER_MODES[mode] is not None:
        headers["Authorization"] = str(HEADER_MODES[mode])
    return headers


@dataclass(frozen=True)
class Variant:
    path: str
    body: bytes
    header_mode: str = HEADERS_OK
    content_type: str = "application/json"


@dataclass(frozen=True)
class HostileCase:
    name: str
    expected: int
    variants: tuple[Variant, ...]
    needs_api_key: bool = False  # an open server accepts any Authorization header

    def pick(self, rng: random.Random) -> Variant:
        return rng.choice(self.variants)


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}


def _js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _chat_with(served: str, **fields: Any) -> bytes:
    return _js({**_chat(served), **fields})


def _completion_with(served: str, **fields: Any) -> bytes:
    return _js({"model": served, "prompt": "Hello", "max_tokens": 4, **fields})


def _raw_chat(model: str, field: str, raw: str) -> bytes:
    """A chat body with ``field`` set to ``raw`` text that JSON has no word for (NaN)."""
    base = json.dumps(_chat(model))[:-1]
    return f'{base}, "{field}": {raw}}}'.encode()


def hostile_cases(model: str, api_key: str | None) -> list[HostileCase]:
    """Every hostile case that applies: the auth cases only when the server wants a key."""
    chat, cmpl = CHAT_PATH, COMPLETIONS_PATH
    ok_body = _js(_chat(model))
    cases = [
        HostileCase(
            "malformed_json",
            400,
            (
                Variant(chat, b'{"model": "' + model.encode() + b'", "messages": ['),
                Variant(chat, b'{"model": "' + model.encode() + b'",}'),
                Variant(chat, b""),
                Variant(chat, b"\xff\xfe{}"),
                Variant(cmpl, _completion_with(model) + b" trailing"),
            ),
        ),
        HostileCase(
            "wrong_type",
            400,
            (
                Variant(chat, _chat_with(model, max_tokens="5")),
                Variant(chat, _chat_with(model, messages="Hello!")),
                Variant(chat, _chat_with(model, temperature="hot")),
                Variant(chat, _chat_with(model, stream="yes")),
                Variant(chat, _chat_with(model, messages=[{"role": 1, "content": "hi"}])),
                Variant(cmpl, _completion_with(model, prompt={"text": "hi"})),
                Variant(cmpl, _completion_with(model, model=123)),
            ),
        ),
        HostileCase(
            "nan",
            400,
            (
                Variant(chat, _raw_chat(model, "temperature", "NaN")),
                Variant(chat, _raw_chat(model, "top_p", "Infinity")),
                Variant(chat, _raw_chat(model, "max_tokens", "NaN")),
                Variant(chat, _raw_chat(model, "seed", "-Infinity")),
            ),
        ),
        HostileCase(
            "huge_seed",
            400,
            tuple(
                Variant(chat, _chat_with(model, seed=seed))
                for seed in (2**63, 2**64, 10**30, -(2**70))
            ),
        ),
        HostileCase(
            "token_out_of_range",
            400,
            tuple(
                Variant(cmpl, _completion_with(model, prompt=ids))
                for ids in ([1, 10**9], [-1], [2**31], [5, 2**40, 7])
            ),
        ),
        HostileCase(
            "empty_prompt",
            400,
            (
                Variant(cmpl, _completion_with(model, prompt=[])),
                Variant(cmpl, _completion_with(model, prompt="")),
            ),
        ),
        HostileCase(
            "not_an_object",
            400,
            tuple(Variant(chat, body) for body in (b"[1, 2]", b'"hi"', b"null", b"42")),
        ),
        HostileCase(
            "bad_params",
            400,
            (
                Variant(chat, _chat_with(model, n=0)),
                Variant(chat, _chat_with(model, stop=[""])),
                Variant(chat, _chat_with(model, messages=[])),
                Variant(chat, _chat_with(model, max_tokens=0)),
                Variant(chat, _chat_with(model, max_tokens=10**8)),
                Variant(chat, _chat_with(model, temperature=5.0)),
                Variant(chat, _chat_with(model, max_tokens=2, min_tokens=10)),
                Variant(chat, _chat_with(model, echo=True)),  # completions only
                Variant(cmpl, _completion_with(model, best_of=2)),  # not in vLLM 0.32
            ),
        ),
        HostileCase("unknown_model", 404, (Variant(chat, _chat_with(model, model="no-such")),)),
        HostileCase(
            "bad_content_type",
            415,
            (
                Variant(chat, ok_body, content_type="text/plain"),
                Variant(chat, ok_body, content_type="application/x-www-form-urlencoded"),
            ),
        ),
        HostileCase(
            "bad_auth",
            401,
            tuple(
                Variant(chat, ok_body, header_mode=mode)
                for mode in ("no_auth", "wrong_key", "basic_auth", "empty_bearer")
            ),
            needs_api_key=True,
        ),
    ]
    return [c for c in cases if api_key or not c.needs_api_key]


def has_error_shape(body: bytes) -> bool:
    """True for OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    err = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(err, dict)
        and {"message", "type", "param", "code"} <= err.keys()
        and isinstance(err["message"], str)
        and bool(err["message"])
    )
