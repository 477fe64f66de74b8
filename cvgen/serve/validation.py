"""Pydantic validation errors as short phrases, for the config loader and the request model.

Pydantic reports "Input should be greater than or equal to 1"; cvgen says "must be >= 1", after
the name of the key or field, in one line (a config error) or one JSON ``detail`` (a request).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

UNKNOWN = frozenset({"extra_forbidden", "unexpected_keyword_argument"})
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "text",
    "list": "a list",
    "dict": "a mapping",
    "dataclass": "a mapping",
    "model": "a mapping",
}


def first_error(error: ValidationError) -> ErrorDetails:
    """The error to report: an unknown name first (a typo explains the rest), else the first."""
    errors = error.errors(include_url=False)
    unknown = [e for e in errors if e["type"] in UNKNOWN]
    return (unknown or errors)[0]


def phrase(error: ErrorDetails) -> str:
    """What is wrong, without the name: ``must be >= 1``, ``must be an integer``, ..."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in UNKNOWN:
        return "is not known"
    if kind == "missing":
        return "is required"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return f"must be {sign} {ctx[key]}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "finite_number":
        return "must be finite"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    for prefix, what in _KINDS.items():
        if kind.startswith(f"{prefix}_"):
            return f"must be {what}"
    message = error["msg"]  # our own PydanticCustomError messages, and anything else
    return message[:1].lower() + message[1:]


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a scalar input for a message ('' for containers: they can be huge)."""
    if not (isinstance(value, bool | int | float | str) or value is None):
        return ""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a very large number"
    return text if len(text) <= limit else text[: limit - 3] + "..."
