"""The session engine: event-time sessions, batch-independent scores, checkpoint/restore, bounded state."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pytest

from detectors.engine import SessionDetector, next_evaluation
from detectors.input_model import pinned_at_bounds
from detectors.population import ModelPopulation, PopulationContribution, mix64
from detectors.scores import SessionScore
from ingest.records import QueryRecord, RecordDecoder, SourcePosition
from probewatch.simulate import SimulationPlan, write_simulation


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> list[QueryRecord]:
    path = tmp_path_factory.mktemp("sim") / "logs.jsonl"
    # Enough benign clients for the population baselines to warm up, and attackers that get caught.
    write_simulation(
        SimulationPlan(benign_clients=24, attackers_per_kind=1, queries_per_client=120, attack_delay_s=600), str(path)
    )
    messages = [(line, SourcePosition("f", 0, i), None) for i, line in enumerate(Path(path).read_bytes().splitlines())]
    records, _ = RecordDecoder().decode_batch(messages)
    return records


def small_detector() -> SessionDetector:
    return SessionDetector(min_queries=10, epoch_records=100, min_population=6)


# What the detector says alerts on: (client, session, kind, firing|resolved, client queries, event time).
AlertEvent = tuple[str, str, str, str, int, float]


def alert_events(scores: list[SessionScore], threshold: float) -> list[AlertEvent]:
    events: list[AlertEvent] = []
    for s in scores:
        events += [(s.client_id, s.session_id, k, "firing", s.client_queries, s.event_time) for k in s.crossed_kinds]
        if s.closed:
            events += [
                (s.client_id, s.session_id, k, "resolved", s.client_queries, s.event_time)
                for k, peak in s.peak_kind_scores.items()
                if peak >= threshold
            ]
    return events


def run(records: list[QueryRecord], batch: int, detector: SessionDetector | None = None) -> list[AlertEvent]:
    detector = detector or small_detector()
    events: list[AlertEvent] = []
    for i in range(0, len(records), batch):
        events.extend(alert_events(detector.process(records[i : i + batch]), detector.alert_threshold))
    return events


def ordered(events: list[AlertEvent]) -> list[AlertEvent]:
    # Alerts of different sessions may interleave differently; each one itself must be identical.
    return sorted(events)


def test_evaluation_points_are_fixed_query_counts() -> None:
    assert [next_evaluation(n) for n in (0, 4, 5, 49, 50, 499, 500, 501)] == [5, 5, 10, 50, 75, 500, 600, 600]


def test_alerts_do_not_depend_on_batch_boundaries(simulated: list[QueryRecord]) -> None:
    reference = run(simulated, 5000)
    assert {e[3] for e in reference} == {"firing", "resolved"}
    for batch in (1, 97, 1000):
        assert ordered(run(simulated, batch)) == ordered(reference)


def test_models_of_different_input_widths_share_a_batch(simulated: list[QueryRecord]) -> None:
    # Clients of two models learn in the same rounds; each model alerts as it does alone.
    wide = [
        msgspec.structs.replace(
            r, model_id="wide-v1", vector=None if r.vector is None else np.tile(r.vector, 2), position=r.position
        )
        for r in simulated
    ]
    mixed = [r for pair in zip(simulated, wide, strict=True) for r in pair]

    def alerts(records: list[QueryRecord], model_id: str) -> list[AlertEvent]:
        detector = small_detector()
        out = [s for i in range(0, len(records), 500) for s in detector.process(records[i : i + 500])]
        return ordered(alert_events([s for s in out if s.model_id == model_id], detector.alert_threshold))

    alone = alerts(simulated, "fraud-v3")
    assert alone
    assert alerts(mixed, "fraud-v3") == alone
    assert alerts(mixed, "wide-v1") == alerts(wide, "wide-v1")


def test_checkpoint_restore_continues_exactly(simulated: list[QueryRecord]) -> None:
    reference = run(simulated, 500)
    half = len(simulated) // 2
    first = small_detector()
    alerts = run(simulated[:half], 500, first)
    checkpoint = first.take_checkpoint()
    assert -1 in checkpoint  # the population baselines travel with the checkpoint
    second = small_detector()
    for partition, entries in checkpoint.items():
        second.restore(partition, {k: v for k, v in entries.items() if v is not None})
    alerts += run(simulated[half:], 500, second)
    assert ordered(alerts) == ordered(reference)


def test_a_checkpoint_writes_one_entry_per_client_with_its_open_sessions(simulated: list[QueryRecord]) -> None:
    """A client's open sessions travel in its entry (one changelog record per client, not one more per
    session), and an ended session leaves nothing behind."""
    detector = small_detector()
    detector.process(simulated[: len(simulated) // 2])
    entries = detector.take_checkpoint()[0]
    clients = {k for k in entries if k.startswith("client\x1f")}
    assert set(entries) - clients == {"__watermark__"}
    held = {
        (key.split("\x1f")[2], session_id)
        for key in clients
        for session_id in msgspec.msgpack.decode(entries[key] or b"")["ss"]
    }
    assert held == {(client_id, session_id) for _, client_id, session_id in detector.sessions}
    assert held  # some sessions are open at the cut
    for session in list(detector.sessions.values()):
        detector._end(session)
    after = detector.take_checkpoint()[0]
    assert all(msgspec.msgpack.decode(blob or b"")["ss"] == {} for key, blob in after.items() if key in clients)


def test_a_checkpoint_with_sessions_in_entries_of_their_own_restores_and_is_rewritten(
    simulated: list[QueryRecord],
) -> None:
    """Checkpoints from before sessions went into their client's entry (a key per session): a restore
    continues exactly, and the next checkpoint deletes the old session keys and writes the client
    entries with their sessions."""
    reference = run(simulated, 500)
    half = len(simulated) // 2
    first = small_detector()
    alerts = run(simulated[:half], 500, first)
    legacy: dict[int, dict[str, bytes]] = {}
    for partition, entries in first.take_checkpoint().items():
        for key, blob in entries.items():
            if blob is None:
                continue
            if key.startswith("client\x1f"):
                state = msgspec.msgpack.decode(blob)
                for session_id, session in state.pop("ss").items():
                    _, model_id, client_id = key.split("\x1f")
                    legacy.setdefault(partition, {})[f"{model_id}\x1f{client_id}\x1f{session_id}"] = (
                        msgspec.msgpack.encode(session)
                    )
                blob = msgspec.msgpack.encode(state)
            legacy.setdefault(partition, {})[key] = blob
    session_keys = {k for k in legacy[0] if not k.startswith(("client\x1f", "__"))}
    assert session_keys
    second = small_detector()
    for partition, entries in legacy.items():
        second.restore(partition, entries)
    rewritten = second.take_checkpoint()[0]
    assert {k for k, v in rewritten.items() if v is None} == session_keys
    restored = sum(len(msgspec.msgpack.decode(v)["ss"]) for k, v in rewritten.items() if k.startswith("client") and v)
    assert restored == len(session_keys)
    alerts += run(simulated[half:], 500, second)
    assert ordered(alerts) == ordered(reference)


def test_client_state_bytes_count_every_array_and_survive_a_restore(simulated: list[QueryRecord]) -> None:
    first = small_detector()
    run(simulated[: len(simulated) // 2], 500, first)
    second = small_detector()
    for partition, entries in first.take_checkpoint().items():
        second.restore(partition, {k: v for k, v in entries.items() if v is not None})
    sizes = []
    for detector in (first, second):
        histories = sorted(detector.clients.items())
        expected = [
            160
            + history.last_values.nbytes
            + sum(
                item.nbytes if isinstance(item, np.ndarray) else len(item) if isinstance(item, bytes) else 8
                for signal in history.signals
                for item in (getattr(signal, slot) for slot in signal.__slots__)
            )
            for _, history in histories
        ]
        assert detector._client_bytes([history for _, history in histories]) == expected
        assert max(expected) > 2048  # the rings are there, not only the scalars
        sizes.append(expected)
    assert sizes[0] == sizes[1]


def test_sessions_split_on_event_time_inactivity() -> None:
    detector = SessionDetector(inactivity_gap_s=60.0, allowed_lateness_s=0.0, min_queries=1)
    vector = np.zeros(2, dtype=np.float32)

    def rec(ts: float, offset: int) -> QueryRecord:
        return QueryRecord(ts=ts, client_id="c", model_id="m", position=SourcePosition("t", 0, offset), vector=vector)

    base = 1.8e9
    scores = detector.process([rec(base + i, i) for i in range(5)] + [rec(base + 200 + i, 10 + i) for i in range(5)])
    sessions = {s.session_id for s in scores}
    assert len(sessions) == 2
    closed = [s for s in scores if s.closed]
    assert len(closed) == 1 and closed[0].n_queries == 5
    assert max(s.client_queries for s in scores) == 10


def test_late_records_are_counted_not_dropped() -> None:
    detector = SessionDetector(allowed_lateness_s=10.0)
    recs = [
        QueryRecord(ts=1.8e9 + t, client_id="c", model_id="m", position=SourcePosition("t", 0, i))
        for i, t in enumerate([100.0, 101.0, 50.0, 102.0, 95.0])
    ]
    scores = detector.process(recs)
    assert detector.late_records == 1
    assert scores[-1].n_queries == 5


def test_state_per_session_is_bounded() -> None:
    rng = np.random.default_rng(1)
    detector = SessionDetector()
    sizes = []
    for n_batch in range(4):
        vectors = rng.normal(size=(2000, 16)).astype(np.float32)
        scores = detector.process(
            [
                QueryRecord(
                    ts=1.8e9 + n_batch * 2000 + i,
                    client_id="heavy",
                    model_id="m",
                    position=SourcePosition("t", 0, n_batch * 2000 + i),
                    vector=vectors[i],
                    margin=0.5,
                )
                for i in range(2000)
            ]
        )
        sizes.append(scores[-1].state_bytes)
    assert sizes[0] == sizes[-1] < 8192  # session + client state: kilobytes, whatever the volume


def test_source_group_members_survive_a_restart(simulated: list[QueryRecord]) -> None:
    first = small_detector()
    run(simulated, 500, first)
    assert len(first.groups) > 20  # one per client network, each holding its members' latest evidence
    second = small_detector()
    for partition, entries in first.take_checkpoint().items():
        second.restore(partition, {k: v for k, v in entries.items() if v is not None})
    assert {k: g.members for k, g in second.groups.items()} == {k: g.members for k, g in first.groups.items()}


def test_source_groups_are_named_by_the_network_label(simulated: list[QueryRecord]) -> None:
    # With storage.hash_source_ips the app passes the store's IP hasher: no network in clear anywhere.
    detector = SessionDetector(min_queries=10, epoch_records=100, min_population=6, network_label=lambda n: "h" * 8)
    run(simulated, 1000, detector)
    assert detector.groups and {group for _, group in detector.groups} == {"net:hhhhhhhh"}


def test_a_client_silent_longer_than_the_ttl_is_forgotten() -> None:
    detector = SessionDetector(inactivity_gap_s=60.0, allowed_lateness_s=0.0, min_queries=1, client_ttl_s=3600.0)
    vector = np.zeros(2, dtype=np.float32)

    def record(client: str, ts: float, offset: int) -> QueryRecord:
        return QueryRecord(
            ts=ts, client_id=client, model_id="m", position=SourcePosition("t", 0, offset), vector=vector
        )

    detector.process([record("quiet", 1000.0 + i, i) for i in range(10)])
    detector.take_checkpoint()
    # Another client moves event time on: past the TTL the quiet client is swept (memory and checkpoint).
    detector.process([record("busy", 1000.0 + 600.0 * i, 100 + i) for i in range(1, 12)])
    assert ("m", "quiet") not in detector.clients and ("m", "busy") in detector.clients
    assert detector.take_checkpoint()[0]["client\x1fm\x1fquiet"] is None
    # Back after the TTL: it starts clean; the same holds without a sweep (the rule is per record).
    detector.process([record("quiet", 9000.0, 200)])
    assert detector.clients[("m", "quiet")].queries == 1
    unswept = SessionDetector(inactivity_gap_s=60.0, allowed_lateness_s=0.0, min_queries=1, client_ttl_s=3600.0)
    unswept.process([record("quiet", 1000.0 + i, i) for i in range(10)])
    unswept.process([record("quiet", 9000.0, 200)])
    assert unswept.clients[("m", "quiet")].queries == 1
    forever = SessionDetector(inactivity_gap_s=60.0, allowed_lateness_s=0.0, min_queries=1, client_ttl_s=0)
    forever.process([record("quiet", 1000.0 + i, i) for i in range(10)])
    forever.process([record("quiet", 9000.0, 200)])
    assert forever.clients[("m", "quiet")].queries == 11


def test_a_worker_adopting_a_waiting_session_scores_it_against_its_own_population(
    simulated: list[QueryRecord],
) -> None:
    # Worker A reads a partition alone: the attacker and six benign clients, barely enough for
    # baselines, so the attacker's scores wait for a warm population. A is then killed at the end of its partition, and
    # worker B, warm from the other partition, adopts it: B scores the waiting session at once, since
    # no more records (and so no publish of A's partition) may ever come.
    def on(partition: int, records: list[QueryRecord]) -> list[QueryRecord]:
        return [msgspec.structs.replace(r, position=SourcePosition("t", partition, i)) for i, r in enumerate(records)]

    few = {"rand-00", *(f"acct-{i:03d}" for i in range(6))}
    first = small_detector()
    assert not [s for s in first.process(on(0, [r for r in simulated if r.client_id in few])) if s.crossed_kinds]
    checkpoint = first.take_checkpoint()
    second = small_detector()
    second.process(on(1, [r for r in simulated if r.client_id not in few and r.client_id.startswith("acct")]))
    second.restore(0, {k: v for k, v in checkpoint[0].items() if v is not None})
    adopted = second.process([])
    assert [s.client_id for s in adopted if s.crossed_kinds] == ["rand-00"]
    assert second.process([]) == []  # scored once, not at every idle batch


def test_sessions_scored_again_together_score_as_one_at_a_time(simulated: list[QueryRecord]) -> None:
    # After a publish, the sessions that waited for it are scored again in vectorised evaluations.
    # Their scores and the evidence they add to the baselines must be those of scoring them one at a
    # time, in order, also when a client comes twice (each evaluation advances its history).
    detector = small_detector()
    detector.process(simulated[: len(simulated) // 2])
    due = [(s, detector.clients[(s.model_id, s.client_id)]) for s in detector.sessions.values()]
    # Clients with queries since their last evaluation: evaluated twice, they add evidence only once.
    due += [(s, h) for s, h in due if h.queries > h.last_bucket][:3]
    assert len(due) > len(detector.sessions)
    together, together_due = copy.deepcopy((detector, due))
    apart, apart_due = copy.deepcopy((detector, due))
    batched = together._rescore(together_due)
    one_by_one = [apart._evaluate_many([pair])[0] for pair in apart_due]
    assert len(batched) == len(due) > 10
    assert msgspec.json.encode(batched) == msgspec.json.encode(one_by_one)
    for model_id, population in together.populations.items():
        np.testing.assert_array_equal(population.pending, apart.populations[model_id].pending)
    assert [h.last_bucket for _, h in together_due] == [h.last_bucket for _, h in apart_due]


class SharedWorkers(NamedTuple):
    detectors: list[SessionDetector]
    log: list[bytes]  # the population log: every worker's contributions and group digests, in order
    scores: list[list[SessionScore]]  # what each worker emitted


def shared_workers(records: list[QueryRecord], workers: int, batch: int) -> SharedWorkers:
    """``workers`` detectors sharing population baselines through an in-memory population log, each
    taking the clients of its share (by client id; its share is its partition), folding the log
    before each of its batches."""
    detectors = [
        SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True, worker_id=str(i))
        for i in range(workers)
    ]
    owner = {c: i % workers for i, c in enumerate(sorted({r.client_id for r in records}))}
    population_log: list[tuple[str, bytes]] = []
    read_to = [0] * workers
    scores: list[list[SessionScore]] = [[] for _ in range(workers)]
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        for i, detector in enumerate(detectors):
            scores[i] += detector.fold_population(
                (o, *population_log[o]) for o in range(read_to[i], len(population_log))
            )
            read_to[i] = len(population_log)
            share = [r for r in chunk if owner[r.client_id] == i]
            scores[i] += detector.process(
                [msgspec.structs.replace(r, position=SourcePosition("t", i, r.position.offset)) for r in share]
            )
        for detector in detectors:
            population_log.extend(detector.take_population_contributions())
    for i, detector in enumerate(detectors):
        scores[i] += detector.fold_population((o, *population_log[o]) for o in range(read_to[i], len(population_log)))
    return SharedWorkers(detectors, [blob for _, blob in population_log], scores)


def is_epoch(blob: bytes) -> bool:
    return "groups" not in msgspec.msgpack.decode(blob)


def test_workers_sharing_baselines_fold_every_contribution_in_the_same_order(simulated: list[QueryRecord]) -> None:
    (first, second), contributions, _ = shared_workers(simulated, 2, 500)
    model_id = simulated[0].model_id
    a, b = first.populations[model_id], second.populations[model_id]
    # Both folded both workers' contributions, in log order: the same published baselines.
    assert a.epochs == b.epochs == len([blob for blob in contributions if is_epoch(blob)]) > 4
    assert a.version == b.version != 0
    assert {msgspec.msgpack.decode(blob)["contributor"] for blob in contributions} == {"0", "1"}
    assert np.array_equal(a.s_hash, b.s_hash) and np.array_equal(a.hist, b.hist)
    # A worker that starts late folds the log before it has scored anyone: the same baselines too.
    late = SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)
    late.fold_population((o, model_id, blob) for o, blob in enumerate(contributions))
    assert np.array_equal(late.populations[model_id].table, a.table, equal_nan=True)
    assert late.populations[model_id].version == a.version
    # A worker that restarts from the other's checkpoint and reads the log from its beginning skips
    # what that checkpoint had folded already: nothing is counted twice.
    restarted = SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)
    restarted.restore(-1, {k: v for k, v in first.take_checkpoint().get(-1, {}).items() if v is not None})
    assert restarted.population_log_start() == len(contributions)
    restarted.fold_population((o, model_id, blob) for o, blob in enumerate(contributions))
    assert restarted.populations[model_id].version == a.version


def test_a_run_of_contributions_folded_at_once_gives_the_baselines_of_folding_them_one_by_one(
    simulated: list[QueryRecord],
) -> None:
    """A worker that reads several contributions from the log at once refreshes what scores read once,
    after the last of them (most of a fold's cost). The input frame is still fixed at the fold whose
    sample first was broad enough: the worker holds what a worker folding them one at a time holds."""
    _, contributions, _ = shared_workers(simulated, 3, 500)
    model_id = simulated[0].model_id
    entries = [(offset, model_id, blob) for offset, blob in enumerate(contributions) if is_epoch(blob)]
    at_once, one_by_one = (
        SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True) for _ in range(2)
    )
    at_once.fold_population(entries)
    for entry in entries:
        one_by_one.fold_population([entry])
    a, b = at_once.populations[model_id], one_by_one.populations[model_id]
    assert a.epochs == b.epochs == len(entries) > 10
    assert a.version == b.version and np.array_equal(a.table, b.table, equal_nan=True)
    assert a.frame is not None and b.frame is not None
    assert np.array_equal(a.frame.centre, b.frame.centre) and np.array_equal(a.frame.scale, b.frame.scale)
    assert np.array_equal(a.sample, b.sample) and a.ood_radius == b.ood_radius


def test_one_client_sending_extreme_inputs_cannot_stretch_the_input_frame() -> None:
    """The input frame (per-feature centre and scale of the model's inputs) is fixed once, from the
    first broad reference sample. A client in that sample whose inputs are 1e30, by fault or to blind
    the detector's input-space signals, must not set its scales: each client counts within a few
    widths of the others' range. (Before, the standard deviation overflowed to inf: every input then
    standardised to 0.)"""

    def frame_scale(extreme_client: bool) -> np.ndarray:
        rng = np.random.default_rng(7)
        population = ModelPopulation("m", 1, epoch_records=100, min_clients=8)
        inputs = [rng.normal(0.0, 1.0, size=(96, 4)).astype(np.float32)]
        senders = [np.repeat(np.arange(1, 9, dtype=np.uint64), 12)]  # 8 honest clients, 12 inputs each
        if extreme_client:
            inputs.append(np.full((12, 4), 1e30, dtype=np.float32))
            senders.append(np.full(12, 99, dtype=np.uint64))
        raw = np.concatenate(inputs)
        population.add_inputs(raw, mix64(np.arange(1, len(raw) + 1, dtype=np.uint64)), np.concatenate(senders))
        population.publish()
        assert population.frame is not None
        return population.frame.scale

    honest, with_extreme = frame_scale(False), frame_scale(True)
    assert np.all((honest > 0.5) & (honest < 1.5))
    assert np.all(np.isfinite(with_extreme)) and np.all(with_extreme < 4 * honest)


def test_one_client_sending_wild_inputs_cannot_move_the_input_bounds() -> None:
    """The model's input bounds are where clipped attack inputs sit ("pinned at the bounds", one of the
    adversarial-input statistics). They come from the reference sample; a client there whose inputs go
    far beyond everyone else's must not move them: an input clipped to the honest range still counts as
    pinned, and an ordinary one does not."""
    rng = np.random.default_rng(11)
    population = ModelPopulation("m", 1, epoch_records=100, min_clients=8)
    honest = np.clip(rng.normal(0.5, 0.4, size=(96, 3)), 0.0, 1.0).astype(np.float32)  # pixels in [0, 1]
    wild = rng.uniform(5.0, 50.0, size=(12, 3)).astype(np.float32)
    raw = np.concatenate([honest, wild])
    senders = np.concatenate([np.repeat(np.arange(1, 9, dtype=np.uint64), 12), np.full(12, 99, dtype=np.uint64)])
    population.add_inputs(raw, mix64(np.arange(1, len(raw) + 1, dtype=np.uint64)), senders)
    population.publish()
    assert population.low is not None and population.high is not None
    assert population.low.tolist() == [0.0, 0.0, 0.0] and population.high.tolist() == [1.0, 1.0, 1.0]
    clipped, ordinary = [1.0, 0.2, 0.0], [0.4, 0.5, 0.6]
    pinned = pinned_at_bounds(np.array([clipped, ordinary], dtype=np.float32), population.low, population.high)
    assert pinned.tolist() == [[True, False, True], [False, False, False]]


def test_workers_share_their_source_groups_and_one_of_them_alerts(tmp_path: Path) -> None:
    """KnockoffNets over 8 keys of one network, on 4 workers: each worker holds 2 of the keys, under
    the 3 suspicious members a group needs. Through the population log every worker holds every
    worker's digests of the group, the same; the group alerts once, from one worker; only networks
    somebody suspects go on the log; and a restart restores the shared groups with the baselines."""
    path = tmp_path / "logs.jsonl"
    plan = SimulationPlan(
        benign_clients=60, queries_per_client=150, attacks=("knockoff",), modes=("sybil",), use_art="no"
    )
    write_simulation(plan, str(path))
    lines = path.read_bytes().splitlines()
    records, _ = RecordDecoder().decode_batch([(line, SourcePosition("f", 0, i), None) for i, line in enumerate(lines)])
    workers = shared_workers(records, 4, 1000)

    def shared(detector: SessionDetector) -> dict[str, dict[str, object]]:
        return {m: {g: group.state() for g, group in groups.items()} for m, groups in detector.shared_groups.items()}

    assert all(shared(d) == shared(workers.detectors[0]) for d in workers.detectors)
    keys = sorted({r.client_id for r in records if "sybil" in r.client_id})
    assert len(keys) == 8 and all(
        len({k for k in keys if d.clients.get((records[0].model_id, k))}) == 2 for d in workers.detectors
    )
    group_scores = [(i, s) for i, scores in enumerate(workers.scores) for s in scores if s.client_id.startswith("net:")]
    fired = [(s.client_id, kind) for _, s in group_scores for kind in s.crossed_kinds]
    (network,) = {f"net:{r.source_ip.rsplit('.', 1)[0]}.0/24" for r in records if r.client_id in keys and r.source_ip}
    assert fired == [(network, "extraction")]
    # Every score of a group comes from one worker, the owner of its home partition, so one worker
    # holds each of its incidents (and hands them over with that partition: see Pipeline).
    model_id = records[0].model_id
    (home,) = {d.partition_of(model_id, network) for d in workers.detectors}
    assert {i for i, s in group_scores if s.client_id == network} == {home} and len(group_scores) > 1
    key = keys[0]
    assert [d.partition_of(model_id, key) for d in workers.detectors].count(None) == 3  # a client: its owner's
    digests = [row for blob in workers.log for row in msgspec.msgpack.decode(blob).get("groups", [])]
    networks = {r.source_ip.rsplit(".", 1)[0] for r in records if r.source_ip}
    assert 0 < len({group for group, _, _ in digests}) < len(networks) / 10
    # A restart restores the shared groups, and reading the log on from there changes nothing.
    restarted = SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)
    checkpoint = workers.detectors[2].take_checkpoint()[-1]
    restarted.restore(-1, {key: blob for key, blob in checkpoint.items() if blob is not None})
    assert shared(restarted) == shared(workers.detectors[0])
    assert restarted.population_log_start() == len(workers.log)
    # A worker restored from a checkpoint taken before the last digest reads the log on from there:
    # it folds what came after, each entry once, and ends with the groups and baselines of the others.
    last = max(o for o, blob in enumerate(workers.log) if not is_epoch(blob))

    def fresh() -> SessionDetector:
        return SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)

    earlier = fresh()
    earlier.fold_population((o, model_id, blob) for o, blob in enumerate(workers.log[:last]))
    behind = fresh()
    behind.restore(-1, {key: blob for key, blob in earlier.take_checkpoint()[-1].items() if blob is not None})
    start = behind.population_log_start()
    assert start <= last
    behind.fold_population((o, model_id, workers.log[o]) for o in range(start, len(workers.log)))
    assert shared(behind) == shared(workers.detectors[0])
    assert behind.populations[model_id].version == workers.detectors[0].populations[model_id].version
    # A fold of digests alone rewrites the groups' checkpoint entry, not the baselines'.
    behind.take_checkpoint()
    digest = msgspec.msgpack.encode({"groups": [["net:192.0.2.0/24", 0, [1, 10, {}]]], "contributor": "9"})
    behind.fold_population([(len(workers.log), model_id, digest)])
    assert list(behind.take_checkpoint()[-1]) == [f"pop\x1f{model_id}\x1fgroups"]


def test_a_restarted_worker_takes_up_the_group_epochs_and_warm_up_ends_on_records_folded(
    simulated: list[QueryRecord],
) -> None:
    """A worker restarted early in a backlog continues the group's epoch schedule (it does not begin
    the doubling epochs again), and the warm-up (young baselines: sessions wait and are scored again
    at each fold) ends when the folded contributions stand for one worker's warm-up of records, not
    after a count of folds. A burst of small folds after a restart once ended the warm-up with a few
    clients in the baselines, and a drifting benign client was flagged in the kill test."""
    model_id = simulated[0].model_id
    population_log: list[tuple[str, bytes]] = []
    first = SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)
    first.process(simulated[:350])  # epochs at 100 and 200 records, then the worker is killed
    population_log += first.take_population_contributions()
    assert len([blob for _, blob in population_log if is_epoch(blob)]) == 2  # its evidence since is lost with it
    restarted = SessionDetector(min_queries=10, epoch_records=100, min_population=6, shared_population=True)
    restarted.fold_population((o, *entry) for o, entry in enumerate(population_log))
    population = restarted.populations[model_id]
    seen: list[tuple[int, bool]] = []  # (records folded, young) after each fold
    read_to, processed = len(population_log), 0
    for start in range(300, len(simulated), 50):  # the restart replays from the last commit
        for offset in range(read_to, len(population_log)):
            restarted.fold_population([(offset, *population_log[offset])])
            seen.append((population.folded_records, population.young))
        read_to = len(population_log)
        batch = simulated[start : start + 50]
        restarted.process(batch)
        processed += len(batch)
        population_log += restarted.take_population_contributions()
    records = [int(msgspec.msgpack.decode(blob)["records"]) for _, blob in population_log if is_epoch(blob)]
    # The epochs of one uninterrupted worker, 100·(1, 1, 2, 4, 8) then 1600 each: the restarted one
    # goes on from the 200 records folded, with none lost or counted twice.
    assert records[:5] == [100, 100, 200, 400, 800] and set(records[5:]) == {1600}
    assert population.folded_records + population.pending_records == 200 + processed
    # Warm-up ends exactly when the records folded in reach 16 epochs.
    assert [young for _, young in seen] == [folded < 16 * 100 for folded, _ in seen]
    assert not population.young


def test_warm_up_of_shared_baselines_counts_records_not_folds() -> None:
    """Five small contributions (a group of workers in their first epochs) leave the shared baselines
    young; the warm-up ends when the contributions stand for 16 epochs of records."""
    population = ModelPopulation("m", 1, epoch_records=100, shared=True)
    empty = np.zeros_like(population.hist)
    for _ in range(5):
        population.fold(
            PopulationContribution(empty, np.zeros((0, 2), np.float32), *[np.zeros(0, np.uint64)] * 2, records=100)
        )
    assert population.epochs == 5 and population.young
    population.fold(
        PopulationContribution(empty, np.zeros((0, 2), np.float32), *[np.zeros(0, np.uint64)] * 2, records=1100)
    )
    assert population.folded_records == 1600 and not population.young


def test_a_worker_places_its_epochs_on_the_records_of_the_stream_it_reads_a_share_of() -> None:
    """A worker reading a quarter of the stream counts each record as four of the stream's: its epochs
    end where the stream's would (100, 200, ... records of the stream), and they double until they
    span as many of its own records as one worker's do (1,600), so that a group of workers folds its
    first baselines as early as one worker publishes its own, and later contributes no more often
    than before. Without shared baselines a worker's own stream is its population's: the share does
    not count."""

    def epoch_ends(population: ModelPopulation, records: int) -> list[int]:
        return [n for n in range(1, records + 1) if population.count(1)]

    one = ModelPopulation("m", 1, epoch_records=100, shared=True)
    assert epoch_ends(one, 4800) == [100, 200, 400, 800, 1600, 3200, 4800]
    quarter = ModelPopulation("m", 1, epoch_records=100, shared=True)
    quarter.set_stream_share(0.25)
    assert epoch_ends(quarter, 3200) == [25, 50, 100, 200, 400, 800, 1600, 3200]
    own = ModelPopulation("m", 1, epoch_records=100)
    own.set_stream_share(0.25)
    assert epoch_ends(own, 1600) == [100, 200, 400, 800, 1600]
    with pytest.raises(ValueError, match="stream share"):
        quarter.set_stream_share(0.0)
    with pytest.raises(ValueError, match="stream share"):
        SessionDetector().set_stream_share(1.5)  # no model yet: refused at once all the same


def test_shared_baselines_let_two_workers_catch_what_one_catches(simulated: list[QueryRecord]) -> None:
    """Split over two workers, each sees half of the 24 benign clients: baselines of their own stay too
    thin to judge the attackers by, while baselines shared through the population log catch every
    attacker one worker catches. (False-positive rates need more clients than this fixture has:
    `probewatch eval --workers` measures them on the simulated traces.)"""
    alone = {e[0] for e in run(simulated, 500) if e[3] == "firing"}
    attackers = {c for c in alone if not c.startswith("acct-")}
    assert attackers

    def flagged(detectors: list[SessionDetector]) -> set[str]:
        return {key[1] for d in detectors for key, history in d.clients.items() if history.flagged}

    owner = {c: i % 2 for i, c in enumerate(sorted({r.client_id for r in simulated}))}
    own_baselines = [small_detector(), small_detector()]
    for i, detector in enumerate(own_baselines):
        run([r for r in simulated if owner[r.client_id] == i], 500, detector)
    assert not flagged(own_baselines) & attackers
    shared = shared_workers(simulated, 2, 500).detectors
    assert attackers <= flagged(shared)
