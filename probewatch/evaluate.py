"""Offline evaluation: run the detectors over a labelled query log and measure them.

The log goes straight through the record decoder, :class:`SessionDetector` and the production
:class:`AlertPolicy` (no storage, no Kafka, no per-minute page cap), in micro-batches like the live
pipeline. Per attack
kind and variant: detection rate (an attacker is detected when any alert fires for it; "right kind"
when an alert of its own kind does), queries-to-detection (the attacker's query count when its first
alert fired: median and 90th percentile), and the false-positive rate over benign clients, overall
and per benign variant. A multi-key (Sybil) attacker counts once: detected when any of its keys is
alerted, on its own or through its source group's alert; its queries-to-detection is the sum over all
its keys (what the attacker had spent). A source group's alert counts against every member it names,
so a benign client behind a flagged NAT is a false positive.

With ``workers`` > 1 the log is split as a consumer group would split it: each record goes to the
partition of its client id under Kafka's default partitioner (murmur2 of the key, as a producer
keyed by client id writes it), one partition per worker, and each worker has its own detector (its
own sessions, as in production). Their population baselines and source groups are shared as in
production: each worker's epoch contributions and group digests go to one population log, which
every worker folds in order before its next batch; ``shared_baselines=False`` gives each worker its
own instead. What scaling out costs in detection is then measured, not guessed.
"""

from __future__ import annotations

import gzip
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np
from kafka.partitioner import murmur2

from alerting.policy import AlertPolicy, PolicySettings
from detectors.engine import SessionDetector
from detectors.scores import SessionScore
from ingest.records import QueryRecord, RecordDecoder, SourcePosition
from probewatch.config import DetectionConfig


class ClientOutcome(msgspec.Struct):
    client_id: str
    model_id: str
    label: str
    variant: str
    group: str | None = None
    queries: int = 0
    first_alert_queries: int | None = None
    first_alert_kind: str | None = None
    right_kind_queries: int | None = None
    kinds: list[str] = msgspec.field(default_factory=list)
    reason: str = ""
    # Alerted through its source group's alert (keys sharing a network), not (yet) on its own.
    via_group: bool = False


class EvalReport(msgspec.Struct):
    records: int
    dead_lettered: int
    elapsed_s: float
    events_per_s: float
    max_session_state_bytes: int
    median_session_state_bytes: float
    population_state_bytes: int
    warming_up_scores: int
    scores: int
    outcomes: list[ClientOutcome]
    workers: int = 1
    shared_baselines: bool = False

    # ----------------------------------------------------------------------------------- summaries
    def attackers(self) -> list[ClientOutcome]:
        return [o for o in self.outcomes if o.label != "benign"]

    def benign(self) -> list[ClientOutcome]:
        return [o for o in self.outcomes if o.label == "benign"]

    def false_positive_rate(self) -> float:
        benign = self.benign()
        return sum(o.first_alert_queries is not None for o in benign) / len(benign) if benign else 0.0

    def detection_rate(self) -> float:
        groups = _groups(self.attackers())
        return (
            sum(any(o.first_alert_queries is not None for o in g) for g in groups.values()) / len(groups)
            if (groups)
            else 0.0
        )


def _groups(outcomes: list[ClientOutcome]) -> dict[str, list[ClientOutcome]]:
    groups: dict[str, list[ClientOutcome]] = defaultdict(list)
    for o in outcomes:
        groups[o.group or o.client_id].append(o)
    return groups


