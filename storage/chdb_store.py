"""The embedded backend: chDB (a current ClickHouse engine in-process), persisted to a directory.

Inserts go through chDB's streaming inserter (``send_insert``) as ``JSONCompactEachRow`` encoded by
msgspec — measured fastest (5,000 session-score rows: msgspec encode ~15 ms + send_insert ~50 ms, vs
~100-160 ms for the same JSON inlined into ``query()``, and ~140-210 ms to build RowBinary in Python;
``benchmarks/bench_storage.py`` measures the whole write_batch). JSON cannot carry arbitrary bytes,
so tables with a ``binary`` column (``detector_state.blob``) are inserted as ``RowBinary`` instead;
JSON has no NaN/Inf either, so non-finite floats are sent as the strings ``"nan"``/``"inf"``/``"-inf"``
(which ClickHouse parses into Float columns). Results are read as ``JSONCompactEachRowWithNamesAndTypes``
and converted by column type to the values clickhouse-driver returns for the server backend.

chDB holds one data directory per process: opening a second path while a session on another path is
open fails (StorageUnavailable); several stores on the same path share it.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import re
import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import msgspec

from probewatch.config import StorageConfig
from storage.base import BaseStore, Result, first_line, parse_version
from storage.models import StorageError, StorageUnavailable
from storage.rows import Row
from storage.schema import ServerVersion, Table
from storage.sql import qualified, quote_identifier

# Per-session output settings that make the JSON result exact and parseable.
_SESSION_SETTINGS = (
    "output_format_json_quote_64bit_integers = 0",
    "output_format_json_quote_denormals = 1",
    "output_format_json_validate_utf8 = 1",
    "date_time_output_format = 'unix_timestamp'",
    "input_format_null_as_default = 1",
)

Converter = Callable[[Any], Any]


# ---------------------------------------------------------------------------------------------------
# Result conversion: ClickHouse type name -> converter of the JSON value


def _split_args(inner: str) -> list[str]:
    """Split ``A, B(C, D), E`` at top-level commas."""
    parts: list[str] = []
    depth = 0
    start = 0
    quoted = False
    for i, ch in enumerate(inner):
        if ch == "'" and (i == 0 or inner[i - 1] != "\\"):
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return [p for p in parts if p]


_ELEMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s+(\S.*)\Z")


def _strip_element_name(arg: str) -> str:
    """``a UInt8`` (a named tuple element) -> ``UInt8``."""
    match = _ELEMENT_NAME.match(arg)
    return match.group(1) if match else arg


def _identity(value: Any) -> Any:
    return value


def _to_int(value: Any) -> Any:
    return None if value is None else int(value)


def _to_float(value: Any) -> Any:
    return None if value is None else float(value)


_F32 = struct.Struct("<f")


def _to_float32(value: Any) -> Any:
    # ClickHouse prints the shortest decimal that reads back as the same Float32 ("0.1"); return the
    # Float32 value itself widened to a double, as clickhouse-driver does (0.10000000149011612).
    return None if value is None else _F32.unpack(_F32.pack(float(value)))[0]


def _to_datetime(value: Any) -> Any:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


def _to_date(value: Any) -> Any:
    return None if value is None else date.fromisoformat(str(value))


def _to_decimal(value: Any) -> Any:
    return None if value is None else Decimal(str(value))


def _to_uuid(value: Any) -> Any:
    return None if value is None else uuid.UUID(str(value))


@lru_cache(maxsize=512)
def converter_for(type_name: str) -> Converter:
    """The converter from a JSON-decoded value of ClickHouse type ``type_name`` to a Python value."""
    t = type_name.strip()
    head, _, rest = t.partition("(")
    inner = rest[:-1] if rest.endswith(")") else ""
    if head in ("Nullable", "LowCardinality", "SimpleAggregateFunction"):
        args = _split_args(inner)
        return converter_for(args[-1]) if args else _identity
    if head == "Array":
        item = converter_for(inner)
        return lambda v: None if v is None else [item(x) for x in v]
    if head == "Tuple":
        items = [converter_for(_strip_element_name(a)) for a in _split_args(inner)]

        def conv_tuple(v: Any) -> Any:
            if v is None:
                return None
            values = list(v.values()) if isinstance(v, dict) else v
            return tuple(conv(x) for conv, x in zip(items, values, strict=False))

        return conv_tuple
    if head == "Map":
        args = _split_args(inner)
        key: Converter = _identity
        val: Converter = _identity
        if len(args) == 2:
            key, val = converter_for(args[0]), converter_for(args[1])
        return lambda v: None if v is None else {key(k): val(x) for k, x in v.items()}
    if head.startswith(("Int", "UInt")):
        return _to_int
    if head == "Float32":
        return _to_float32
    if head.startswith(("Float", "BFloat")):
        return _to_float
    if head.startswith("DateTime"):
        return _to_datetime
    if head in ("Date", "Date32"):
        return _to_date
    if head.startswith("Decimal"):
        return _to_decimal
    if head == "UUID":
        return _to_uuid
    if head == "Bool":
        return lambda v: None if v is None else bool(v)
    return _identity


# ---------------------------------------------------------------------------------------------------
# Insert encoding


def _is_float_type(type_name: str) -> bool:
    t = type_name
    while t.startswith(("Nullable(", "Array(")):
        t = t[t.index("(") + 1 : -1]
    return t.startswith("Float")


def _json_safe_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return [_json_safe_float(v) for v in value]
    return value


def json_compact_rows(table: Table, rows: Sequence[Row], encoder: msgspec.json.Encoder) -> bytes:
    """``JSONCompactEachRow`` payload for ``rows``; non-finite floats become "nan"/"inf"/"-inf"."""
    buf = bytearray()
    for row in rows:
        encoder.encode_into(row, buf, -1)
        buf += b"\n"
    # msgspec writes NaN/Inf as null; a null is otherwise only a Nullable column's None (or "null"
    # inside a string), so only then pay for a pass over the float columns.
    if b"null" in buf:
        float_idx = [i for i, c in enumerate(table.insert_columns) if _is_float_type(c.type)]
        if float_idx:
            buf = bytearray()
            for row in rows:
                fixed = list(row)
                for i in float_idx:
                    fixed[i] = _json_safe_float(fixed[i])
                encoder.encode_into(fixed, buf, -1)
                buf += b"\n"
    return bytes(buf)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FIXED = {
    "UInt8": "<B",
    "UInt16": "<H",
    "UInt32": "<I",
    "UInt64": "<Q",
    "Int8": "<b",
    "Int16": "<h",
    "Int32": "<i",
    "Int64": "<q",
    "Float32": "<f",
    "Float64": "<d",
    "DateTime": "<I",
}

Encoder = Callable[[Any, bytearray], None]


@lru_cache(maxsize=128)
def rowbinary_encoder(type_name: str) -> Encoder:
    """RowBinary encoder for the types probewatch stores (String, ints, floats, DateTime, Nullable, Array)."""
    if type_name in _FIXED:
        pack = struct.Struct(_FIXED[type_name]).pack
        return lambda v, out: out.extend(pack(v))
    if type_name == "String":

        def enc_string(v: Any, out: bytearray) -> None:
            data = v.encode("utf-8") if isinstance(v, str) else bytes(v)
            n = len(data)
            if n < 0x80:
                out.append(n)
            else:
                out += _varint(n)
            out += data

        return enc_string
    if type_name.startswith("Nullable(") and type_name.endswith(")"):
        inner = rowbinary_encoder(type_name[9:-1])

        def enc_nullable(v: Any, out: bytearray) -> None:
            if v is None:
                out.append(1)
            else:
                out.append(0)
                inner(v, out)

        return enc_nullable
    if type_name.startswith("Array(") and type_name.endswith(")"):
        item = rowbinary_encoder(type_name[6:-1])

        def enc_array(v: Any, out: bytearray) -> None:
            out += _varint(len(v))
            for x in v:
                item(x, out)

        return enc_array
    raise StorageError(f"no RowBinary encoder for {type_name}")


RowEncoder = Callable[[Row, bytearray], None]


@lru_cache(maxsize=64)
def _row_encoder(types: tuple[str, ...]) -> RowEncoder:
    """One row's RowBinary encoder: consecutive fixed-width columns are packed by one struct call."""
    steps: list[RowEncoder] = []
    i = 0
    while i < len(types):
        j = i
        while j < len(types) and types[j] in _FIXED:
            j += 1
        if j > i:
            packer = struct.Struct("<" + "".join(_FIXED[t][1:] for t in types[i:j])).pack
            if j - i == 1:
                index = i
                steps.append(lambda row, out, p=packer, k=index: out.extend(p(row[k])))  # type: ignore[misc]
            else:
                getter = operator.itemgetter(*range(i, j))
                steps.append(lambda row, out, p=packer, g=getter: out.extend(p(*g(row))))  # type: ignore[misc]
            i = j
        else:
            encode = rowbinary_encoder(types[i])
            steps.append(lambda row, out, e=encode, k=i: e(row[k], out))  # type: ignore[misc]
            i += 1

    def encode_row(row: Row, out: bytearray) -> None:
        for step in steps:
            step(row, out)

    return encode_row


