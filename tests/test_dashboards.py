"""Dashboards as code: the JSON model, the macro expansion, the export files. No services needed."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from dashboards.definitions import (
    CLIENT_UID,
    DATASOURCE_UID,
    FOLDER_UID,
    OVERVIEW_UID,
    PIPELINE_UID,
    Settings,
    all_dashboards,
)
from dashboards.macros import MacroError, QueryContext, expand_macros, interpolate_variables, render
from dashboards.model import PLUGIN_ID, DatasourceRef
from dashboards.provision import PASSWORD_ENV, DatasourceSpec, export
from probewatch.cli import main
from probewatch.config import load_config

CTX = QueryContext(
    datetime(2026, 11, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 1, 6, 0, 30, 500000, tzinfo=UTC),
    interval_s=20.5,
    variables={"model": "fraud-v3", "models": ["a", "b'c"], "client": "it's"},
)
FROM, TO = 1793491200, 1793512830


def test_plugin_macros_expand_like_the_plugin_backend() -> None:
    assert expand_macros("WHERE $__timeFilter(event_time)", CTX) == (
        f"WHERE event_time >= toDateTime({FROM}) AND event_time <= toDateTime({TO})"
    )
    assert expand_macros("$__fromTime,$__toTime", CTX) == f"toDateTime({FROM}),toDateTime({TO})"
    assert expand_macros("$__fromTime_ms", CTX) == f"fromUnixTimestamp64Milli({FROM}000)"
    assert expand_macros("$__toTime_ms", CTX) == f"fromUnixTimestamp64Milli({TO}500)"
    assert expand_macros("$__interval_s", CTX) == "20"
    assert expand_macros("$__timeInterval(ts)", CTX) == "toStartOfInterval(toDateTime(ts), INTERVAL 20 second)"
    assert expand_macros("$__timeInterval_ms(ts)", CTX) == (
        "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 20500 millisecond)"
    )
    assert expand_macros("$__dateFilter(d)", CTX) == "d >= toDate('2026-11-01') AND d <= toDate('2026-11-01')"
    assert expand_macros("$__dt(d, t)", CTX) == (
        f"(d >= toDate('2026-11-01') AND d <= toDate('2026-11-01')) AND "
        f"(t >= toDateTime({FROM}) AND t <= toDateTime({TO}))"
    )
    # Nested parentheses in an argument, and text after the macro.
    assert expand_macros("$__timeFilter(toDateTime(x, 'UTC')) AND 1", CTX).endswith(f"toDateTime({TO}) AND 1")
    assert expand_macros("x", QueryContext(CTX.time_from, CTX.time_to, 0.2)) == "x"
    assert expand_macros("$__interval_s", QueryContext(CTX.time_from, CTX.time_to, 0.2)) == "1"  # at least 1 s
    with pytest.raises(MacroError, match="unknown macro"):
        expand_macros("$__nope(x)", CTX)
    with pytest.raises(MacroError, match="expected 1"):
        expand_macros("$__timeFilter(a, b)", CTX)
    with pytest.raises(MacroError, match="unclosed"):
        expand_macros("$__timeFilter(a", CTX)


def test_template_variables_expand_like_grafana_with_the_plugin_format() -> None:
    v = CTX.variables
    assert interpolate_variables("m = '$model' AND '${model}' AND [[model]]", v) == (
        "m = 'fraud-v3' AND 'fraud-v3' AND fraud-v3"
    )
    assert interpolate_variables("IN (${models:singlequote})", v) == "IN ('a','b\\'c')"
    assert interpolate_variables("IN ($models)", v) == "IN ('a','b'c')"  # the plugin's own (unescaped) format
    assert interpolate_variables("= ${client:singlequote}", v) == "= 'it\\'s'"
    assert interpolate_variables("= ${client:sqlstring}", v) == "= 'it''s'"
    assert interpolate_variables("$__timeFilter(t) $model_id $unknown", v) == "$__timeFilter(t) $model_id $unknown"
    assert render("WHERE model_id = ${model:singlequote} AND $__timeFilter(t)", CTX) == (
        f"WHERE model_id = 'fraud-v3' AND t >= toDateTime({FROM}) AND t <= toDateTime({TO})"
    )


def test_dashboards_have_stable_uids_defaults_and_valid_panels() -> None:
    ds = DatasourceRef(DATASOURCE_UID)
    models = {d.uid: d.to_json(ds) for d in all_dashboards()}
    assert set(models) == {OVERVIEW_UID, CLIENT_UID, PIPELINE_UID}
    for uid, model in models.items():
        json.dumps(model)  # plain JSON
        assert model["uid"] == uid and "probewatch" in model["tags"]
        assert model["time"] == {"from": "now-6h", "to": "now"} and model["refresh"] == "30s"
        ids = [p["id"] for p in model["panels"]]
        assert len(set(ids)) == len(ids)
        for panel in model["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
            assert panel["datasource"] == {"type": PLUGIN_ID, "uid": DATASOURCE_UID}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                sql = target["rawSql"]
                assert target["editorType"] == "sql" and target["datasource"]["type"] == PLUGIN_ID
                assert target["format"] == (0 if panel["type"] == "timeseries" else 1)
                # 18.16-safe: no toStartOfInterval (so no $__timeInterval), no window functions.
                assert "toStartOfInterval" not in sql and "$__timeInterval" not in sql
                assert not re.search(r"\bOVER\s*\(", sql, re.I), sql
                if "system.events" not in sql and "detector_state" not in sql:
                    assert "$__timeFilter(" in sql, (panel["title"], sql)
                render(sql, CTX)  # every macro is known
    # Overlapping panels would hide each other.
    for model in models.values():
        cells: set[tuple[int, int]] = set()
        for panel in model["panels"]:
            g = panel["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, panel["title"]
            cells |= mine
    client = models[CLIENT_UID]
    assert [v["name"] for v in client["templating"]["list"]] == ["model", "client"]
    assert "${model:singlequote}" in client["templating"]["list"][1]["query"]
    score_panel = client["panels"][0]
    steps = score_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 0.8 and score_panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]
    overview = json.dumps(models[OVERVIEW_UID])
    assert f"/d/{CLIENT_UID}/" in overview and "var-client=${__data.fields.client_id" in overview


def test_settings_flow_into_the_queries() -> None:
    s = Settings(database="pw_prod", alert_threshold=0.65)
    text = json.dumps([d.to_json(DatasourceRef("x")) for d in all_dashboards(s)])
    assert "pw_prod.session_scores" in text and "probewatch.session_scores" not in text
    assert "v >= 0.65" in text
    with pytest.raises(ValueError):
        Settings(database="bad name")


def test_export_writes_dashboards_and_provisioning(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "PROBEWATCH__STORAGE__CLICKHOUSE__HOST": "clickhouse",
            "PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD": "hunter2",
            "PROBEWATCH__STORAGE__DATABASE": "pw",
        }
    )
    spec = DatasourceSpec.from_config(config)
    written = export(tmp_path, Settings(database="pw"), spec, dashboards_path="/dash")
    assert len(written) == 5
    assert "hunter2" not in "".join(p.read_text() for p in written)
    for uid in (OVERVIEW_UID, CLIENT_UID, PIPELINE_UID):
        model = json.loads((tmp_path / "dashboards" / f"{uid}.json").read_text())
        assert model["uid"] == uid
        assert ("pw.pipeline_batches" if uid == PIPELINE_UID else "pw.session_scores") in json.dumps(model)
    providers = yaml.safe_load((tmp_path / "provisioning/dashboards/probewatch.yaml").read_text())
    provider = providers["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/dash"
    assert provider["folderUid"] == FOLDER_UID
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/probewatch.yaml").read_text())["datasources"][0]
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == PLUGIN_ID
    assert ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["defaultDatabase"] == "pw"
    assert ds["secureJsonData"]["password"] == "${" + PASSWORD_ENV + "}"


def test_cli_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PROBEWATCH_CONFIG", raising=False)
    assert main(["dashboards", "export", str(tmp_path), "--datasource-host", "ch", "--log-level", "WARNING"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/probewatch.yaml").read_text())["datasources"][0]
    assert ds["jsonData"]["host"] == "ch"
