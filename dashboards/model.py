"""Typed builders for the Grafana dashboard JSON model (the parts probewatch uses).

Dashboards are plain dataclasses; :meth:`Dashboard.to_json` renders the JSON model Grafana stores
(schemaVersion 39: Grafana 10/11), with panels laid out left to right on the 24-column grid. Every
query targets the official ClickHouse data source plugin (``grafana-clickhouse-datasource``) in its
SQL editor mode, so the SQL text is exactly what the plugin expands and sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PLUGIN_ID = "grafana-clickhouse-datasource"
SCHEMA_VERSION = 39
GRID_COLUMNS = 24

# The plugin's query formats (its `Format` enum, sent as `format`) and result shapes (`queryType`).
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1

PanelType = Literal["timeseries", "table", "barchart", "stat", "trend", "piechart"]
QueryFormat = Literal["time_series", "table"]


@dataclass(frozen=True)
class DatasourceRef:
    uid: str
    type: str = PLUGIN_ID

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "uid": self.uid}


@dataclass(frozen=True)
class Query:
    """One SQL target. ``format`` "time_series" makes the plugin return data frames Grafana turns into
    series (a long result with string label columns is pivoted to one series per label value)."""

    sql: str
    format: QueryFormat = "table"
    ref_id: str = "A"

    def to_json(self, ds: DatasourceRef) -> dict[str, Any]:
        time_series = self.format == "time_series"
        return {
            "refId": self.ref_id,
            "datasource": ds.to_json(),
            "editorType": "sql",
            "format": FORMAT_TIME_SERIES if time_series else FORMAT_TABLE,
            "queryType": "timeseries" if time_series else "table",
            "rawSql": self.sql.strip(),
        }


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: the base step
    color: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "color": self.color}


@dataclass(frozen=True)
class DataLink:
    title: str
    url: str

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "url": self.url, "targetBlank": False}


@dataclass(frozen=True)
class FieldOverride:
    """Properties for one field (by name), e.g. a unit, a display name or a data link."""

    field_name: str
    properties: tuple[tuple[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "matcher": {"id": "byName", "options": self.field_name},
            "properties": [{"id": key, "value": value} for key, value in self.properties],
        }


@dataclass
class Panel:
    """One panel: its queries and the few display settings we need. ``x_field`` names the numeric
    x column of a trend panel (or the category column of a bar chart)."""

    title: str
    type: PanelType
    queries: list[Query]
    description: str = ""
    width: int = 12
    height: int = 8
    unit: str = ""
    decimals: int | None = None
    min: float | None = None
    max: float | None = None
    thresholds: tuple[Threshold, ...] = ()
    threshold_line: bool = False
    stacked: bool = False
    bars: bool = False
    log_scale: bool = False
    x_field: str = ""
    overrides: tuple[FieldOverride, ...] = ()
    links: tuple[DataLink, ...] = ()

    def field_config(self) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        if self.unit:
            defaults["unit"] = self.unit
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        if self.thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": [t.to_json() for t in self.thresholds]}
        if self.type in ("timeseries", "trend", "barchart"):
            custom: dict[str, Any] = {
                "drawStyle": "bars" if self.bars else "line",
                "lineWidth": 1,
                "fillOpacity": 60 if self.bars else 10,
                "showPoints": "never" if self.type != "trend" else "always",
                "spanNulls": True,
                "stacking": {"mode": "normal" if self.stacked else "none", "group": "A"},
                "thresholdsStyle": {"mode": "line+area" if self.threshold_line else "off"},
            }
            if self.log_scale:
                custom["scaleDistribution"] = {"type": "log", "log": 10}
            if self.type == "barchart":
                custom = {k: custom[k] for k in ("fillOpacity", "lineWidth", "thresholdsStyle")}
                if self.log_scale:
                    custom["scaleDistribution"] = {"type": "log", "log": 10}
            defaults["custom"] = custom
        if self.links:
            defaults["links"] = [link.to_json() for link in self.links]
        return {"defaults": defaults, "overrides": [o.to_json() for o in self.overrides]}

    def options(self) -> dict[str, Any]:
        legend = {"displayMode": "list", "placement": "bottom", "showLegend": True}
        tooltip = {"mode": "multi", "sort": "desc"}
        if self.type == "timeseries":
            return {"legend": legend, "tooltip": tooltip}
        if self.type == "trend":
            return {"legend": legend, "tooltip": tooltip, "xField": self.x_field}
        if self.type == "barchart":
            return {
                "legend": legend,
                "tooltip": tooltip,
                "xField": self.x_field,
                "orientation": "auto",
                "showValue": "auto",
                "stacking": "normal" if self.stacked else "none",
            }
        if self.type == "stat":
            return {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "none",
                "textMode": "auto",
            }
        if self.type == "piechart":
            return {
                "legend": {**legend, "placement": "right", "values": ["value"]},
                "reduceOptions": {"calcs": ["sum"], "fields": "", "values": True},
                "pieType": "donut",
            }
        return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"]}}

    def to_json(self, panel_id: int, grid: dict[str, int], ds: DatasourceRef) -> dict[str, Any]:
        refs = [q.ref_id for q in self.queries]
        if len(set(refs)) != len(refs):
            raise ValueError(f"panel {self.title!r}: duplicate query refIds {refs}")
        return {
            "id": panel_id,
            "type": self.type,
            "title": self.title,
            "description": self.description,
            "gridPos": grid,
            "datasource": ds.to_json(),
            "targets": [q.to_json(ds) for q in self.queries],
            "fieldConfig": self.field_config(),
            "options": self.options(),
        }


@dataclass(frozen=True)
class Variable:
    """A template variable: ``query`` (SQL run by the data source), ``constant`` or ``custom``."""

    name: str
    label: str
    kind: Literal["query", "constant", "custom"] = "query"
    query: str = ""
    multi: bool = False
    include_all: bool = False
    hidden: bool = False
    description: str = ""

    def to_json(self, ds: DatasourceRef) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "type": self.kind,
            "description": self.description,
            "hide": 2 if self.hidden else 0,
            "skipUrlSync": False,
        }
        if self.kind == "query":
            out.update(
                datasource=ds.to_json(),
                query=self.query.strip(),
                definition=self.query.strip(),
                refresh=2,  # on time range change: only models/clients seen in the range
                sort=1,
                multi=self.multi,
                includeAll=self.include_all,
                current={},
                options=[],
                regex="",
            )
        else:
            out.update(query=self.query, current={"text": self.query, "value": self.query}, options=[])
        return out


@dataclass(frozen=True)
class DashboardLink:
    title: str
    url: str

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "type": "link",
            "url": self.url,
            "icon": "dashboard",
            "keepTime": True,
            "includeVars": False,
            "targetBlank": False,
            "asDropdown": False,
            "tags": [],
            "tooltip": "",
        }


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[Variable] = field(default_factory=list)
    tags: tuple[str, ...] = ("probewatch",)
    time_from: str = "now-6h"
    time_to: str = "now"
    refresh: str = "30s"
    links: tuple[DashboardLink, ...] = ()

    def layout(self) -> list[dict[str, int]]:
        """gridPos of each panel: left to right, wrapping at 24 columns, rows as tall as their tallest."""
        out: list[dict[str, int]] = []
        x = y = row_height = 0
        for panel in self.panels:
            width = min(panel.width, GRID_COLUMNS)
            if x + width > GRID_COLUMNS:
                x, y, row_height = 0, y + row_height, 0
            out.append({"x": x, "y": y, "w": width, "h": panel.height})
            x += width
            row_height = max(row_height, panel.height)
        return out

    def to_json(self, ds: DatasourceRef) -> dict[str, Any]:
        names = [v.name for v in self.variables]
        if len(set(names)) != len(names):
            raise ValueError(f"dashboard {self.uid}: duplicate variables {names}")
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "timezone": "utc",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "time": {"from": self.time_from, "to": self.time_to},
            "refresh": self.refresh,
            "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m", "1h"]},
            "templating": {"list": [v.to_json(ds) for v in self.variables]},
            "annotations": {"list": []},
            "links": [link.to_json() for link in self.links],
            "panels": [
                panel.to_json(i + 1, grid, ds)
                for i, (panel, grid) in enumerate(zip(self.panels, self.layout(), strict=True))
            ],
        }
