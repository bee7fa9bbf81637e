"""The two expansions a panel's SQL goes through before ClickHouse sees it, as Grafana does them.

1. **Template variables** (Grafana's frontend, ``templateSrv.replace`` with the ClickHouse plugin's
   format function): ``$name``, ``${name}``, ``${name:format}``, ``[[name]]``. Without a format a
   single value is inserted raw and several values as ``'a','b'``; ``singlequote`` quotes each value
   (``'`` escaped as ``\\'``) and joins with commas; ``sqlstring`` doubles quotes; ``csv`` and ``raw``
   join with commas. Unknown names are left alone (so ``$__timeFilter`` passes through).
2. **The plugin's macros** (its backend, ``pkg/macros`` on top of sqlds), from the query's time range
   and interval: ``$__timeFilter(col)`` → ``col >= toDateTime(from) AND col <= toDateTime(to)``,
   ``$__fromTime`` / ``$__toTime`` → ``toDateTime(epoch)``, ``$__interval_s`` → whole seconds (>= 1),
   ``$__timeInterval(col)`` → ``toStartOfInterval(toDateTime(col), INTERVAL n second)``,
   ``$__dateFilter(col)``, ``$__dateTimeFilter(date, time)`` / ``$__dt``, and the ``_ms`` variants.

Note for panel authors: ``toStartOfInterval`` (which ``$__timeInterval`` expands to) does not exist in
ClickHouse 18.16, the oldest server probewatch supports; panels bucket time with
:data:`TIME_BUCKET` (``$__interval_s`` arithmetic), which every version runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

VariableValue = str | Sequence[str]


def time_bucket(column: str) -> str:
    """``column`` (a DateTime) rounded down to the panel interval, valid on ClickHouse 18.16 and later."""
    return f"toDateTime(intDiv(toUInt32({column}), $__interval_s) * $__interval_s)"


TIME_BUCKET = time_bucket("<column>")


class MacroError(ValueError):
    """A macro is unknown, has the wrong number of arguments, or is not closed."""


@dataclass(frozen=True)
class QueryContext:
    """What Grafana sends with a query: the time range, the interval, the variables' current values."""

    time_from: datetime
    time_to: datetime
    interval_s: float = 60.0
    variables: Mapping[str, VariableValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value in (self.time_from, self.time_to):
            if value.tzinfo is None:
                raise ValueError("QueryContext times must be timezone-aware")


# ------------------------------------------------------------------------------------ variables
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}",
)


def _plugin_format(values: list[str]) -> str:
    # The ClickHouse plugin's `format`: arrays → 'a','b' (no escaping), a single value as is.
    return "'" + "','".join(values) + "'" if len(values) > 1 else (values[0] if values else "")


