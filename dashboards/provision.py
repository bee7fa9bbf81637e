"""Put the dashboards into Grafana: through its HTTP API (``push``) or as provisioning files (``export``).

``push`` creates or updates, idempotently, the folder, the ClickHouse data source (built from
probewatch's own ``[storage.clickhouse]`` settings; its password goes to ``secureJsonData``, which
Grafana never returns) and the three dashboards, looking each up by uid (the data source also by
name). Running it twice changes nothing the second time; every object is reported as created,
updated or unchanged.

``export`` writes the dashboards' JSON and Grafana's file-provisioning YAML (a dashboards provider and
the data source, whose password is an environment-variable reference, never the secret itself).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboards.definitions import (
    DATASOURCE_NAME,
    DATASOURCE_UID,
    FOLDER_TITLE,
    FOLDER_UID,
    Settings,
    all_dashboards,
)
from dashboards.model import PLUGIN_ID, DatasourceRef
from probewatch.config import Config

log = logging.getLogger("probewatch.dashboards")

PASSWORD_ENV = "PROBEWATCH_CLICKHOUSE_PASSWORD"
DEFAULT_PROVISIONED_PATH = "/var/lib/grafana/dashboards/probewatch"
MESSAGE = "probewatch dashboards push"
# Keys Grafana adds to a stored dashboard that are not part of the model we send.
_VOLATILE_KEYS = ("id", "version")


@dataclass(frozen=True)
class DatasourceSpec:
    """The ClickHouse data source as probewatch configures it."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(default="", repr=False)
    secure: bool = False
    verify: bool = True
    ca_cert: str = field(default="", repr=False)
    name: str = DATASOURCE_NAME
    uid: str = DATASOURCE_UID

    @classmethod
    def from_config(cls, config: Config, host: str = "", port: int = 0) -> DatasourceSpec:
        ch = config.storage.clickhouse
        ca_cert = Path(ch.ca_certs).read_text() if ch.ca_certs else ""
        return cls(
            host=host or ch.host,
            port=port or ch.port,
            user=ch.user,
            database=config.storage.database,
            password=ch.password,
            secure=ch.secure,
            verify=ch.verify,
            ca_cert=ca_cert,
        )

    def json_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "protocol": "native",
            "username": self.user,
            "defaultDatabase": self.database,
            "secure": self.secure,
            "tlsSkipVerify": self.secure and not self.verify,
        }
        if self.ca_cert:
            data["tlsAuthWithCACert"] = True
        return data

    def secure_json_data(self, password: str | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        value = self.password if password is None else password
        if value:
            out["password"] = value
        if self.ca_cert:
            out["tlsCACert"] = self.ca_cert
        return out

    def api_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "uid": self.uid,
            "type": PLUGIN_ID,
            "access": "proxy",
            "isDefault": False,
            "jsonData": self.json_data(),
        }
        secure = self.secure_json_data()
        if secure:
            body["secureJsonData"] = secure
        return body


@dataclass
class PushReport:
    actions: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, action)

    def add(self, kind: str, name: str, action: str) -> None:
        log.info("%s %s: %s", kind, name, action)
        self.actions.append((kind, name, action))

    @property
    def changed(self) -> bool:
        return any(action != "unchanged" for _, _, action in self.actions)

    def lines(self) -> list[str]:
        return [f"{kind:<10} {name:<40} {action}" for kind, name, action in self.actions]


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "status_code", None) == 404


def dashboard_models(settings: Settings, datasource_uid: str = DATASOURCE_UID) -> list[dict[str, Any]]:
    ds = DatasourceRef(datasource_uid)
    return [d.to_json(ds) for d in all_dashboards(settings)]


def settings_from_config(config: Config) -> Settings:
    return Settings(database=config.storage.database, alert_threshold=config.detection.alert_threshold)


