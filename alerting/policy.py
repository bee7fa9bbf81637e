"""The alert policy: from session scores to alerts, one incident per (model, client, kind)."""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

import msgspec

from alerting.alert import ROLLUP_KIND, SEVERITIES, Alert, AlertStatus, Severity, severity_rank
from detectors.engine import next_evaluation
from detectors.scores import SessionScore


def severity_for(score: float, threshold: float) -> Severity:
    """Severity follows the calibrated score: the threshold is a warning, near-certainty critical."""
    if score >= 0.97:
        return "critical"
    if score >= max(threshold, 0.9):
        return "high"
    if score >= threshold:
        return "warning"
    return "info"


def alert_id_for(dedup_key: str, status: str, event_time: float, n_queries: int) -> str:
    """Deterministic: a replayed micro-batch yields the same id, so duplicates can be dropped."""
    raw = f"{dedup_key}|{status}|{event_time:.3f}|{n_queries}".encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def dedup_key_for(model_id: str, client_id: str, kind: str) -> str:
    return f"{model_id}|{client_id}|{kind}"


# ------------------------------------------------------------------------------------ incident policy
ROLLUP_KEY = dedup_key_for("*", "*", ROLLUP_KIND)  # the roll-up of a single worker (see rollup_client)


def rollup_client(slot: int) -> str:
    """The client id of a worker's roll-up incident: it goes with partition ``slot``, the lowest the
    worker read when it was opened; "*" for partition 0, which a single worker reads."""
    return "*" if slot == 0 else f"*p{slot}"


def rollup_slot(client_id: str) -> int | None:
    """The partition a roll-up incident goes with (client ids from rollup_client; None otherwise)."""
    if client_id == "*":
        return 0
    if client_id.startswith("*p") and client_id[2:].isdigit():
        return int(client_id[2:])
    return None


class PolicySettings(msgspec.Struct, kw_only=True):
    """The knobs of AlertPolicy (from ``[alerting]``); every duration is EVENT time, in seconds."""

    threshold: float = 0.8
    # Minimum event time between two notifications of one open incident, unless the severity rises;
    # also: a key that crosses again within cooldown_s of its resolve re-opens the same incident.
    cooldown_s: float = 600.0
    # An open incident is notified again (a reminder, with fresh annotations) this often; 0 disables.
    renotify_s: float = 3600.0
    # An incident resolves when its sessions have ended, or when no evaluation of it has reached the
    # threshold for this long.
    resolve_after_s: float = 1800.0
    # At most this many NEW incidents paged per minute (sliding, event time); past it, new incidents
    # join ONE roll-up incident ("alert_storm") until the storm is over. 0 disables the cap. In a
    # group of workers this is the group's: each pages its share (see AlertPolicy.share_pages).
    max_per_minute: int = 20
    # fnmatch patterns of client ids / model ids that never alert (load tests, internal scanners).
    suppress_clients: list[str] = msgspec.field(default_factory=list)
    suppress_models: list[str] = msgspec.field(default_factory=list)


class _Incident:
    __slots__ = (
        "client_id",
        "dirty",
        "event_time",
        "generation",
        "key",
        "kind",
        "last_above",
        "last_alert",
        "last_notified",
        "members",
        "members_total",
        "model_id",
        "n_queries",
        "opened_at",
        "reasons",
        "restored",
        "rollup",
        "score",
        "seq",
        "session_id",
        "sessions",
        "severity",
        "signals",
        "source_ips",
    )

    def __init__(self, key: str, model_id: str, client_id: str, kind: str, opened_at: float) -> None:
        self.key = key
        self.model_id = model_id
        self.client_id = client_id
        self.kind = kind
        self.opened_at = opened_at
        self.event_time = opened_at
        self.last_above = opened_at
        self.last_notified = opened_at
        self.severity: Severity = "info"
        self.score = 0.0
        self.n_queries = 0
        self.session_id = ""
        self.sessions: set[str] = set()
        self.reasons: list[str] = []
        self.signals: dict[str, float] = {}
        self.source_ips: list[str] = []
        self.seq = -1  # incremented before each notification
        self.generation = 0  # times this incident (same start) was re-opened within the cooldown
        self.dirty = False
        self.rollup = False  # a member of the storm roll-up: tracked, never notified on its own
        self.restored = False
        self.members: set[str] = set()  # roll-up only: keys of its open member incidents
        self.members_total = 0
        self.last_alert: Alert | None = None


