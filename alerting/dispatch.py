"""Delivery that survives faults: the pipeline hands alerts over and never waits; one background lane
per receiver delivers them in order, with exponential backoff and jitter, and records every outcome in
the outbox. Every alert is in the outbox (ClickHouse ``alerts``) before it is handed over, so what a
crash, a full queue or a receiver outage leaves undelivered is found again by the outbox sweep
(``undelivered``) at start and every ``sweep_s``, and delivered with the same dedup key.

Per receiver the order is kept: a failing head blocks its lane (an outage is receiver-wide, and a
resolve must never overtake its firing). A notification older than one already delivered for the same
incident is recorded as superseded instead of sent (a sweep may find it late). Delivery states:
``delivered``, ``retrying`` (attempts so far, last error), ``failed`` (the receiver refused it: 4xx),
``skipped`` (below the receiver's min_severity), ``superseded``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgspec

from alerting.alert import Alert, severity_rank
from alerting.receivers import DeliveryError

log = logging.getLogger(__name__)

DELIVERY_STATES = ("delivered", "retrying", "failed", "skipped", "superseded")
# States after which an alert is never sent to that receiver again.
FINAL_STATES = ("delivered", "failed", "skipped", "superseded")


class DeliveryRecord(msgspec.Struct, kw_only=True):
    alert_id: str
    dedup_key: str
    receiver: str
    status: str  # one of DELIVERY_STATES
    attempts: int
    error: str = ""
    at: float = 0.0  # wall clock (delivery is the one thing timed by the wall clock)


class Outbox(Protocol):
    def record_deliveries(self, rows: list[DeliveryRecord]) -> None: ...

    def undelivered(self, receivers: list[str], limit: int) -> list[tuple[Alert, str]]: ...


class Receiver(Protocol):
    name: str

    def send(self, alerts: list[Alert]) -> None: ...

    def close(self) -> None: ...


class DeliverySettings(msgspec.Struct, kw_only=True):
    queue_max: int = 10_000  # per receiver; past it alerts wait in the outbox for the next sweep
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    sweep_s: float = 30.0  # how often the outbox is searched for undelivered alerts
    sweep_limit: int = 1000
    tick_s: float = 1.0  # receivers' housekeeping (Alertmanager re-sends, held resolves)
    shutdown_timeout_s: float = 10.0


class LaneStats(msgspec.Struct):
    delivered: int = 0
    retries: int = 0
    failed: int = 0
    skipped: int = 0
    superseded: int = 0
    dropped: int = 0  # not queued (queue full); still in the outbox
    recovered: int = 0  # found by an outbox sweep
    queued: int = 0
    last_error: str = ""


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped."""
    ceiling = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _mark(alert: Alert) -> tuple[float, int, float, bool]:
    """Orders the notifications of one dedup key: incident start, sequence, event time (notifications
    of an incident never go back in time), resolve last."""
    return (alert.first_seen, alert.seq, alert.event_time, alert.status == "resolved")


