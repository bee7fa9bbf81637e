"""alerting — from session scores to alerts an on-call engineer trusts.

* ``policy.AlertPolicy``: one incident per (model, client, kind) — its dedup key — however many
  sessions and evaluations it spans. Notifications: ``new`` (the page), ``escalation`` (severity
  rose; at once), ``update`` (annotations, at most every ``cooldown_s``), ``reminder`` (every
  ``renotify_s``), ``resolve`` (its sessions ended, or no evaluation reached the threshold for
  ``resolve_after_s``). Past ``max_per_minute`` new incidents per minute, new incidents join ONE
  roll-up incident (``alert_storm``) instead of paging; in a group of workers, each pages its share
  of ``max_per_minute`` and has a roll-up of its own (``AlertPolicy.share_pages``).
  ``suppress_clients`` / ``suppress_models`` (fnmatch patterns) never alert. All time is EVENT time;
  ids are deterministic.
* State across restarts: rebuilt from the outbox (the ClickHouse ``alerts`` table): the newest
  notification of each dedup key says whether its incident is open, since when, and its severity
  (``AlertPolicy.restore``; the pipeline does it for the partitions it is assigned). Members of a
  roll-up are not in the outbox and start afresh.
* ``dispatch.Dispatcher``: one background lane per receiver, in-order, exponential backoff with
  jitter, Retry-After honoured; outcomes recorded (``record_deliveries``); the outbox sweep
  (``undelivered``) delivers what a crash, an outage or a full queue left behind, with the same
  dedup key, so receivers do not page twice. Never blocks or raises into the pipeline.
* ``receivers``: Alertmanager (``/api/v2/alerts``, active alerts re-sent, ``endsAt`` in the future),
  PagerDuty Events API v2, JSON / Slack webhooks (HMAC-SHA256), Kafka; ``sinks``: console, JSON lines.
* ``render.AlertFormatter``: the text on-call reads (who, what vs the population, since when, how
  many queries, the Grafana client dashboard, a suggested action).
"""

from alerting.alert import SEVERITIES, Alert, Severity
from alerting.policy import AlertPolicy, PolicySettings
from alerting.sinks import AlertSink, ConsoleSink, JsonLinesSink

__all__ = [
    "SEVERITIES",
    "Alert",
    "AlertPolicy",
    "AlertSink",
    "ConsoleSink",
    "JsonLinesSink",
    "PolicySettings",
    "Severity",
]