def _read_lines(path: str) -> Iterator[bytes]:
    opener: Callable[..., IO[bytes]] = gzip.open if path.endswith(".gz") else open  # type: ignore[assignment]
    with opener(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\n")


def read_truth(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    truth: dict[tuple[str, str], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = msgspec.json.decode(line)
            truth[(row["model_id"], row["client_id"])] = row
    return truth


def evaluate(
    log_path: str,
    truth_path: str,
    *,
    batch_records: int = 2000,
    detector_options: dict[str, Any] | None = None,
    workers: int = 1,
    shared_baselines: bool = True,
) -> EvalReport:
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    truth = read_truth(truth_path)
    defaults = DetectionConfig()  # as `probewatch run` without configuration
    options = {
        "alert_threshold": defaults.alert_threshold,
        "min_queries": defaults.min_queries,
        "group_v4_prefix": defaults.group_v4_prefix,
        "group_v6_prefix": defaults.group_v6_prefix,
        **(detector_options or {}),
    }
    shared = shared_baselines and workers > 1
    detectors = [SessionDetector(**options, shared_population=shared, worker_id=str(i)) for i in range(workers)]
    for detector in detectors:
        detector.set_stream_share(1.0 / workers)  # a partition each (see the split below)
    worker_of: dict[str, int] = {}
    population_log: list[tuple[str, bytes]] = []  # shared baselines: every worker's contributions
    read_to = [0] * workers  # how far each worker has folded the population log
    # The production policy, without the per-minute page cap, so that every attacker is counted.
    policy = AlertPolicy(PolicySettings(threshold=detectors[0].alert_threshold, max_per_minute=0))
    decoder = RecordDecoder()
    outcomes = {
        key: ClientOutcome(
            client_id=key[1],
            model_id=key[0],
            label=row["label"],
            variant=row.get("variant", ""),
            group=row.get("group"),
        )
        for key, row in truth.items()
    }
    lines = list(_read_lines(log_path))
    records_total = dead = warming = n_scores = 0
    group_members: dict[tuple[str, str], list[str]] = {}
    truth_groups = _groups([o for o in outcomes.values() if o.group])
    sent = _QueryTimes()
    state_sizes: list[int] = []
    busy = 0.0
    for start in range(0, len(lines), batch_records):
        messages = [
            (line, SourcePosition("eval", 0, start + i), None)
            for i, line in enumerate(lines[start : start + batch_records])
        ]
        records, letters = decoder.decode_batch(messages)
        sent.add(records)
        dead += len(letters)
        records_total += len(messages)
        shares: list[list[QueryRecord]] = [[] for _ in detectors]
        for record in records:
            worker = worker_of.get(record.client_id)
            if worker is None:
                worker = worker_of[record.client_id] = (murmur2(record.client_id.encode()) & 0x7FFFFFFF) % workers
            if workers > 1:
                record.position = SourcePosition("eval", worker, record.position.offset)  # its worker's partition
            shares[worker].append(record)
        t0 = time.perf_counter()
        scores: list[SessionScore] = []
        for i, (detector, share) in enumerate(zip(detectors, shares, strict=True)):
            if shared:
                new = [(offset, *population_log[offset]) for offset in range(read_to[i], len(population_log))]
                read_to[i] = len(population_log)
                scores.extend(detector.fold_population(new))
            scores.extend(detector.process(share))
        if shared:
            for detector in detectors:
                population_log.extend(detector.take_population_contributions())
        alerts = policy.evaluate(scores)
        busy += time.perf_counter() - t0
        for score in scores:
            n_scores += 1
            warming += score.warming_up
            state_sizes.append(score.state_bytes)
            if score.members:
                group_members[(score.model_id, score.client_id)] = score.members
        for alert in alerts:
            if alert.status != "firing":
                continue
            # A source group's alert counts for the members whose evidence made it, each at what it
            # had sent by the alert's event time; a multi-key attacker has spent all its keys' queries.
            members = group_members.get((alert.model_id, alert.client_id))
            for client_id in members or [alert.client_id]:
                outcome = outcomes.get((alert.model_id, client_id))
                if outcome is None:
                    continue
                if outcome.group:
                    keys = [o.client_id for o in truth_groups[outcome.group]]
                    queries = sent.spent(alert.model_id, keys, alert.event_time)
                elif members:
                    queries = sent.spent(alert.model_id, [client_id], alert.event_time)
                else:
                    queries = alert.n_queries
                _record_alert(outcome, alert.kind, queries, alert.reasons, bool(members))
    for detector in detectors:
        for (model_id, client_id), history in detector.clients.items():
            if (model_id, client_id) in outcomes:
                outcomes[(model_id, client_id)].queries = history.queries
    sizes = np.array(state_sizes or [0])
    return EvalReport(
        records=records_total,
        dead_lettered=dead,
        elapsed_s=busy,
        events_per_s=(records_total - dead) / busy if busy else 0.0,
        max_session_state_bytes=int(sizes.max()),
        median_session_state_bytes=float(np.median(sizes)),
        population_state_bytes=sum(p.nbytes() for detector in detectors for p in detector.populations.values()),
        warming_up_scores=warming,
        scores=n_scores,
        outcomes=list(outcomes.values()),
        workers=workers,
        shared_baselines=shared,
    )


class _QueryTimes:
    """Every client's query event times, to count what a client (or a multi-key attacker) had sent
    by the time an alert fired."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], list[float]] = defaultdict(list)

    def add(self, records: list[QueryRecord]) -> None:
        for r in records:
            self.times[(r.model_id, r.client_id)].append(r.ts)

    def spent(self, model_id: str, clients: list[str], at: float) -> int:
        return sum(int((np.asarray(self.times.get((model_id, c), [])) <= at).sum()) for c in clients)


def _record_alert(outcome: ClientOutcome, kind: str, queries: int, reasons: list[str], via_group: bool) -> None:
    if kind not in outcome.kinds:
        outcome.kinds.append(kind)
    if outcome.first_alert_queries is None:
        outcome.first_alert_queries = queries
        outcome.first_alert_kind = kind
        outcome.reason = reasons[0] if reasons else ""
        outcome.via_group = via_group
    if kind == outcome.label and outcome.right_kind_queries is None:
        outcome.right_kind_queries = queries


def _qtd(values: list[int]) -> str:
    if not values:
        return "-"
    arr = np.array(values)
    return f"{np.median(arr):.0f} / {np.percentile(arr, 90):.0f}"


def format_report(report: EvalReport) -> str:
    out: list[str] = []
    out.append(
        f"{report.records} records ({report.dead_lettered} dead-lettered), "
        f"detector {report.events_per_s:,.0f} events/s; "
        f"state per session ≤ {report.max_session_state_bytes / 1024:.1f} KiB (median "
        f"{report.median_session_state_bytes / 1024:.1f} KiB), population baselines "
        f"{report.population_state_bytes / 1024:.0f} KiB; {report.warming_up_scores} of {report.scores} scores "
        "while warming up"
        + (
            f"; {report.workers} workers, population baselines and source groups "
            + ("shared through a population log" if report.shared_baselines else "per worker")
            if report.workers > 1
            else ""
        )
    )
    out.append("")
    header = f"{'attack kind / variant':<34}{'detected':>10}{'right kind':>12}{'queries to detect (median / p90)':>36}"
    out.append(header)
    out.append("-" * len(header))
    attackers = report.attackers()
    for kind in sorted({o.label for o in attackers}):
        members = [o for o in attackers if o.label == kind]
        rows = [(kind, members)] + [
            (f"  {v}", [o for o in members if o.variant == v]) for v in sorted({o.variant for o in members})
        ]
        for name, group in rows:
            groups = _groups(group)
            detected = sum(any(o.first_alert_queries is not None for o in g) for g in groups.values())
            right = sum(any(o.right_kind_queries is not None for o in g) for g in groups.values())
            qtd = [
                min(o.first_alert_queries for o in g if o.first_alert_queries is not None)
                for g in groups.values()
                if any(o.first_alert_queries is not None for o in g)
            ]
            out.append(f"{name:<34}{f'{detected}/{len(groups)}':>10}{f'{right}/{len(groups)}':>12}{_qtd(qtd):>36}")
    benign = report.benign()
    flagged = [o for o in benign if o.first_alert_queries is not None]
    out.append("")
    out.append(f"benign clients flagged: {len(flagged)}/{len(benign)} (FP rate {report.false_positive_rate():.1%})")
    for variant in sorted({o.variant for o in benign}):
        members = [o for o in benign if o.variant == variant]
        fp = [o for o in members if o.first_alert_queries is not None]
        kinds = ", ".join(sorted({k for o in fp for k in o.kinds}))
        out.append(f"  {variant:<18}{len(fp)}/{len(members)}{'  (' + kinds + ')' if kinds else ''}")
    by_group = [o for o in report.outcomes if o.via_group]
    if by_group:
        out.append("")
        out.append(
            f"{len(by_group)} client(s) first alerted through their source group (keys sharing a network): "
            + ", ".join(f"{o.client_id} ({o.variant})" for o in by_group[:12])
            + (" …" if len(by_group) > 12 else "")
        )
    missed = [o for o in attackers if o.first_alert_queries is None and not o.group]
    if missed:
        out.append("")
        out.append("missed attackers: " + ", ".join(f"{o.client_id} ({o.variant})" for o in missed))
    if flagged:
        out.append("")
        out.append("benign alerts:")
        for o in flagged[:10]:
            out.append(f"  {o.client_id} ({o.variant}) at {o.first_alert_queries} queries: {o.reason}")
    return "\n".join(out)