class _Lane(threading.Thread):
    def __init__(self, receiver: Any, outbox: Outbox | None, settings: DeliverySettings, rng: random.Random) -> None:
        super().__init__(name=f"alerts-{receiver.name}", daemon=True)
        self.receiver = receiver
        self.outbox = outbox
        self.settings = settings
        self.rng = rng
        self.min_rank = severity_rank(getattr(receiver, "min_severity", "info"))
        self.max_batch = max(1, int(getattr(receiver, "max_batch", 100)))
        self.queue: deque[Alert] = deque()
        self.ids: set[str] = set()
        self.recent: OrderedDict[str, None] = OrderedDict()  # ids recently finished (bounded)
        self.sent: dict[str, tuple[float, int, float, bool]] = {}  # dedup_key -> newest delivered mark
        self.cond = threading.Condition()
        self.stats = LaneStats()
        self.attempts = 0
        self.next_try = 0.0
        self.busy = False
        self.stopping = False
        self.deadline = float("inf")
        self._tick_logged = float("-inf")

    # ------------------------------------------------------------------------------- producer side
    def offer(self, alerts: Iterable[Alert], recovered: bool = False) -> None:
        with self.cond:
            for alert in alerts:
                if alert.alert_id in self.ids or alert.alert_id in self.recent:
                    continue
                if len(self.queue) >= self.settings.queue_max:
                    self.stats.dropped += 1
                    continue
                self.queue.append(alert)
                self.ids.add(alert.alert_id)
                if recovered:
                    self.stats.recovered += 1
            self.stats.queued = len(self.queue)
            self.cond.notify()

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.busy and not getattr(self.receiver, "pending", lambda: 0)()

    def stop(self, timeout: float) -> None:
        with self.cond:
            self.stopping = True
            self.deadline = time.monotonic() + timeout
            self.cond.notify()

    # ---------------------------------------------------------------------------------- the lane
    def run(self) -> None:
        next_sweep = 0.0 if self.outbox is not None else float("inf")
        next_tick = 0.0 if hasattr(self.receiver, "tick") else float("inf")
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    ready = bool(self.queue) and now >= self.next_try
                    if self.stopping:
                        if not self.queue or now >= self.deadline or (self.attempts and self.next_try > self.deadline):
                            self.stats.queued = len(self.queue)
                            return
                        if ready:
                            break
                    elif ready or now >= next_sweep or now >= next_tick:
                        break
                    wake = min(next_sweep, next_tick, self.deadline)
                    if self.queue:
                        wake = min(wake, self.next_try)
                    self.cond.wait(timeout=max(0.01, min(wake - now, 5.0)))
                batch = list(self.queue)[: self.max_batch] if ready else []
                self.busy = bool(batch)
            try:
                if not self.stopping and now >= next_sweep:
                    next_sweep = now + self.settings.sweep_s
                    self._sweep()
                if not self.stopping and now >= next_tick:
                    next_tick = now + self.settings.tick_s
                    self._tick()
                if batch:
                    self._deliver(batch)
            except Exception:  # a bug here must not kill the lane
                log.exception("alert lane %s", self.receiver.name)
            finally:
                with self.cond:
                    self.busy = False
                    self.stats.queued = len(self.queue)

    def _sweep(self) -> None:
        assert self.outbox is not None
        room = self.settings.queue_max - len(self.queue)
        if room <= 0:
            return
        try:
            found = self.outbox.undelivered([self.receiver.name], min(room, self.settings.sweep_limit))
        except Exception as exc:
            log.warning("alerts: cannot read undelivered alerts for %s: %s", self.receiver.name, exc)
            return
        alerts = [alert for alert, receiver in found if receiver == self.receiver.name]
        alerts.sort(key=lambda a: (a.event_time, a.first_seen, a.seq))
        if alerts:
            log.info("alerts: %d undelivered alerts for %s found in the outbox", len(alerts), self.receiver.name)
            self.offer(alerts, recovered=True)

    def _tick(self) -> None:
        try:
            self.receiver.tick()
        except DeliveryError as exc:
            self.stats.last_error = str(exc)
            now = time.monotonic()
            if now - self._tick_logged >= 60.0:  # an outage would otherwise log every tick
                self._tick_logged = now
                log.warning("alerts: %s re-send of active alerts failed: %s", self.receiver.name, exc)

    def _finish(self, alerts: Sequence[Alert]) -> None:
        with self.cond:
            for alert in alerts:
                if self.queue and self.queue[0].alert_id == alert.alert_id:
                    self.queue.popleft()
                else:  # not at the head (cannot happen: only this thread pops); remove anyway
                    with contextlib.suppress(ValueError):
                        self.queue.remove(alert)
                self.ids.discard(alert.alert_id)
                self.recent[alert.alert_id] = None
            while len(self.recent) > 50_000:
                self.recent.popitem(last=False)

    def _record(self, rows: list[DeliveryRecord]) -> None:
        if self.outbox is None or not rows:
            return
        try:
            self.outbox.record_deliveries(rows)
        except Exception as exc:  # delivered all the same; a restart may deliver it again (same dedup key)
            log.warning("alerts: cannot record %d deliveries to %s: %s", len(rows), self.receiver.name, exc)

    def _row(self, alert: Alert, status: str, error: str = "") -> DeliveryRecord:
        return DeliveryRecord(
            alert_id=alert.alert_id,
            dedup_key=alert.dedup_key,
            receiver=self.receiver.name,
            status=status,
            attempts=self.attempts + (status != "skipped"),
            error=error[:500],
            at=time.time(),
        )

    def _deliver(self, batch: list[Alert]) -> None:
        rows: list[DeliveryRecord] = []
        to_send: list[Alert] = []
        for alert in batch:
            mark = _mark(alert)
            if severity_rank(alert.severity) < self.min_rank:
                rows.append(self._row(alert, "skipped"))
                self.stats.skipped += 1
            elif alert.notification != "test" and alert.dedup_key in self.sent and mark <= self.sent[alert.dedup_key]:
                rows.append(self._row(alert, "superseded"))
                self.stats.superseded += 1
            else:
                to_send.append(alert)
        sending = {a.alert_id for a in to_send}
        done = [a for a in batch if a.alert_id not in sending]
        if done:
            self._finish(done)
        if not to_send:
            self._record(rows)
            return
        try:
            self.receiver.send(to_send)
        except Exception as exc:
            error = exc if isinstance(exc, DeliveryError) else DeliveryError(f"{type(exc).__name__}: {exc}")
            ok, head = to_send[: error.delivered], to_send[error.delivered]
            self._delivered(ok, rows)
            self.stats.last_error = str(error)
            if error.retryable:
                rows.append(self._row(head, "retrying", str(error)))
                self.attempts += 1
                self.stats.retries += 1
                delay = backoff_delay(
                    self.attempts, self.settings.backoff_initial_s, self.settings.backoff_max_s, self.rng
                )
                if error.retry_after is not None:
                    delay = max(error.retry_after, 0.05)
                self.next_try = time.monotonic() + delay
                if self.attempts == 1 or self.attempts % 10 == 0:
                    log.warning(
                        "alerts: %s failed (attempt %d, retry in %.1f s): %s",
                        self.receiver.name,
                        self.attempts,
                        delay,
                        error,
                    )
            else:
                log.error("alerts: %s refused alert %s: %s", self.receiver.name, head.alert_id, error)
                rows.append(self._row(head, "failed", str(error)))
                self.stats.failed += 1
                self.attempts = 0
                self._finish([head])
            self._record(rows)
            return
        self._delivered(to_send, rows)
        self._record(rows)

    def _delivered(self, alerts: list[Alert], rows: list[DeliveryRecord]) -> None:
        if not alerts:
            return
        for alert in alerts:
            rows.append(self._row(alert, "delivered"))
            if alert.notification != "test":
                mark = _mark(alert)
                self.sent[alert.dedup_key] = max(mark, self.sent.get(alert.dedup_key, mark))
        self.stats.delivered += len(alerts)
        if self.attempts:
            log.info("alerts: %s delivering again after %d failed attempts", self.receiver.name, self.attempts)
        self.attempts = 0
        self.next_try = 0.0
        self._finish(alerts)