class Provisioner:
    """Idempotent create-or-update of folder, data source and dashboards through grafana-client."""

    def __init__(self, api: Any, *, update_secrets: bool = False) -> None:
        self.api = api
        self.update_secrets = update_secrets
        self.report = PushReport()

    # ------------------------------------------------------------------ folder
    def ensure_folder(self, uid: str = FOLDER_UID, title: str = FOLDER_TITLE) -> str:
        try:
            folder = self.api.folder.get_folder(uid)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            self.api.folder.create_folder(title, uid=uid)
            self.report.add("folder", title, "created")
            return uid
        if folder.get("title") != title:
            self.api.folder.update_folder(uid, title=title, version=folder.get("version"), overwrite=True)
            self.report.add("folder", title, "updated")
        else:
            self.report.add("folder", title, "unchanged")
        return uid

    # ------------------------------------------------------------------ data source
    def _find_datasource(self, spec: DatasourceSpec) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.api.datasource.get_datasource_by_uid(spec.uid)
            return found
        except Exception as exc:
            if not _is_not_found(exc):
                raise
        try:
            found = self.api.datasource.get_datasource_by_name(spec.name)
            return found
        except Exception as exc:
            if not _is_not_found(exc):
                raise
        return None

    def ensure_datasource(self, spec: DatasourceSpec) -> str:
        """Create or update the data source; returns its uid (an existing one found by name keeps its uid)."""
        existing = self._find_datasource(spec)
        if existing is None:
            self.api.datasource.create_datasource(spec.api_body())
            self.report.add("datasource", spec.name, "created")
            return spec.uid
        uid = str(existing.get("uid") or spec.uid)
        if existing.get("readOnly"):
            self.report.add("datasource", spec.name, "unchanged (provisioned from files: read-only)")
            return uid
        has_password = bool((existing.get("secureJsonFields") or {}).get("password"))
        stored = existing.get("jsonData") or {}
        wanted = spec.json_data()
        same = (
            existing.get("name") == spec.name
            and existing.get("type") == PLUGIN_ID
            and existing.get("access") == "proxy"
            and all(stored.get(k) == v for k, v in wanted.items())
            and has_password == bool(spec.password)
            and not (self.update_secrets and (spec.password or spec.ca_cert))
        )
        if same:
            self.report.add("datasource", spec.name, "unchanged")
            return uid
        body = spec.api_body()
        body["uid"] = uid
        body["jsonData"] = {**stored, **wanted}
        self.api.datasource.update_datasource_by_uid(uid, body)
        self.report.add("datasource", spec.name, "updated")
        return uid

    # ------------------------------------------------------------------ dashboards
    def ensure_dashboard(self, model: dict[str, Any], folder_uid: str) -> None:
        uid, title = model["uid"], model["title"]
        try:
            current = self.api.dashboard.get_dashboard(uid)
        except Exception as exc:
            if not _is_not_found(exc):
                raise
            current = None
        if current is not None:
            stored = {k: v for k, v in (current.get("dashboard") or {}).items() if k not in _VOLATILE_KEYS}
            meta = current.get("meta") or {}
            if stored == model and meta.get("folderUid") == folder_uid:
                self.report.add("dashboard", title, "unchanged")
                return
        self.api.dashboard.update_dashboard(
            {"dashboard": {**model, "id": None}, "folderUid": folder_uid, "overwrite": True, "message": MESSAGE}
        )
        self.report.add("dashboard", title, "created" if current is None else "updated")

    def push(self, settings: Settings, spec: DatasourceSpec) -> PushReport:
        folder_uid = self.ensure_folder()
        ds_uid = self.ensure_datasource(spec)
        for model in dashboard_models(settings, ds_uid):
            self.ensure_dashboard(model, folder_uid)
        return self.report


def grafana_api(url: str, *, token: str = "", basic_auth: str = "", timeout: float = 10.0) -> Any:
    """A GrafanaApi for ``url`` (``http[s]://host[:port][/prefix]``) with a token or ``user:password``."""
    from grafana_client import GrafanaApi

    credential: str | tuple[str, str] | None = None
    if token:
        credential = token
    elif basic_auth:
        user, sep, password = basic_auth.partition(":")
        if not sep:
            raise ValueError("basic auth must be given as user:password")
        credential = (user, password)
    base = url.rstrip("/") + "/"  # grafana-client appends "api" to the path prefix
    return GrafanaApi.from_url(base, credential=credential, timeout=timeout)


# ------------------------------------------------------------------------------------ export
def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def export(
    directory: str | Path,
    settings: Settings,
    spec: DatasourceSpec,
    *,
    dashboards_path: str = DEFAULT_PROVISIONED_PATH,
) -> list[Path]:
    """Write ``<dir>/dashboards/*.json`` and ``<dir>/provisioning/{dashboards,datasources}/probewatch.yaml``.

    Mount ``<dir>/dashboards`` at ``dashboards_path`` and ``<dir>/provisioning`` at
    ``/etc/grafana/provisioning``; set ``$PROBEWATCH_CLICKHOUSE_PASSWORD`` in Grafana's environment.
    """
    root = Path(directory)
    written: list[Path] = []

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    for model in dashboard_models(settings, spec.uid):
        write(root / "dashboards" / f"{model['uid']}.json", json.dumps(model, indent=2, ensure_ascii=False) + "\n")
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "probewatch",
                "orgId": 1,
                "folder": FOLDER_TITLE,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": dashboards_path, "foldersFromFilesStructure": False},
            }
        ],
    }
    header = "# Generated by `probewatch dashboards export`; do not edit by hand.\n"
    write(root / "provisioning" / "dashboards" / "probewatch.yaml", header + _yaml(provider))
    datasource: dict[str, Any] = {
        "name": spec.name,
        "uid": spec.uid,
        "type": PLUGIN_ID,
        "access": "proxy",
        "isDefault": True,
        "editable": False,
        "jsonData": spec.json_data(),
        # Grafana expands $VAR in provisioning files: the secret stays in Grafana's environment.
        "secureJsonData": spec.secure_json_data(password="${" + PASSWORD_ENV + "}"),
    }
    datasources = {"apiVersion": 1, "datasources": [datasource]}
    write(root / "provisioning" / "datasources" / "probewatch.yaml", header + _yaml(datasources))
    return written
