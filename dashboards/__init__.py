"""dashboards — Grafana dashboards as code over probewatch's ClickHouse tables, pushed with grafana-client
or exported as files for provisioning."""