def rowbinary_rows(table: Table, rows: Sequence[Row]) -> bytes:
    """``RowBinary`` payload for ``rows`` (tuples in ``table.insert_names`` order)."""
    types = tuple(c.type for c in table.insert_columns)
    encode_row = _row_encoder(types)
    out = bytearray()
    for row in rows:
        if len(row) != len(types):
            raise StorageError(f"{table.name}: row has {len(row)} values, expected {len(types)}")
        encode_row(row, out)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------


class ChdbStore(BaseStore):
    """chDB backend; ``storage.chdb.path`` is the data directory (created if missing)."""

    backend = "chdb"

    def __init__(self, config: StorageConfig, *, ip_hash_key: bytes | None = None) -> None:
        super().__init__(config, ip_hash_key=ip_hash_key)
        try:
            from chdb import session as chdb_session
        except ImportError as exc:  # pragma: no cover - chdb is a dependency
            raise StorageUnavailable("the chdb backend needs the `chdb` package (pip install chdb)") from exc
        self.path = os.path.abspath(config.chdb.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            session_class: Any = chdb_session.Session  # chdb's API is untyped
            self._session: Any = session_class(self.path)
        except Exception as exc:
            raise StorageUnavailable(
                f"cannot open chDB data directory {self.path}: {first_line(exc)} "
                "(chDB serves one data directory per process)"
            ) from exc
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()
        for setting in _SESSION_SETTINGS:
            self._execute(f"SET {setting}")

    def _execute(self, sql: str) -> Result:
        try:
            result = self._session.query(sql, "JSONCompactEachRowWithNamesAndTypes")
        except Exception as exc:
            raise StorageError(f"chDB query failed: {first_line(exc)}") from exc
        data = result.bytes() if result is not None else b""
        if not data.strip():
            return [], [], []
        try:
            lines = self._decoder.decode(b"[" + b",".join(data.strip().split(b"\n")) + b"]")
        except msgspec.DecodeError as exc:
            raise StorageError(f"cannot parse chDB result (is there a FORMAT clause?): {exc}") from exc
        names = [str(n) for n in lines[0]]
        types = [str(t) for t in lines[1]] if len(lines) > 1 else ["String"] * len(names)
        converters = [converter_for(t) for t in types]
        rows = [tuple(conv(v) for conv, v in zip(converters, line, strict=True)) for line in lines[2:]]
        return names, types, rows

    def _insert_rows(self, table: Table, rows: Sequence[Row]) -> None:
        columns = ", ".join(quote_identifier(n) for n in table.insert_names)
        if any(c.binary for c in table.insert_columns):
            fmt, payload = "RowBinary", rowbinary_rows(table, rows)
        else:
            fmt, payload = "JSONCompactEachRow", json_compact_rows(table, rows, self._encoder)
        try:
            target = qualified(self.database, table.name)
            inserter = self._session.send_insert(f"INSERT INTO {target} ({columns})", fmt)
        except Exception as exc:
            raise StorageError(f"chDB insert into {table.name} failed: {first_line(exc)}") from exc
        try:
            inserter.append(payload)
            inserter.finish()
        except Exception as exc:
            with contextlib.suppress(Exception):  # the insert already failed; report that error
                inserter.cancel()
            raise StorageError(f"chDB insert into {table.name} failed: {first_line(exc)}") from exc

    def _fetch_server_version(self) -> ServerVersion:
        _, _, rows = self._execute("SELECT version()")
        return parse_version(str(rows[0][0]))

    def _close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self._session.close()
