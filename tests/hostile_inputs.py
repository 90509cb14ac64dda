"""Inputs that once got a 500 (or could), shared by the unit tests (fake engine) and the e2e
tests (the real vLLM engine): each must get a 4xx with the OpenAI error shape and ``param``.

The first five were found by the fuzz test and by hand (issue: a 500 for ``"prompt": []``,
out-of-vocabulary and negative token ids, ``min_tokens`` above ``max_tokens``).
"""

from __future__ import annotations

from typing import Any

MODEL_PLACEHOLDER = "{model}"


def _completion(prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL_PLACEHOLDER, "prompt": prompt, "max_tokens": 3, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_PLACEHOLDER,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    return {**body, **fields}


# (case id, path, body, expected status, expected param)
CASES: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    ("empty-token-list", "/v1/completions", _completion([]), 400, "prompt"),
    ("token-id-past-vocab", "/v1/completions", _completion([999_999_999]), 400, "prompt"),
    ("negative-token-id", "/v1/completions", _completion([5, -1]), 400, "prompt"),
    ("token-id-2**63", "/v1/completions", _completion([2**63]), 400, "prompt"),
    ("min-tokens-above-max", "/v1/chat/completions", _chat(min_tokens=10), 400, "min_tokens"),
    ("token-id-2**70", "/v1/completions", _completion([2**70]), 400, "prompt"),
    ("float-token-id", "/v1/completions", _completion([1.5]), 400, "prompt"),
    ("empty-string-prompt", "/v1/completions", _completion(""), 400, "prompt"),
    ("seed-2**70", "/v1/chat/completions", _chat(seed=2**70), 400, "seed"),
    ("seed--2**70", "/v1/chat/completions", _chat(seed=-(2**70)), 400, "seed"),
    ("max-tokens-2**70", "/v1/chat/completions", _chat(max_tokens=2**70), 400, "max_tokens"),
    ("temperature-1e308", "/v1/chat/completions", _chat(temperature=1e308), 400, "temperature"),
    (
        "stream-min-tokens",
        "/v1/chat/completions",
        _chat(stream=True, min_tokens=9),
        400,
        "min_tokens",
    ),
]


def body_for(body: dict[str, Any], model: str) -> dict[str, Any]:
    return {k: (model if v == MODEL_PLACEHOLDER else v) for k, v in body.items()}


def raw_cases() -> list[tuple[str, str, bytes, int]]:
    """Bodies JSON cannot express as Python values: NaN and infinities (not valid JSON)."""
    template = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}'
    return [
        (f"temperature-{lit}", "/v1/chat/completions", (template % ("{model}", lit)).encode(), 400)
        for lit in ("NaN", "Infinity", "-Infinity", "1e999")
    ]
