"""Run every panel's queries against a real ClickHouse, as Grafana would, and check their shape.

``probewatch dashboards check`` uses this to prove the dashboards work on *your* ClickHouse (any
version from 18.16 on, or the embedded chDB): variables are resolved by running their own queries,
each panel query is expanded (:func:`dashboards.macros.render`) and run, and the result is checked
against what its panel type needs (a ``time`` DateTime column plus numbers for a time series, a
category column for a bar chart, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from dashboards.macros import QueryContext, VariableValue, render
from dashboards.model import Dashboard, Panel, Query

# Grafana's interval steps (rounded like its `roundInterval`), in seconds.
_NICE = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


class QueryRunner(Protocol):
    def query_with_columns(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...


def grafana_interval(time_from: datetime, time_to: datetime, max_data_points: int = 1000) -> int:
    """The interval Grafana would pick for a panel ``max_data_points`` pixels wide (seconds, >= 1)."""
    raw = max((time_to - time_from).total_seconds() / max_data_points, 1.0)
    for step in _NICE:
        if step >= raw:
            return step
    return int(math.ceil(raw / 86400) * 86400)


@dataclass
class QueryResult:
    dashboard: str
    panel: str
    panel_type: str
    ref_id: str
    sql: str
    columns: list[str] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "dashboard": self.dashboard,
            "panel": self.panel,
            "type": self.panel_type,
            "ref_id": self.ref_id,
            "rows": len(self.rows),
            "columns": self.columns,
            "error": self.error,
            "problems": self.problems,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _column_kinds(rows: Sequence[tuple[Any, ...]], width: int) -> list[set[str]]:
    kinds: list[set[str]] = [set() for _ in range(width)]
    for row in rows:
        for i, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, datetime):
                kinds[i].add("time")
            elif _is_number(value):
                kinds[i].add("number")
            elif isinstance(value, str):
                kinds[i].add("string")
            else:
                kinds[i].add(type(value).__name__)
    return kinds


def shape_problems(panel: Panel, query: Query, columns: list[str], rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """What would keep ``panel`` from drawing this result (empty when it can)."""
    problems: list[str] = []
    if not columns:
        return ["no columns"]
    if len(set(columns)) != len(columns):
        problems.append(f"duplicate column names {columns}")
    kinds = _column_kinds(rows, len(columns))
    by_name = dict(zip(columns, kinds, strict=True))
    numeric = [c for c, k in by_name.items() if k == {"number"}]
    for name, k in by_name.items():
        if len(k) > 1:
            problems.append(f"column {name} mixes {sorted(k)}")
    if panel.type == "timeseries" or query.format == "time_series":
        if columns[0] != "time":
            problems.append(f"a time series needs `time` as its first column, got {columns[0]!r}")
        if rows:
            if by_name.get("time") != {"time"}:
                problems.append("column time is not a DateTime")
            if not numeric:
                problems.append("a time series needs at least one numeric column")
            other = [c for c, k in by_name.items() if c != "time" and k - {"number", "string"}]
            if other:
                problems.append(f"columns {other} are neither numbers nor labels")
            times = [row[0] for row in rows]
            if times != sorted(times):
                problems.append("rows are not ordered by time")
    elif panel.type == "barchart":
        if panel.x_field not in columns:
            problems.append(f"bar chart x field {panel.x_field!r} is not a column")
        elif rows and by_name[panel.x_field] != {"string"}:
            problems.append(f"bar chart x field {panel.x_field!r} is not a string")
        if rows and not numeric:
            problems.append("a bar chart needs a numeric column")
    elif panel.type == "trend":
        if panel.x_field not in columns:
            problems.append(f"trend x field {panel.x_field!r} is not a column")
        elif rows and by_name[panel.x_field] != {"number"}:
            problems.append(f"trend x field {panel.x_field!r} is not numeric")
        if rows and len(numeric) < 2:
            problems.append("a trend panel needs an x field and at least one numeric value column")
        xs = [row[columns.index(panel.x_field)] for row in rows] if panel.x_field in columns else []
        if xs != sorted(xs):
            problems.append("trend rows are not ordered by the x field")
    elif panel.type == "stat":
        if not rows:
            problems.append("a stat panel needs a row")
        elif len(numeric) != len(columns):
            problems.append("a stat panel needs numeric columns only")
    elif panel.type == "piechart" and rows and (not numeric or not any(k == {"string"} for k in kinds)):
        problems.append("a pie chart needs a label and a value column")
    return problems


def resolve_variables(
    runner: QueryRunner,
    dashboard: Dashboard,
    time_from: datetime,
    time_to: datetime,
    chosen: Mapping[str, VariableValue] | None = None,
) -> dict[str, VariableValue]:
    """Current values of the dashboard's variables, in order, as Grafana resolves them on load: each
    query variable runs its own SQL (with the variables before it); a multi-value variable with "All"
    takes every value, a single-value one its first value unless ``chosen`` names one."""
    chosen = dict(chosen or {})
    values: dict[str, VariableValue] = {}
    for var in dashboard.variables:
        if var.kind != "query":
            values[var.name] = chosen.get(var.name, var.query)
            continue
        ctx = QueryContext(time_from, time_to, grafana_interval(time_from, time_to), values)
        _, rows = runner.query_with_columns(render(var.query, ctx))
        options = [str(row[0]) for row in rows]
        if var.name in chosen:
            values[var.name] = chosen[var.name]
        elif var.multi and var.include_all:
            values[var.name] = options
        else:
            values[var.name] = options[0] if options else ""
    return values


def check_dashboard(
    runner: QueryRunner,
    dashboard: Dashboard,
    time_from: datetime,
    time_to: datetime,
    chosen: Mapping[str, VariableValue] | None = None,
    interval_s: int | None = None,
) -> list[QueryResult]:
    """Run every query of every panel of ``dashboard``; errors are captured per query, never raised."""
    variables = resolve_variables(runner, dashboard, time_from, time_to, chosen)
    ctx = QueryContext(time_from, time_to, interval_s or grafana_interval(time_from, time_to), variables)
    results: list[QueryResult] = []
    for panel in dashboard.panels:
        for query in panel.queries:
            sql = render(query.sql, ctx)
            result = QueryResult(dashboard.uid, panel.title, panel.type, query.ref_id, sql)
            try:
                result.columns, result.rows = runner.query_with_columns(sql)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                result.problems = shape_problems(panel, query, result.columns, result.rows)
            results.append(result)
    return results


def data_time_range(runner: QueryRunner, database: str) -> tuple[datetime, datetime]:
    """A range covering everything stored: from the oldest score/batch to a minute from now."""
    _, rows = runner.query_with_columns(
        f"SELECT toUInt32(min(event_time)), count() FROM {database}.session_scores "
        f"UNION ALL SELECT toUInt32(min(finished_at)), count() FROM {database}.pipeline_batches"
    )
    starts = [int(start) for start, count in rows if count]
    now = datetime.now(UTC)
    start = datetime.fromtimestamp(min(starts), UTC) if starts else now - timedelta(hours=6)
    return start - timedelta(minutes=1), now + timedelta(minutes=1)