class Dispatcher:
    """Hands alerts to every receiver's lane; never blocks the caller, never raises from a receiver."""

    def __init__(
        self,
        receivers: Sequence[Any],
        outbox: Outbox | None = None,
        settings: DeliverySettings | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.settings = settings or DeliverySettings()
        self.outbox = outbox
        rng = random.Random(seed)
        names = [r.name for r in receivers]
        if len(set(names)) != len(names):
            raise ValueError(f"alert receivers need distinct names, got {names}")
        self.lanes = [_Lane(r, outbox, self.settings, random.Random(rng.random())) for r in receivers]
        self.started = False
        self.closed = False

    @property
    def receivers(self) -> list[Any]:
        return [lane.receiver for lane in self.lanes]

    def start(self) -> Dispatcher:
        if not self.started:
            self.started = True
            for lane in self.lanes:
                lane.start()
        return self

    def submit(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        if not self.started:
            self.start()
        for lane in self.lanes:
            lane.offer(alerts)

    def seed(self, open_alerts: list[Alert]) -> None:
        """Give receivers that re-send active alerts (Alertmanager) the incidents open at start."""
        for lane in self.lanes:
            if hasattr(lane.receiver, "seed"):
                lane.receiver.seed(open_alerts)

    def forget(self, dedup_keys: list[str]) -> None:
        """Stop re-sending these incidents' active alerts (they moved to another worker)."""
        if dedup_keys:
            for lane in self.lanes:
                if hasattr(lane.receiver, "forget"):
                    lane.receiver.forget(dedup_keys)

    def flush(self, timeout: float) -> bool:
        """Wait until every lane is idle (for tests and the CLI); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(lane.idle() for lane in self.lanes):
                return True
            time.sleep(0.02)
        return all(lane.idle() for lane in self.lanes)

    def stats(self) -> dict[str, LaneStats]:
        return {lane.receiver.name: lane.stats for lane in self.lanes}

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued for up to ``timeout`` s, then stop; what is left stays in the
        outbox and is delivered at the next start."""
        if self.closed:
            return
        self.closed = True
        timeout = self.settings.shutdown_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for lane in self.lanes:
            lane.stop(timeout)
        for lane in self.lanes:
            if lane.is_alive():
                lane.join(max(0.0, deadline - time.monotonic()) + 1.0)
            left = len(lane.queue)
            if left:
                log.warning(
                    "alerts: %d alerts for %s not delivered before shutdown; they stay in the outbox",
                    left,
                    lane.receiver.name,
                )
        for lane in self.lanes:
            try:
                lane.receiver.close()
            except Exception as exc:
                log.warning("alerts: closing %s: %s", lane.receiver.name, exc)


def test_alert(severity: str = "warning", now: float | None = None) -> Alert:
    """The alert `probewatch alerts test` sends: clearly a test, one per run (its own id)."""
    now = time.time() if now is None else now
    return Alert(
        alert_id=f"test-{int(now * 1000):x}",
        dedup_key="probewatch-test|probewatch-test|test",
        status="firing",
        kind="test",
        model_id="probewatch-test",
        client_id="probewatch-test",
        session_id="test",
        severity=severity,  # type: ignore[arg-type]
        score=1.0,
        n_queries=0,
        event_time=now,
        first_seen=now,
        reasons=["test: sent by `probewatch alerts test` to check this receiver; no action needed"],
        source_ips=["192.0.2.1"],
        summary="probewatch test alert",
        notification="test",
    )


def deliver_now(receiver: Any, alerts: list[Alert], attempts: int = 3, max_wait_s: float = 10.0) -> None:
    """Deliver synchronously with a few retries (for `probewatch alerts test`); raises DeliveryError."""
    for attempt in range(1, attempts + 1):
        try:
            receiver.send(alerts)
            return
        except DeliveryError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            alerts = alerts[exc.delivered :]
            time.sleep(min(max_wait_s, exc.retry_after if exc.retry_after is not None else 0.5 * attempt))
        except Exception as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retryable=False) from None
