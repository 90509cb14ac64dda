"""Client JSON that code below us walks recursively: its nesting bounded at the door, and its
JSON Schemas checked once per distinct schema.

Why a bound: jsonschema's check, the chat template's ``tojson``, vLLM's schema walks and
xgrammar's converters all recurse. A schema nested 100 levels deep raised ``RecursionError`` (a
500), and a chain of 20 000 ``$ref`` overflows xgrammar's C++ stack, which kills the process.
``MAX_DEPTH`` is the bound vLLM 0.32 puts on structured-output schemas itself (its
``MAX_STRUCTURED_OUTPUT_JSON_NESTING``; OpenAI allows 10 levels of schema nesting); checking a
schema that deep takes jsonschema about half of Python's recursion limit (8 frames a level).

Why a cache: checking a schema against its metaschema costs milliseconds on the event loop (about
1 ms for 2 properties, 4 ms for 10, more on a loaded machine), and agents resend the same tools
every turn. The cache is keyed by a digest of the schema's canonical JSON, so an entry's size
does not depend on the schema's, and it holds at most ``max_entries``: clients cannot grow it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from jsonschema import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for

MAX_DEPTH = 64  # objects and arrays inside one another
MAX_REFS = 128  # references in one schema: xgrammar follows a chain of them recursively
_REF_KEYS = frozenset({"$ref", "$dynamicRef", "$recursiveRef"})
_MAX_REASON = 300  # characters of a reason kept (a reason may quote the schema)
# A JSON text's strings (closed or not) and brackets: the brackets outside strings nest.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\[\s\S])*(?:"|$)|[\[\]{}]')


def nesting_error(value: Any, *, schema: bool = False) -> str | None:
    """Why ``value`` cannot be handed on (too deep; for a schema, too many references), or None.

    Iterative and stopping at the first level past the bound, so its cost is bounded too.
    """
    level = [value]
    refs = 0
    for depth in range(1, MAX_DEPTH + 1):
        deeper: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                if schema:
                    refs += sum(1 for key in node if key in _REF_KEYS)
                children: Iterable[Any] = node.values()
            elif isinstance(node, list):
                children = node
            else:
                continue
            deeper.extend(child for child in children if isinstance(child, (dict, list)))
        if not deeper:
            break
        if depth == MAX_DEPTH:
            return _too_deep()
        level = deeper
    if refs > MAX_REFS:
        return f"it holds {refs} references (`$ref`); this server accepts at most {MAX_REFS}"
    return None


def text_nesting_error(text: str) -> str | None:
    """``nesting_error`` of a JSON text, without parsing it (a parser could be the one that
    recurses): how deep its brackets outside strings nest, the most any parser descends."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the usual case, at C speed
        return None
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return _too_deep()
        elif token in ("]", "}"):
            depth = max(depth - 1, 0)
    return None


def _too_deep() -> str:
    return f"it nests objects and arrays deeper than this server accepts ({MAX_DEPTH} levels)"


class SchemaChecks:
    """Whether each JSON Schema is a valid schema, remembered for the last ``max_entries``
    distinct schemas (valid or not). Thread-safe: a check may run in a worker thread."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._known: OrderedDict[bytes, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._known)

    def check(self, schema: Mapping[str, Any]) -> str | None:
        """Why ``schema`` is not a valid JSON Schema, or None."""
        key = _key(schema)
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
        reason = _check(schema)  # outside the lock: other requests' lookups go on meanwhile
        with self._lock:
            self._known[key] = reason
            while len(self._known) > self._max:
                self._known.popitem(last=False)
        return reason

    def unchecked(self, schemas: Iterable[Mapping[str, Any]]) -> bool:
        """Whether any of ``schemas`` is not remembered: checking it costs milliseconds."""
        keys = [_key(schema) for schema in schemas]
        with self._lock:
            return any(key not in self._known for key in keys)


def _key(schema: Mapping[str, Any]) -> bytes:
    # Key order does not change a schema's meaning; the digest keeps every entry small.
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).digest()


def _check(schema: Mapping[str, Any]) -> str | None:
    try:
        _validator(schema).check_schema(schema)
    except SchemaError as exc:
        return _clip(exc.message)
    except RecursionError:  # a `pattern` whose groups nest hundreds deep, say
        return "a part of it (a subschema or a `pattern`) nests too deeply to check"
    except (ValueError, OverflowError) as exc:  # Python's regex compiler refusing a `pattern`
        return _clip(f"it cannot be checked: {exc}")
    return None


def _validator(schema: Mapping[str, Any]) -> Any:
    """The validator that ``$schema`` names; the latest draft for an unknown or malformed one
    (whose metaschema then says what is wrong with it), as vLLM and xgrammar ignore it."""
    if not isinstance(schema.get("$schema"), str):
        return Draft202012Validator
    try:
        return validator_for(schema, default=Draft202012Validator)
    except ValueError:  # a $schema URI that does not parse ("http://[")
        return Draft202012Validator


def _clip(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."
