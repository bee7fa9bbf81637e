"""SQL text helpers shared by both backends: identifier checks, literal rendering, parameter binding.

Why client-side binding: ClickHouse 18.16 (the server we must support) has no server-side query
parameters at all, and chDB's native ``params=`` binding parses each value in TSV-*escaped* form
(a value containing a newline or ``\\`` must itself be escaped, and arrays must already be written in
ClickHouse text syntax), i.e. it needs an escaping function anyway. So both backends bind parameters
through :func:`bind`, one function with one set of tests, and never build SQL from unchecked text.

Placeholders use ClickHouse's own syntax, ``{name:Type}``; each is replaced by
``CAST(<literal> AS Type)`` (or a back-quoted identifier for ``{name:Identifier}``). Placeholders are
only recognised in SQL code: text inside string literals, quoted identifiers and comments is left
alone, so a ``{x:String}`` inside a literal cannot turn a value into SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^{}]+)\}")
# A ClickHouse type name as written in a placeholder: Array(Nullable(String)), DateTime('UTC'), ...
_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\([A-Za-z0-9_, ()']*\))?\Z")

_STRING_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\0": "\\0",
    "\b": "\\b",
    "\f": "\\f",
}
_STRING_ESCAPE_TABLE = str.maketrans(_STRING_ESCAPES)


class BindError(ValueError):
    """A query parameter is missing, of an unsupported type, or a placeholder is malformed."""


def validate_identifier(name: str) -> str:
    """Return ``name`` if it is a plain ASCII identifier (letters, digits, ``_``), else raise ValueError."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def quote_identifier(name: str) -> str:
    """A validated identifier in back-quotes (safe for keywords such as ``partition``)."""
    return f"`{validate_identifier(name)}`"


def qualified(database: str, table: str) -> str:
    """``database.table`` with both parts validated and quoted."""
    return f"{quote_identifier(database)}.{quote_identifier(table)}"


def quote_string(value: str | bytes | bytearray | memoryview) -> str:
    """A ClickHouse string literal for ``value``, accepted identically by 18.16 and current versions.

    ``str`` is written as UTF-8 with ``\\``, ``'`` and control characters escaped; ``bytes`` may hold
    anything: every byte outside printable ASCII becomes ``\\xHH``.
    """
    if isinstance(value, str):
        return "'" + value.translate(_STRING_ESCAPE_TABLE) + "'"
    if isinstance(value, bytes | bytearray | memoryview):
        out = []
        for byte in bytes(value):
            char = chr(byte)
            if char in _STRING_ESCAPES:
                out.append(_STRING_ESCAPES[char])
            elif 0x20 <= byte < 0x7F:
                out.append(char)
            else:
                out.append(f"\\x{byte:02x}")
        return "'" + "".join(out) + "'"
    raise BindError(f"not a string: {type(value).__name__}")


def render_literal(value: Any) -> str:
    """A ClickHouse literal for a Python value.

    Supported: None, bool (1/0), int, float (incl. nan/inf), str, bytes, datetime (aware, or naive
    taken as UTC; rendered as integer epoch seconds), date ('YYYY-MM-DD'), and lists/tuples of these
    (rendered as arrays).
    """
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | bytes | bytearray | memoryview):
        return quote_string(value)
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return str(int(aware.timestamp()))
    if isinstance(value, date):
        return quote_string(value.isoformat())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render_literal(item) for item in value) + "]"
    raise BindError(f"unsupported query parameter type {type(value).__name__}")


def _render_placeholder(name: str, type_name: str, params: Mapping[str, Any]) -> str:
    type_name = type_name.strip()
    if not _TYPE.match(type_name) or type_name.count("(") != type_name.count(")"):
        raise BindError(f"malformed type {type_name!r} in placeholder {{{name}:{type_name}}}")
    if name not in params:
        raise BindError(f"query parameter {name!r} is not given")
    value = params[name]
    if type_name == "Identifier":
        if not isinstance(value, str):
            raise BindError(f"parameter {name!r} must be a string identifier")
        parts = value.split(".")
        if len(parts) > 2:
            raise BindError(f"parameter {name!r}: not an identifier: {value!r}")
        try:
            return ".".join(quote_identifier(part) for part in parts)
        except ValueError as exc:
            raise BindError(f"parameter {name!r}: {exc}") from None
    return f"CAST({render_literal(value)} AS {type_name})"


def bind(sql: str, params: Mapping[str, Any] | None) -> str:
    """Replace every ``{name:Type}`` placeholder in SQL code with the rendered parameter.

    String literals (``'...'`` with ``\\`` escapes or doubled quotes), quoted identifiers (backquotes,
    double quotes) and comments (``--``, ``#!``/``# ``, ``/* */``) are copied verbatim.
    """
    if not params and "{" not in sql:
        return sql
    params = params or {}
    out: list[str] = []
    i, n = 0, len(sql)
    code_start = 0

    def flush_code(end: int) -> None:
        chunk = sql[code_start:end]
        if chunk:
            out.append(_PLACEHOLDER.sub(lambda m: _render_placeholder(m.group(1), m.group(2), params), chunk))

    while i < n:
        ch = sql[i]
        if ch in "'`\"":
            flush_code(i)
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise BindError(f"unterminated quoted text starting at position {i}")
            out.append(sql[i : j + 1])
            i = j + 1
            code_start = i
        elif (ch == "-" and sql.startswith("--", i)) or (ch == "#" and sql.startswith(("#!", "# "), i)):
            flush_code(i)
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(sql[i:j])
            i = j
            code_start = i
        elif ch == "/" and sql.startswith("/*", i):
            flush_code(i)
            j = sql.find("*/", i + 2)
            if j < 0:
                raise BindError(f"unterminated comment starting at position {i}")
            out.append(sql[i : j + 2])
            i = j + 2
            code_start = i
        else:
            i += 1
    flush_code(n)
    return "".join(out)
