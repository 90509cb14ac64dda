"""What a request's numbers may be, checked against the model before anything runs: prompt
token ids and ``logit_bias`` keys inside the vocabulary, and prompt plus ``max_tokens`` inside
the context window. Each refusal is a 400 naming the field (``serve.service`` calls these)."""

from __future__ import annotations

from collections.abc import Mapping

from serve.errors import APIError, invalid_request
from serve.protocol import ChatCompletionRequest, CompletionRequest

_MAX_KEYS_NAMED = 16  # bad logit_bias keys an error names one by one


def check_token_ids(ids: list[int], vocab: int) -> None:
    """Token ids are the client's to choose: checked here, not deep in the engine."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid_request(
            f"Token id {bad} is out of vocabulary: ids run from 0 to {vocab - 1}.",
            param="prompt",
            code="invalid_value",
        )


def check_logit_bias(bias: Mapping[str, float], vocab: int) -> None:
    """Keys are token ids in ASCII digits: ``str.isdigit`` also takes a superscript two
    (which ``int`` refuses), an Arabic-Indic three and a fullwidth one (which ``int`` reads
    as 3 and 1: silently another token)."""
    bad = [key for key in bias if not _is_token_id(key, vocab)]
    if not bad:
        return
    # ascii() shows what a key is made of ('\uff11', not a 1 that looks like one).
    named = ", ".join(_clip(ascii(key)) for key in bad[:_MAX_KEYS_NAMED])
    if len(bad) > _MAX_KEYS_NAMED:
        named += f" and {len(bad) - _MAX_KEYS_NAMED} more"
    raise invalid_request(
        f"`logit_bias` keys must be token ids written in ASCII digits, from 0 to {vocab - 1} "
        f"(the vocabulary has {vocab} tokens); these are not: {named}.",
        param="logit_bias",
        code="invalid_value",
    )


def token_id(key: str) -> int:
    """A checked ``logit_bias`` key as its id. Leading zeros go first: ``int`` refuses a string
    of more than 4300 digits, zeros included."""
    return int(key.lstrip("0") or "0")


def check_lengths(req: ChatCompletionRequest | CompletionRequest, window: int) -> None:
    """What ``fit_window`` would refuse whatever the prompt (it has a token at least), checked
    before the prompt is tokenized: such a request gets its 400 at capacity too."""
    requested = req.requested_max_tokens()
    if requested is None:
        return
    if requested >= window:
        raise invalid_request(
            f"This model's maximum context length is {window} tokens; {requested} were "
            "requested, which leaves no room for a prompt. Lower max_tokens.",
            param=_max_param(req),
            code="context_length_exceeded",
        )
    if req.min_tokens > requested:
        raise _min_tokens_over(req.min_tokens, requested)


def fit_window(
    req: ChatCompletionRequest | CompletionRequest, prompt_len: int, param: str, window: int
) -> int:
    """The tokens this request may generate: what it asked for, or the rest of the window."""
    if prompt_len >= window:
        raise invalid_request(
            f"This model's maximum context length is {window} tokens; the prompt has "
            f"{prompt_len}. Shorten the {param}.",
            param=param,
            code="context_length_exceeded",
        )
    requested = req.requested_max_tokens()
    if requested is not None and prompt_len + requested > window:
        raise invalid_request(
            f"This model's maximum context length is {window} tokens; the prompt has "
            f"{prompt_len} and {requested} more were requested. Lower max_tokens.",
            param=_max_param(req),
            code="context_length_exceeded",
        )
    max_tokens = requested if requested is not None else window - prompt_len
    if req.min_tokens > max_tokens:
        raise _min_tokens_over(req.min_tokens, max_tokens)
    return max_tokens


def _max_param(req: ChatCompletionRequest | CompletionRequest) -> str:
    chat_new = isinstance(req, ChatCompletionRequest) and req.max_completion_tokens
    return "max_completion_tokens" if chat_new else "max_tokens"


def _min_tokens_over(min_tokens: int, max_tokens: int) -> APIError:
    return invalid_request(
        f"`min_tokens` ({min_tokens}) must not exceed the tokens that may be generated "
        f"({max_tokens}).",
        param="min_tokens",
        code="invalid_value",
    )


def _is_token_id(key: str, vocab: int) -> bool:
    if not (key.isascii() and key.isdigit()):
        return False
    return len(key.lstrip("0")) <= len(str(vocab)) and token_id(key) < vocab


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
