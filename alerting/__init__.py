"""alerting — from session scores to alerts an on-call engineer trusts: policy (dedup, cooldown,
resolve) and receivers (console, JSON lines, Alertmanager, PagerDuty, webhooks, Kafka)."""

from alerting.alert import SEVERITIES, Alert, Severity
from alerting.policy import ThresholdPolicy
from alerting.sinks import AlertSink, ConsoleSink, JsonLinesSink

__all__ = ["SEVERITIES", "Alert", "AlertSink", "ConsoleSink", "JsonLinesSink", "Severity", "ThresholdPolicy"]
