"""`probewatch dashboards push|export|check`: the dashboards subcommand group of the probewatch CLI."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from probewatch.config import Config, ConfigError

EXAMPLES = """\
examples:
  probewatch dashboards push --grafana-url http://grafana:3000 --token "$GRAFANA_TOKEN"
  probewatch dashboards push --grafana-url http://localhost:3000 --basic-auth admin:admin --config probewatch.toml
  probewatch dashboards export deploy/compose/grafana        # JSON + provisioning YAML for file provisioning
  probewatch dashboards check --data-dir ./probewatch-data   # run every panel query on your ClickHouse

credentials: --token / --basic-auth, else GRAFANA_TOKEN / GRAFANA_BASIC_AUTH (user:password), else
[grafana] token(_file) / user + password(_file) from the configuration. They are never printed.
"""


def add_dashboards_parser(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    dash = sub.add_parser(
        "dashboards",
        help="Grafana dashboards: push them through the API, export provisioning files, check their queries",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The Overview, Client drill-down and Pipeline health dashboards, built in code "
        "(dashboards/) over the ClickHouse tables, for the grafana-clickhouse-datasource plugin.",
        epilog=EXAMPLES,
    )
    dsub = dash.add_subparsers(dest="dashboards_command", metavar="ACTION")
    dsub.required = True

    push = dsub.add_parser(
        "push",
        help="create or update the folder, the ClickHouse data source and the dashboards (idempotent)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    add_common(push)
    push.add_argument("--grafana-url", metavar="URL", help="Grafana base URL (default: $GRAFANA_URL, grafana.url)")
    auth = push.add_mutually_exclusive_group()
    auth.add_argument("--token", metavar="TOKEN", help="service-account token (default: $GRAFANA_TOKEN)")
    auth.add_argument("--basic-auth", metavar="USER:PASS", help="basic auth (default: $GRAFANA_BASIC_AUTH)")
    push.add_argument("--datasource-host", metavar="HOST", help="ClickHouse host as Grafana reaches it")
    push.add_argument("--datasource-port", type=int, metavar="PORT", help="ClickHouse native port for Grafana")
    push.add_argument(
        "--update-secrets",
        action="store_true",
        help="re-send the data source password even when nothing else changed (Grafana never returns it)",
    )
    push.set_defaults(handler=cmd_push)

    exp = dsub.add_parser("export", help="write dashboard JSON and Grafana provisioning YAML to DIR")
    add_common(exp)
    exp.add_argument("directory", metavar="DIR")
    exp.add_argument("--datasource-host", metavar="HOST", help="ClickHouse host as Grafana reaches it")
    exp.add_argument("--datasource-port", type=int, metavar="PORT", help="ClickHouse native port for Grafana")
    exp.add_argument(
        "--dashboards-path",
        metavar="PATH",
        default=None,
        help="where Grafana will find DIR/dashboards (default /var/lib/grafana/dashboards/probewatch)",
    )
    exp.set_defaults(handler=cmd_export)

    chk = dsub.add_parser(
        "check",
        help="run every panel query (macros expanded as the plugin does) on the configured ClickHouse",
    )
    add_common(chk)
    chk.add_argument("--data-dir", metavar="DIR", help="chDB data directory (storage.chdb.path)")
    chk.add_argument("--client", metavar="ID", help="client for the drill-down (default: the most suspicious)")
    chk.add_argument("--json", action="store_true", help="print one JSON object per query")
    chk.set_defaults(handler=cmd_check)


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    from probewatch.cli import _load as load

    return load(args, overrides)


def _spec(config: Config, args: argparse.Namespace) -> Any:
    from dashboards.provision import DatasourceSpec

    host = args.datasource_host or config.grafana.datasource_host
    port = args.datasource_port or config.grafana.datasource_port
    return DatasourceSpec.from_config(config, host=host, port=port)


def cmd_push(args: argparse.Namespace) -> int:
    from dashboards.provision import Provisioner, grafana_api, settings_from_config

    config = _load(args)
    url = args.grafana_url or os.environ.get("GRAFANA_URL") or config.grafana.url
    if not url:
        raise ConfigError("give the Grafana URL: --grafana-url, $GRAFANA_URL or grafana.url")
    token = args.token or ""
    basic = args.basic_auth or ""
    if not token and not basic:
        token = os.environ.get("GRAFANA_TOKEN", "")
        basic = os.environ.get("GRAFANA_BASIC_AUTH", "") if not token else ""
    if not token and not basic:
        token = config.grafana.token
        if not token and config.grafana.user:
            basic = f"{config.grafana.user}:{config.grafana.password}"
    if not token and not basic:
        raise ConfigError("give Grafana credentials: --token, --basic-auth, $GRAFANA_TOKEN or [grafana] in the config")
    try:
        api = grafana_api(url, token=token, basic_auth=basic)
        report = Provisioner(api, update_secrets=args.update_secrets).push(
            settings_from_config(config), _spec(config, args)
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # grafana-client errors, connection errors: one line, no secrets
        print(f"probewatch: dashboards push to {url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    print("no changes" if not report.changed else "done")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dashboards.provision import DEFAULT_PROVISIONED_PATH, export, settings_from_config

    config = _load(args)
    written = export(
        args.directory,
        settings_from_config(config),
        _spec(config, args),
        dashboards_path=args.dashboards_path or DEFAULT_PROVISIONED_PATH,
    )
    for path in written:
        print(path)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dashboards.check import check_dashboard, data_time_range
    from dashboards.definitions import CLIENT_UID, all_dashboards
    from dashboards.provision import settings_from_config
    from storage import open_store

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides = {"storage": {"chdb": {"path": args.data_dir}}}
    config = _load(args, overrides)
    failed = 0
    store = open_store(config.storage)
    try:
        time_from, time_to = data_time_range(store, config.storage.database)
        for dashboard in all_dashboards(settings_from_config(config)):
            chosen = {"client": args.client} if args.client and dashboard.uid == CLIENT_UID else None
            for result in check_dashboard(store, dashboard, time_from, time_to, chosen):
                failed += not result.ok
                if args.json:
                    print(json.dumps({**result.summary(), "sql": result.sql}, default=str))
                else:
                    status = "ok" if result.ok else "FAIL " + (result.error or "; ".join(result.problems))
                    title = f"{result.panel} [{result.ref_id}]" if result.ref_id != "A" else result.panel
                    print(f"{result.dashboard:<20} {title:<50} {len(result.rows):>6} rows  {status}")
    finally:
        store.close()
    if not args.json:
        span = f"{time_from.astimezone(UTC):%Y-%m-%d %H:%M} – {time_to.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        print(f"time range {span}; {failed} failing queries; checked at {datetime.now(UTC):%H:%M:%S}")
    return 1 if failed else 0
