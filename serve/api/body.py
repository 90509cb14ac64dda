"""Parse a JSON request body into a request model, with OpenAI-style errors for each way a body
can be wrong: wrong content type (415), bytes that are not UTF-8 JSON (400), JSON that is not an
object (400), a field of the wrong type or range (400, naming the field)."""

from __future__ import annotations

from typing import TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve.errors import APIError, invalid_request

ModelT = TypeVar("ModelT", bound=BaseModel)


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    return _parse(request.headers.get("content-type"), await request.body(), model)


def _parse(content_type: str | None, raw: bytes, model: type[ModelT]) -> ModelT:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    # A missing content type is accepted (many scripts omit it); one that says the body is
    # something else is refused.
    if media and media != "application/json" and not media.endswith("+json"):
        hint = ""
        if media == "application/x-www-form-urlencoded":
            hint = " (curl -d sends form encoding unless told otherwise)"
        raise APIError(
            415,
            f"The request body must be JSON: send `Content-Type: application/json`{hint}.",
            code="unsupported_media_type",
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request(
            "We could not parse the JSON body of your request: it must be valid UTF-8 JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc) from None


def _field_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # Drop pydantic's union branch labels ("str", "list[TextPart]") from the path.
    path = [p for p in loc if not (p[:1].islower() and ("[" in p or p in _TYPE_NAMES))]
    param = ".".join(path) or None
    if err["type"] == "missing":
        return invalid_request(
            f"Missing required parameter: `{param}`.", param, "missing_required_parameter"
        )
    # A validator's own message reads better without pydantic's "Value error, " prefix.
    message = err["msg"].removeprefix("Value error, ")
    return invalid_request(f"Invalid value for `{param}`: {message}.", param, "invalid_value")


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict"})
