"""`probewatch dashboards push` against Grafana's HTTP API, and its idempotency.

No Grafana server can be installed on this machine (no package in its registries), so the push is
tested against a local HTTP server that implements the documented contract of the endpoints
grafana-client calls — folders, data sources by uid/name, ``POST /api/dashboards/db``,
``GET /api/dashboards/uid/<uid>``, search — with Grafana's status codes (404 when missing, 409 on a
duplicate folder uid or data-source name, 412 when a dashboard exists and ``overwrite`` is false),
its auth (401 without valid credentials) and its storage rules (secureJsonData is write-only and
reported as secureJsonFields; a saved dashboard gets id and version).
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from dashboards.definitions import CLIENT_UID, DATASOURCE_UID, FOLDER_UID, OVERVIEW_UID, PIPELINE_UID
from dashboards.model import PLUGIN_ID
from probewatch.cli import main

TOKEN = "glsa_test_token_not_to_be_printed"
ADMIN = ("admin", "s3cret-admin-pw")
CH_PASSWORD = "ch-pw-never-printed"


class FakeGrafana:
    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}  # by uid
        self.secure: dict[str, dict[str, str]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid -> {"dashboard":..., "folderUid":...}
        self.writes: list[str] = []
        self.requests: list[str] = []
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    # --------------------------------------------------------------------------- routing
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] != ["api"]:
            return 404, {"message": "Not found"}
        parts = parts[1:]
        if method != "GET":
            self.writes.append(f"{method} /api/{'/'.join(parts)}")
        if parts[:1] == ["folders"]:
            return self.folders_api(method, parts[1:], body)
        if parts[:1] == ["datasources"]:
            return self.datasources_api(method, parts[1:], body)
        if parts[:1] == ["dashboards"]:
            return self.dashboards_api(method, parts[1:], body)
        if parts == ["search"] and method == "GET":
            q = (query.get("query") or [""])[0].lower()
            hits = [
                {"uid": uid, "title": d["dashboard"]["title"], "type": "dash-db", "folderUid": d["folderUid"]}
                for uid, d in self.dashboards.items()
                if q in d["dashboard"]["title"].lower()
            ]
            hits += [{"uid": f["uid"], "title": f["title"], "type": "dash-folder"} for f in self.folders.values()]
            return 200, hits
        return 404, {"message": "Not found"}

    def folders_api(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        if method == "GET" and rest:
            folder = self.folders.get(rest[0])
            return (200, folder) if folder else (404, {"message": "folder not found", "status": "not-found"})
        if method == "POST" and not rest:
            uid = body.get("uid") or f"f{self._id()}"
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            if any(f["title"] == body["title"] for f in self.folders.values()):
                return 409, {"message": "a folder with the same name already exists"}
            self.folders[uid] = {"id": self._id(), "uid": uid, "title": body["title"], "version": 1}
            return 200, self.folders[uid]
        if method == "PUT" and rest:
            folder = self.folders.get(rest[0])
            if not folder:
                return 404, {"message": "folder not found"}
            if not body.get("overwrite") and body.get("version") != folder["version"]:
                return 412, {"message": "the folder has been changed by someone else"}
            folder.update(title=body.get("title", folder["title"]), version=folder["version"] + 1)
            return 200, folder
        return 405, {"message": "method not allowed"}

    def _ds_view(self, uid: str) -> dict[str, Any]:
        ds = copy.deepcopy(self.datasources[uid])
        ds["secureJsonFields"] = {k: True for k in self.secure.get(uid, {})}
        return ds

    def datasources_api(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        if method == "GET" and len(rest) == 2 and rest[0] in ("uid", "name"):
            if rest[0] == "uid":
                found = rest[1] if rest[1] in self.datasources else None
            else:
                found = next((u for u, d in self.datasources.items() if d["name"] == rest[1]), None)
            return (200, self._ds_view(found)) if found else (404, {"message": "Data source not found"})
        if method == "GET" and not rest:
            return 200, [self._ds_view(u) for u in self.datasources]
        if method == "POST" and not rest:
            if any(d["name"] == body["name"] for d in self.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            uid = body.get("uid") or f"ds{self._id()}"
            if uid in self.datasources:
                return 409, {"message": "data source with the same uid already exists"}
            self._store_ds(uid, body, version=1)
            return 200, {"datasource": self._ds_view(uid), "id": self.datasources[uid]["id"], "name": body["name"]}
        if method == "PUT" and len(rest) == 2 and rest[0] == "uid":
            uid = rest[1]
            if uid not in self.datasources:
                return 404, {"message": "Data source not found"}
            self._store_ds(uid, body, version=self.datasources[uid]["version"] + 1)
            return 200, {"datasource": self._ds_view(uid), "message": "Datasource updated"}
        return 405, {"message": "method not allowed"}

    def _store_ds(self, uid: str, body: dict[str, Any], version: int) -> None:
        previous = self.datasources.get(uid, {})
        self.datasources[uid] = {
            "id": previous.get("id") or self._id(),
            "uid": uid,
            "orgId": 1,
            "name": body["name"],
            "type": body["type"],
            "access": body.get("access", "proxy"),
            "url": body.get("url", ""),
            "isDefault": body.get("isDefault", False),
            "jsonData": body.get("jsonData") or {},
            "readOnly": False,
            "version": version,
        }
        secure = self.secure.setdefault(uid, {})
        secure.update(body.get("secureJsonData") or {})

    def dashboards_api(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        if method == "GET" and len(rest) == 2 and rest[0] == "uid":
            entry = self.dashboards.get(rest[1])
            if not entry:
                return 404, {"message": "Dashboard not found"}
            folder = self.folders.get(entry["folderUid"], {})
            meta = {
                "folderUid": entry["folderUid"],
                "folderTitle": folder.get("title", "General"),
                "provisioned": False,
                "version": entry["dashboard"]["version"],
                "slug": entry["dashboard"]["title"].lower().replace(" ", "-"),
            }
            return 200, {"dashboard": copy.deepcopy(entry["dashboard"]), "meta": meta}
        if method == "POST" and rest == ["db"]:
            model = copy.deepcopy(body["dashboard"])
            folder_uid = body.get("folderUid", "")
            if folder_uid and folder_uid not in self.folders:
                return 400, {"message": "folder not found"}
            uid = model.get("uid") or f"d{self._id()}"
            existing = self.dashboards.get(uid)
            same_title = [
                u
                for u, d in self.dashboards.items()
                if d["dashboard"]["title"] == model["title"] and d["folderUid"] == folder_uid and u != uid
            ]
            if same_title:
                return 412, {"status": "name-exists", "message": "A dashboard with the same name in the folder"}
            if existing and not body.get("overwrite"):
                return 412, {"status": "version-mismatch", "message": "The dashboard has been changed"}
            model["uid"] = uid
            model["id"] = existing["dashboard"]["id"] if existing else self._id()
            model["version"] = existing["dashboard"]["version"] + 1 if existing else 1
            self.dashboards[uid] = {"dashboard": model, "folderUid": folder_uid}
            return 200, {"id": model["id"], "uid": uid, "status": "success", "version": model["version"]}
        return 405, {"message": "method not allowed"}


@pytest.fixture
def grafana() -> Iterator[tuple[str, FakeGrafana]]:
    state = FakeGrafana()
    valid = {f"Bearer {TOKEN}", "Basic " + base64.b64encode(":".join(ADMIN).encode()).decode()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            url = urlparse(self.path)
            state.requests.append(f"{self.command} {url.path}")
            if self.headers.get("Authorization") not in valid:
                self._reply(401, {"message": "Unauthorized"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = state.handle(self.command, url.path, parse_qs(url.query), body)
            self._reply(status, payload)

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _report(out: str) -> dict[str, str]:
    """name -> action from the push report lines (`kind name action`, fixed columns)."""
    return {line[11:51].strip(): line[52:].strip() for line in out.splitlines() if len(line) > 52}


def _push(url: str, *extra: str) -> list[str]:
    return ["dashboards", "push", "--grafana-url", url, "--log-level", "WARNING", *extra]


def test_push_creates_then_is_idempotent(
    grafana: tuple[str, FakeGrafana], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    for name in ("GRAFANA_URL", "GRAFANA_TOKEN", "GRAFANA_BASIC_AUTH", "PROBEWATCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROBEWATCH__STORAGE__CLICKHOUSE__HOST", "clickhouse")
    monkeypatch.setenv("PROBEWATCH__STORAGE__CLICKHOUSE__PASSWORD", CH_PASSWORD)

    assert main(_push(url, "--token", TOKEN)) == 0
    first = capsys.readouterr()
    assert first.out.count("created") == 5, first.out  # folder, data source, three dashboards
    assert set(state.dashboards) == {OVERVIEW_UID, CLIENT_UID, PIPELINE_UID}
    assert all(d["folderUid"] == FOLDER_UID for d in state.dashboards.values())
    ds = state.datasources[DATASOURCE_UID]
    assert ds["type"] == PLUGIN_ID and ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["port"] == 9000
    assert ds["jsonData"]["defaultDatabase"] == "probewatch" and ds["jsonData"]["protocol"] == "native"
    assert state.secure[DATASOURCE_UID] == {"password": CH_PASSWORD}
    assert "password" not in json.dumps(ds)  # only in secureJsonData, never in jsonData

    # Second run (basic auth this time): nothing written, everything reported unchanged.
    writes_before = len(state.writes)
    assert main(_push(url, "--basic-auth", ":".join(ADMIN))) == 0
    second = capsys.readouterr()
    assert len(state.writes) == writes_before, state.writes[writes_before:]
    assert second.out.count("unchanged") == 5 and "no changes" in second.out, second.out
    assert [d["dashboard"]["version"] for d in state.dashboards.values()] == [1, 1, 1]
    assert len(state.datasources) == 1 and len(state.folders) == 1
    for out in (first.out + first.err, second.out + second.err):
        assert TOKEN not in out and CH_PASSWORD not in out and ADMIN[1] not in out


def test_push_updates_what_changed_only(
    grafana: tuple[str, FakeGrafana], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)  # credentials from the environment
    assert main(_push(url)) == 0
    capsys.readouterr()
    # Someone edits a dashboard in the UI, and the threshold changes in probewatch's config.
    state.dashboards[OVERVIEW_UID]["dashboard"]["title"] = "edited by hand"
    monkeypatch.setenv("PROBEWATCH__DETECTION__ALERT_THRESHOLD", "0.7")
    assert main(_push(url)) == 0
    report = _report(capsys.readouterr().out)
    assert report == {
        "probewatch": "unchanged",
        "probewatch ClickHouse": "unchanged",
        "probewatch: Overview": "updated",  # the hand edit is replaced (and the new threshold applied)
        "probewatch: Client drill-down": "updated",  # its threshold line moved to 0.7
        "probewatch: Pipeline health": "unchanged",
    }
    assert state.dashboards[OVERVIEW_UID]["dashboard"]["title"] == "probewatch: Overview"
    assert state.dashboards[OVERVIEW_UID]["dashboard"]["version"] == 2


def test_push_adopts_a_datasource_found_by_name(
    grafana: tuple[str, FakeGrafana], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    state.datasources["legacy-uid"] = {
        "id": 99, "uid": "legacy-uid", "orgId": 1, "name": "probewatch ClickHouse", "type": PLUGIN_ID,
        "access": "proxy", "url": "", "isDefault": False, "jsonData": {"host": "old"}, "readOnly": False, "version": 3,
    }  # fmt: skip
    assert main(_push(url, "--token", TOKEN)) == 0
    assert len(state.datasources) == 1 and state.datasources["legacy-uid"]["jsonData"]["host"] == "127.0.0.1"
    panel_ds = {p["datasource"]["uid"] for d in state.dashboards.values() for p in d["dashboard"]["panels"]}
    assert panel_ds == {"legacy-uid"}
    assert "updated" in capsys.readouterr().out


def test_push_fails_cleanly_without_valid_credentials(
    grafana: tuple[str, FakeGrafana], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = grafana
    for name in ("GRAFANA_URL", "GRAFANA_TOKEN", "GRAFANA_BASIC_AUTH"):
        monkeypatch.delenv(name, raising=False)
    assert main(_push(url)) == 2  # no credentials at all: a configuration error
    assert "credentials" in capsys.readouterr().err
    assert main(_push(url, "--token", "wrong-token-xyz")) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "wrong-token-xyz" not in err
    assert not state.dashboards