def _format(values: list[str], fmt: str | None, multi: bool) -> str:
    if fmt is None:
        return _plugin_format(values) if multi else (values[0] if values else "")
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt in ("csv", "raw"):
        return ",".join(values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    raise MacroError(f"variable format {fmt!r} is not supported here")


def interpolate_variables(sql: str, variables: Mapping[str, VariableValue]) -> str:
    """Replace template variables the way Grafana's frontend does for the ClickHouse plugin."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name not in variables:
            return match.group(0)
        value = variables[name]
        multi = not isinstance(value, str)
        values = [value] if isinstance(value, str) else [str(v) for v in value]
        return _format(values, fmt, multi)

    return _VARIABLE.sub(replace, sql)


# ------------------------------------------------------------------------------------ macros
def _epoch(t: datetime) -> int:
    return int(t.timestamp() // 1)


def _epoch_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000 // 1)


def _date(t: datetime) -> str:
    return "toDate('" + t.astimezone(UTC).strftime("%Y-%m-%d") + "')"


def _seconds(ctx: QueryContext) -> int:
    return int(max(ctx.interval_s, 1.0))


def _args(name: str, args: list[str], count: int) -> list[str]:
    if len(args) != count:
        raise MacroError(f"$__{name}: expected {count} argument(s), received {len(args)}")
    return args


MacroFunc = Callable[[QueryContext, list[str]], str]


def _time_filter(c: QueryContext, a: list[str]) -> str:
    col = _args("timeFilter", a, 1)[0]
    return f"{col} >= toDateTime({_epoch(c.time_from)}) AND {col} <= toDateTime({_epoch(c.time_to)})"


def _time_filter_ms(c: QueryContext, a: list[str]) -> str:
    col = _args("timeFilter_ms", a, 1)[0]
    lo, hi = _epoch_ms(c.time_from), _epoch_ms(c.time_to)
    return f"{col} >= fromUnixTimestamp64Milli({lo}) AND {col} <= fromUnixTimestamp64Milli({hi})"


def _date_filter(c: QueryContext, a: list[str]) -> str:
    col = _args("dateFilter", a, 1)[0]
    return f"{col} >= {_date(c.time_from)} AND {col} <= {_date(c.time_to)}"


def _date_time_filter(c: QueryContext, a: list[str]) -> str:
    date_col, time_col = _args("dateTimeFilter", a, 2)
    return (
        f"({date_col} >= {_date(c.time_from)} AND {date_col} <= {_date(c.time_to)}) AND "
        f"({time_col} >= toDateTime({_epoch(c.time_from)}) AND {time_col} <= toDateTime({_epoch(c.time_to)}))"
    )


def _time_interval(c: QueryContext, a: list[str]) -> str:
    col = _args("timeInterval", a, 1)[0]
    return f"toStartOfInterval(toDateTime({col}), INTERVAL {_seconds(c)} second)"


def _time_interval_ms(c: QueryContext, a: list[str]) -> str:
    col = _args("timeInterval_ms", a, 1)[0]
    return f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL {int(max(c.interval_s * 1000, 1))} millisecond)"


MACROS: dict[str, MacroFunc] = {
    "fromTime": lambda c, a: f"toDateTime({_epoch(c.time_from)})",
    "toTime": lambda c, a: f"toDateTime({_epoch(c.time_to)})",
    "fromTime_ms": lambda c, a: f"fromUnixTimestamp64Milli({_epoch_ms(c.time_from)})",
    "toTime_ms": lambda c, a: f"fromUnixTimestamp64Milli({_epoch_ms(c.time_to)})",
    "timeFilter": _time_filter,
    "timeFilter_ms": _time_filter_ms,
    "dateFilter": _date_filter,
    "dateTimeFilter": _date_time_filter,
    "dt": _date_time_filter,
    "timeInterval": _time_interval,
    "timeInterval_ms": _time_interval_ms,
    "interval_s": lambda c, a: str(_seconds(c)),
}

_MACRO_NAME = re.compile(r"\$__(\w+)")


def _split_args(text: str) -> list[str]:
    """Split macro arguments on top-level commas (parentheses and quotes respected)."""
    out: list[str] = []
    depth, start, quote = 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    last = text[start:].strip()
    if last or out:
        out.append(last)
    return out


def expand_macros(sql: str, ctx: QueryContext) -> str:
    """Expand the plugin's ``$__`` macros (the backend step); unknown macros raise MacroError."""
    out: list[str] = []
    pos = 0
    for match in _MACRO_NAME.finditer(sql):
        if match.start() < pos:
            continue
        name = match.group(1)
        func = MACROS.get(name)
        if func is None:
            raise MacroError(f"unknown macro $__{name}")
        end = match.end()
        args: list[str] = []
        if end < len(sql) and sql[end] == "(":
            depth, i = 0, end
            while i < len(sql):
                if sql[i] == "(":
                    depth += 1
                elif sql[i] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if depth != 0:
                raise MacroError(f"$__{name}: unclosed parenthesis")
            args = _split_args(sql[end + 1 : i])
            end = i + 1
        out.append(sql[pos : match.start()])
        out.append(func(ctx, args))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def render(sql: str, ctx: QueryContext) -> str:
    """The SQL the plugin sends to ClickHouse for a panel query: variables first, then macros."""
    return expand_macros(interpolate_variables(sql, ctx.variables), ctx)