def _is_evaluation(score: SessionScore) -> bool:
    """True for the detector's scheduled evaluations (fixed query counts) and final scores; False for
    the snapshots it emits at batch ends (source-group scores are made at member evaluations only).
    Only evaluations drive alerts, so alerts do not depend on where the stream was cut into batches."""
    n = score.n_queries
    if score.members:  # a source group's score: made at a member's evaluation
        return True
    return score.closed or bool(score.crossed_kinds) or (n > 0 and next_evaluation(n - 1) == n)


class AlertPolicy:
    """From session scores to incidents: one incident per (model, client, kind), however many sessions
    and evaluations it spans; notifications for its opening, escalations, coalesced updates, reminders
    and its resolve; a global cap on pages per minute with one roll-up incident past it; suppression.

    Time is the scores' EVENT time: the policy's clock is the newest event time seen (its watermark),
    so a replay of the same log yields the same notifications with the same ids. State: the open
    incidents. It survives a restart through the outbox: ``restore`` takes the stored alerts (the last
    notification of each incident says whether it is open, since when, its sequence number) — see
    ``restore`` for what is approximated. Members of a roll-up are not in the outbox and start afresh.
    """

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self.threshold = self.settings.threshold
        self.incidents: dict[str, _Incident] = {}
        # key -> (opened_at, seq, generation, resolved_at) of resolved incidents: evidence older than
        # the resolve never re-opens; newer evidence within the cooldown re-opens the same incident.
        self.resolved: dict[str, tuple[float, int, int, float]] = {}
        self.watermark = float("-inf")
        self.pages: list[float] = []  # event times of recent pages, sorted
        self.suppressed = 0  # evaluations above the threshold that suppression dropped
        self.rolled_up = 0  # incidents that joined a roll-up instead of paging
        self.page_cap = self.settings.max_per_minute  # this worker's (see share_pages)
        self.rollup_client = rollup_client(0)
        self.rollup_key = ROLLUP_KEY

    def share_pages(self, share: float, slot: int) -> None:
        """One of several workers, reading ``share`` of the stream and partitions from ``slot`` up:
        it pages at most its share of ``max_per_minute`` (at least one a minute), so the workers
        together page about as many; and a storm past that gets a roll-up incident of its own, which
        goes with partition ``slot``, so one worker's storm ending never resolves another's (a
        roll-up shared by its key would flap, resolved and re-opened by turns)."""
        cap = self.settings.max_per_minute
        self.page_cap = max(1, math.ceil(cap * share)) if cap > 0 else 0
        self.rollup_client = rollup_client(slot)
        self.rollup_key = dedup_key_for("*", self.rollup_client, ROLLUP_KIND)

    # ---------------------------------------------------------------------------------- helpers
    def _suppressed(self, model_id: str, client_id: str) -> bool:
        s = self.settings
        return any(fnmatch.fnmatchcase(client_id, p) for p in s.suppress_clients) or any(
            fnmatch.fnmatchcase(model_id, p) for p in s.suppress_models
        )

    def _notify(self, inc: _Incident, status: AlertStatus, notification: str, at: float) -> Alert:
        if inc.last_alert is not None:  # an incident's notifications never go back in time
            at = max(at, inc.last_alert.event_time)
        inc.seq += 1
        inc.dirty = False
        inc.last_notified = max(inc.last_notified, at) if notification != "new" else at
        # The opening and the resolve of an incident have ids that do not depend on how many updates
        # came between (which depends on batch cuts); the others are numbered.
        tail = notification if notification in ("new", "resolve") else f"{notification}|{inc.seq}|{at:.3f}"
        raw = f"{inc.key}|{inc.opened_at:.3f}|{inc.generation}|{tail}".encode()
        alert = Alert(
            alert_id=hashlib.sha256(raw).hexdigest()[:24],
            dedup_key=inc.key,
            status=status,
            kind=inc.kind,
            model_id=inc.model_id,
            client_id=inc.client_id,
            session_id=inc.session_id,
            severity=inc.severity,
            score=inc.score,
            n_queries=inc.n_queries,
            event_time=at,
            first_seen=inc.opened_at,
            reasons=list(inc.reasons),
            signals=dict(inc.signals),
            source_ips=list(inc.source_ips),
            summary=_summary(inc, status),
            notification=notification,
            seq=inc.seq,
        )
        inc.last_alert = alert
        return alert

    def _absorb(self, inc: _Incident, score: SessionScore, kind: str, value: float) -> bool:
        """Fold one above-threshold evaluation into the incident; True if the severity rose."""
        peak = max(value, score.peak_kind_scores.get(kind, value))
        before = severity_rank(inc.severity)
        inc.score = max(inc.score, peak)
        inc.severity = severity_for(inc.score, self.threshold)
        inc.event_time = max(inc.event_time, score.event_time)
        inc.last_above = max(inc.last_above, score.event_time)
        if score.session_id not in inc.sessions or score.client_queries != inc.n_queries:
            inc.dirty = True
        inc.sessions.add(score.session_id)
        inc.session_id = score.session_id
        inc.n_queries = max(inc.n_queries, score.client_queries)
        inc.reasons = [r for r in score.reasons if r.startswith(f"{kind}:")] or list(score.reasons)
        inc.signals = dict(score.signals)
        for ip in score.source_ips:
            if ip not in inc.source_ips and len(inc.source_ips) < 16:
                inc.source_ips.append(ip)
        return severity_rank(inc.severity) > before

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, scores: Sequence[SessionScore]) -> list[Alert]:
        out: list[Alert] = []
        newest = self.watermark
        for score in scores:
            newest = max(newest, score.event_time)
            if self._suppressed(score.model_id, score.client_id):
                self.suppressed += sum(1 for v in score.kind_scores.values() if v >= self.threshold)
                continue
            evaluation = _is_evaluation(score)
            for kind, value in score.kind_scores.items():
                key = dedup_key_for(score.model_id, score.client_id, kind)
                inc = self.incidents.get(key)
                if evaluation and value >= self.threshold:
                    if inc is None:
                        if kind in score.crossed_kinds or (
                            not score.closed and score.event_time > self.resolved.get(key, (0, 0, 0, -1.0))[3]
                        ):
                            self._open(key, score, kind, value, out)
                    elif self._absorb(inc, score, kind, value) and not inc.rollup:
                        out.append(self._notify(inc, "firing", "escalation", score.event_time))
                    elif inc.rollup:
                        self._touch_rollup(inc)
                inc = self.incidents.get(key)
                if inc is not None and score.closed:
                    inc.sessions.discard(score.session_id)
                    if not inc.sessions:
                        self._resolve(inc, max(score.event_time, inc.event_time), out)
        if newest > self.watermark:
            self.watermark = newest
        self._tick(out)
        return out

    def _open(self, key: str, score: SessionScore, kind: str, value: float, out: list[Alert]) -> None:
        at = score.event_time
        inc = _Incident(key, score.model_id, score.client_id, kind, min(score.first_seen, at))
        previous = self.resolved.pop(key, None)
        if previous is not None and at - previous[3] < self.settings.cooldown_s:
            # Flapping: the same incident again.
            inc.opened_at, inc.seq, inc.generation = previous[0], previous[1], previous[2] + 1
        inc.last_notified = at
        self._absorb(inc, score, kind, value)
        self.incidents[key] = inc
        cap = self.page_cap
        # Scores of one batch come grouped by session, not in time order: count pages in (at-60, at].
        del self.pages[: bisect.bisect_right(self.pages, self.watermark - 600.0)]
        recent = bisect.bisect_right(self.pages, at) - bisect.bisect_right(self.pages, at - 60.0)
        storm = self.incidents.get(self.rollup_key)
        if storm is not None or (cap > 0 and recent >= cap):
            inc.rollup = True
            self.rolled_up += 1
            self._join_rollup(inc, out)
            return
        bisect.insort(self.pages, at)
        out.append(self._notify(inc, "firing", "new", at))

    def _join_rollup(self, member: _Incident, out: list[Alert]) -> None:
        storm = self.incidents.get(self.rollup_key)
        if storm is None:
            storm = _Incident(self.rollup_key, "*", self.rollup_client, ROLLUP_KIND, member.event_time)
            self.incidents[self.rollup_key] = storm
            storm.members.add(member.key)
            storm.members_total = 1
            self._refresh_rollup(storm)
            out.append(self._notify(storm, "firing", "new", member.event_time))
            return
        storm.members.add(member.key)
        storm.members_total += 1
        self._touch_rollup(member)

    def _touch_rollup(self, member: _Incident) -> None:
        storm = self.incidents.get(self.rollup_key)
        if storm is None:
            return
        storm.members.add(member.key)
        storm.last_above = max(storm.last_above, member.last_above)
        storm.event_time = max(storm.event_time, member.event_time)
        storm.dirty = True

    def _refresh_rollup(self, storm: _Incident) -> bool:
        """Recompute the roll-up's annotations from its open members; True if its severity rose."""
        members = [self.incidents[k] for k in sorted(storm.members) if k in self.incidents]
        storm.members = {m.key for m in members}
        if not members:
            return False
        before = severity_rank(storm.severity)
        members.sort(key=lambda m: (-m.score, m.key))
        storm.score = max(storm.score, members[0].score)
        storm.severity = max((m.severity for m in members), key=lambda sev: severity_rank(sev), default=storm.severity)
        if severity_rank(storm.severity) < before:
            storm.severity = SEVERITIES[before]
        storm.n_queries = sum(m.n_queries for m in members)
        storm.session_id = members[0].session_id
        storm.last_above = max(storm.last_above, max(m.last_above for m in members))
        storm.event_time = max(storm.event_time, max(m.event_time for m in members))
        storm.signals = {
            "open_incidents": float(len(members)),
            "incidents_total": float(storm.members_total),
            "clients": float(len({m.client_id for m in members})),
            "models": float(len({m.model_id for m in members})),
        }
        storm.reasons = [
            f"client {m.client_id} on model {m.model_id}: {m.kind} {m.score:.2f}, {m.n_queries:,} queries"
            + (f" — {m.reasons[0]}" if m.reasons else "")
            for m in members[:10]
        ]
        if len(members) > 10:
            storm.reasons.append(f"… and {len(members) - 10} more incidents")
        ips: list[str] = []
        for m in members:
            ips.extend(ip for ip in m.source_ips if ip not in ips)
        storm.source_ips = ips[:20]
        return severity_rank(storm.severity) > before

    def _resolve(self, inc: _Incident, at: float, out: list[Alert]) -> None:
        self.incidents.pop(inc.key, None)
        if inc.key == self.rollup_key:
            out.append(self._notify(inc, "resolved", "resolve", at))
        elif inc.rollup:
            storm = self.incidents.get(self.rollup_key)
            if storm is not None:
                storm.members.discard(inc.key)
                storm.dirty = True
            return  # members were never paged on their own, so neither is their end
        else:
            out.append(self._notify(inc, "resolved", "resolve", at))
        self.resolved[inc.key] = (inc.opened_at, inc.seq, inc.generation, at)

    def _tick(self, out: list[Alert]) -> None:
        """The event-time clock moved: time-outs, coalesced updates, reminders, the roll-up."""
        s = self.settings
        now = self.watermark
        for key in sorted(self.incidents):
            inc = self.incidents.get(key)
            # This worker's roll-up is handled below. Another roll-up (restored from the outbox, or
            # this worker's before its partitions moved) has no members: it ends as an incident does.
            if inc is None or key == self.rollup_key:
                continue
            if inc.restored:  # restored from the outbox: its quiet time counts from the restart
                inc.restored = False
                inc.last_above = max(inc.last_above, now)
                inc.last_notified = max(inc.last_notified, now - s.cooldown_s)
            if now - inc.last_above >= s.resolve_after_s:
                self._resolve(inc, inc.last_above + s.resolve_after_s, out)
            elif not inc.rollup:
                self._maybe_update(inc, now, out)
        storm = self.incidents.get(self.rollup_key)
        if storm is not None:
            if storm.restored:
                storm.restored = False
                storm.last_above = max(storm.last_above, now)
            escalated = self._refresh_rollup(storm)
            # A restored roll-up does not know its members (they are not in the outbox): it ends
            # after resolve_after_s without a new member.
            if not storm.members and (storm.members_total or now - storm.last_above >= s.resolve_after_s):
                self._resolve(storm, now, out)
            elif escalated:
                out.append(self._notify(storm, "firing", "escalation", now))
            else:
                self._maybe_update(storm, now, out)
        horizon = max(s.cooldown_s, s.resolve_after_s) * 4
        for key, (_, _, _, resolved_at) in list(self.resolved.items()):
            if now - resolved_at >= horizon:
                del self.resolved[key]

    def _maybe_update(self, inc: _Incident, now: float, out: list[Alert]) -> None:
        s = self.settings
        quiet = now - inc.last_notified
        if inc.dirty and quiet >= s.cooldown_s:
            out.append(self._notify(inc, "firing", "update", now))
        elif s.renotify_s > 0 and quiet >= s.renotify_s:
            out.append(self._notify(inc, "firing", "reminder", now))

    # ---------------------------------------------------------------------------------- restart
    def restore(self, alerts: Iterable[Alert], keep: Callable[[Alert], bool] | None = None) -> int:
        """Rebuild the open incidents from stored alerts (the outbox); returns how many are open.

        The newest notification of each dedup key decides: firing → the incident is open, with its
        start, sequence, severity and annotations; resolved → it is remembered for the cooldown.
        Approximations: the evidence since the last notification is not in the outbox, so a restored
        incident's quiet time (resolve_after_s) and cooldown count from the first batch after the
        restart (a late resolve, never an early one); its open sessions are the last one notified.
        ``keep`` filters (e.g. to the clients whose partitions this worker owns)."""
        latest: dict[str, Alert] = {}
        for alert in alerts:
            if alert.notification == "test" or (keep is not None and not keep(alert)):
                continue
            seen = latest.get(alert.dedup_key)
            if seen is None or (alert.seq, alert.event_time) > (seen.seq, seen.event_time):
                latest[alert.dedup_key] = alert
        restored = 0
        for key, alert in latest.items():
            if alert.status == "resolved":
                self.resolved[key] = (alert.first_seen, alert.seq, 0, alert.event_time)
                self.incidents.pop(key, None)
                continue
            inc = _Incident(key, alert.model_id, alert.client_id, alert.kind, alert.first_seen)
            inc.event_time = inc.last_above = inc.last_notified = alert.event_time
            inc.severity, inc.score, inc.n_queries = alert.severity, alert.score, alert.n_queries
            inc.session_id = alert.session_id
            if alert.session_id and alert.kind != ROLLUP_KIND:
                inc.sessions.add(alert.session_id)
            inc.reasons, inc.signals = list(alert.reasons), dict(alert.signals)
            inc.source_ips = list(alert.source_ips)
            inc.seq = alert.seq
            inc.restored = True
            inc.last_alert = alert
            self.incidents[key] = inc
            restored += 1
        return restored

    def forget(self, owned_elsewhere: Callable[[str, str, str], bool]) -> list[str]:
        """Drop the open incidents now owned by another worker, by (model, client, kind): after a
        rebalance, it rebuilds them from the outbox. Roll-ups too (their client from rollup_client).
        Returns their dedup keys."""
        gone = [key for key, inc in self.incidents.items() if owned_elsewhere(inc.model_id, inc.client_id, inc.kind)]
        for key in gone:
            del self.incidents[key]
            self.resolved.pop(key, None)
        return gone

    def open_alerts(self) -> list[Alert]:
        """The latest notification of every open, notified incident (for receivers that need the
        active set re-sent, like Alertmanager)."""
        return [
            inc.last_alert
            for inc in self.incidents.values()
            if inc.last_alert is not None and not inc.rollup and inc.last_alert.status == "firing"
        ]


def _summary(inc: _Incident, status: str) -> str:
    if inc.kind == ROLLUP_KIND:
        n = int(inc.signals.get("open_incidents", len(inc.members)))
        text = f"alert storm: {n} suspicious clients at once (paging capped; see the list)"
        return f"RESOLVED: {text}" if status == "resolved" else text
    text = (
        f"{inc.kind.replace('_', ' ')} suspected from client {inc.client_id} on model {inc.model_id} "
        f"(score {inc.score:.2f}, {inc.n_queries:,} queries)"
    )
    return f"RESOLVED: {text}" if status == "resolved" else text
