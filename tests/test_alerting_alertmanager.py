"""Against the REAL Alertmanager (deploy/local/alertmanager.sh: 127.0.0.1:19093, group_wait 1 s,
group_interval 2 s, every alert to the webhook http://127.0.0.1:19080/alertmanager that these tests
run): one attack is one alert group, updates do not re-page, the resolve arrives; N attacks across an
Alertmanager outage (stopped, restarted) arrive every one, once. These FAIL if Alertmanager is down."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from alerting.alert import Alert
from alerting.dispatch import DeliverySettings, Dispatcher
from alerting.policy import AlertPolicy, PolicySettings
from alerting.receivers import AlertmanagerReceiver
from alerting.render import AlertFormatter
from alerting.testing import RecordingServer
from detectors.scores import SessionScore

pytestmark = pytest.mark.integration

FAST = DeliverySettings(backoff_initial_s=0.2, backoff_max_s=1.0, sweep_s=60, tick_s=0.2, shutdown_timeout_s=5)
FORMATTER = AlertFormatter("http://grafana.local:3000", threshold=0.8)


@pytest.fixture(scope="module")
def am_webhook(webhook_port: int) -> Iterator[RecordingServer]:
    server = RecordingServer(port=webhook_port, default_status=200).start()
    yield server
    server.stop()


def notifications(server: RecordingServer, model: str) -> list[dict[str, Any]]:
    """Alertmanager's webhook notifications about this test's model: one per group per flush."""
    out = []
    for request in list(server.requests):
        body = request.json()
        if body.get("commonLabels", {}).get("model_id") == model:
            out.append(body)
    return out


def pages(server: RecordingServer, model: str) -> Counter[tuple[str, str]]:
    """(client, status) of every notification: a 'firing' one is a page, a 'resolved' one the end."""
    return Counter((n["commonLabels"]["client_id"], n["status"]) for n in notifications(server, model))


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


class Attack:
    """Session scores of one attacking client, with event times = now (so Alertmanager's startsAt is
    real), through the incident policy."""

    def __init__(self, model: str, client: str, started: float) -> None:
        self.model, self.client, self.started, self.n = model, client, started, 100

    def score(self, value: float = 0.86, closed: bool = False, session: str = "s1") -> SessionScore:
        self.n += 25
        return SessionScore(
            model_id=self.model,
            client_id=self.client,
            session_id=session,
            event_time=time.time(),
            first_seen=self.started,
            n_queries=self.n,
            client_queries=self.n,
            score=value,
            kind_scores={"extraction": value},
            signals={"distinct_cells": float(self.n)},
            reasons=[f"extraction: {self.n} distinct cells in {self.n} queries; 97th percentile of clients is 40"],
            source_ips=["203.0.113.7"],
            closed=closed,
            peak_kind_scores={"extraction": value},
        )


def make(alertmanager_url: str) -> tuple[AlertPolicy, Dispatcher, AlertmanagerReceiver]:
    policy = AlertPolicy(PolicySettings(cooldown_s=0.5, renotify_s=0, resolve_after_s=3600, max_per_minute=100))
    receiver = AlertmanagerReceiver(
        "alertmanager", alertmanager_url, FORMATTER, refresh_s=1.0, ttl_s=120.0, min_firing_s=3.0
    )
    return policy, Dispatcher([receiver], None, FAST).start(), receiver


def test_one_attack_is_one_group_updates_do_not_repage_resolve_arrives(
    alertmanager_url: str, am_webhook: RecordingServer
) -> None:
    model = f"am-{uuid.uuid4().hex[:8]}"
    policy, dispatcher, _ = make(alertmanager_url)
    attack = Attack(model, "acct-1", time.time() - 300)
    sent: list[Alert] = []
    try:
        sent += policy.evaluate([attack.score()])
        dispatcher.submit(sent)
        assert wait(lambda: pages(am_webhook, model)[("acct-1", "firing")] == 1, 10), "the page never arrived"
        # The attack goes on: a new session of the same client, more queries, updated annotations.
        for session in ("s1", "s2", "s1"):
            time.sleep(0.6)
            update = policy.evaluate([attack.score(session=session)])
            sent += update
            dispatcher.submit(update)
        assert [a.notification for a in sent].count("update") >= 2
        time.sleep(2.5)  # a group_interval and refreshes later: still exactly one page
        assert pages(am_webhook, model) == Counter({("acct-1", "firing"): 1})
        ended = policy.evaluate([attack.score(closed=True, session="s1"), attack.score(closed=True, session="s2")])
        assert [a.notification for a in ended] == ["resolve"]
        dispatcher.submit(ended)
        assert wait(lambda: pages(am_webhook, model)[("acct-1", "resolved")] == 1, 15), "no resolve"
        page = notifications(am_webhook, model)[0]["alerts"][0]
        assert page["labels"]["alertname"] == "ProbewatchExtraction" and page["labels"]["severity"] == "warning"
        assert page["labels"]["kind"] == "extraction" and page["labels"]["client_id"] == "acct-1"
        assert "var-client=acct-1" in page["generatorURL"]
        assert page["annotations"]["summary"].startswith("[WARNING] extraction suspected — client acct-1")
        print("\n--- the page, as Alertmanager delivered it ---\n" + page["annotations"]["description"])
    finally:
        dispatcher.close()
    assert pages(am_webhook, model) == Counter({("acct-1", "firing"): 1, ("acct-1", "resolved"): 1})


def test_attacks_across_an_alertmanager_outage_arrive_every_one_once(
    alertmanager_url: str, am_webhook: RecordingServer, services_ctl: Any
) -> None:
    model = f"am-{uuid.uuid4().hex[:8]}"
    policy, dispatcher, _ = make(alertmanager_url)
    t0 = time.time() - 600
    attacks = {f"acct-{i}": Attack(model, f"acct-{i}", t0) for i in range(6)}
    all_alerts: list[Alert] = []

    def step(scores: list[SessionScore]) -> None:
        alerts = policy.evaluate(scores)
        all_alerts.extend(alerts)
        dispatcher.submit(alerts)

    try:
        # Before the outage: acct-0 and acct-1 page.
        step([attacks["acct-0"].score(), attacks["acct-1"].score()])
        assert wait(lambda: sum(1 for (_, s) in pages(am_webhook, model).elements() if s == "firing") == 2, 10)
        services_ctl("alertmanager", "stop")
        # During the outage: acct-0 ends; acct-2..4 start; acct-4 starts AND ends; updates for acct-1.
        step([attacks["acct-0"].score(closed=True)])
        step([attacks["acct-2"].score(), attacks["acct-3"].score(), attacks["acct-4"].score()])
        time.sleep(0.6)
        step([attacks["acct-1"].score(), attacks["acct-4"].score(closed=True)])
        time.sleep(1.5)
        assert dispatcher.stats()["alertmanager"].retries >= 1
        services_ctl("alertmanager", "start")
        # After: acct-5 starts; acct-2 ends.
        step([attacks["acct-5"].score()])
        time.sleep(0.6)
        step([attacks["acct-2"].score(closed=True)])
        expected = Counter(
            {(f"acct-{i}", "firing"): 1 for i in range(6)} | {(f"acct-{i}", "resolved"): 1 for i in (0, 2, 4)}
        )
        assert wait(lambda: pages(am_webhook, model) == expected, 30), pages(am_webhook, model)
        time.sleep(2.5)  # refreshes and a group interval later: nothing more
    finally:
        dispatcher.close()
    got = pages(am_webhook, model)
    assert got == expected, got
    incidents = {a.dedup_key for a in all_alerts if a.notification == "new"}
    assert len(incidents) == 6
    lost = [c for c in attacks if got[(c, "firing")] == 0]
    duplicated = [k for k, v in got.items() if v > 1]
    print(
        f"\n6 attacks -> {len({c for c, s in got if s == 'firing'})} incidents paged at Alertmanager, "
        f"{sum(v for (c, s), v in got.items() if s == 'resolved')} resolved, lost {len(lost)}, "
        f"duplicated {len(duplicated)}, across an Alertmanager stop/start"
    )
    assert not lost and not duplicated
