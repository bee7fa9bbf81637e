"""The session engine: groups records into (model, client, session), feeds the signals, scores.

Time is event time only. A record without ``session_id`` belongs to its client's open session unless
more than ``inactivity_gap_s`` of event time has passed since that session's last record. Records up
to ``allowed_lateness_s`` behind the newest one of their partition are ordinary; older ones are still
counted (never dropped) and reported as late.

Signals are kept per (model, client), across sessions, so pausing does not start clean; sessions give
the alert lifecycle (an alert fires once per session and kind, resolves when the session ends).
Scores are computed at fixed query counts of a session (every 5 queries up to 50, every 25 up to 500,
then every 100), not at micro-batch ends, and are calibrated against per-model population baselines
that change only at fixed points of the model's record stream (see ``detectors.population``). So the
alerts a log produces do not depend on how the stream was cut into batches: replaying a file gives
the alerts the live stream gave. Population baselines are checkpointed under partition ``-1``.
With ``shared_population`` (the workers of a consumer group) a worker's epochs become contributions
and its baselines change when it folds the group's population log; then only one worker's replay of
one log is exact (``probewatch eval --workers`` measures the group). Source groups are shared through
the same log (see ``detectors.groups``).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from detectors.groups import (
    EMPTY_DIGEST,
    GROUP_KINDS,
    MIN_SUSPICIOUS,
    GroupDigest,
    SharedSourceGroup,
    SourceGroup,
    source_group,
)
from detectors.input_model import river_anomaly
from detectors.population import (
    SAMPLE_PER_CLIENT_EPOCH,
    ModelPopulation,
    PopulationContribution,
    buckets_of,
    mix64,
    text_hash,
)
from detectors.scores import GROUP_PREFIX, SessionScore
from detectors.scoring import CalibratedScorer, KindScores
from detectors.signals import (
    DEFAULT_SIGNALS,
    BlockRound,
    QueryBlock,
    SessionSignal,
    derive_features,
    exact_hashes,
    label_codes,
    output_specs,
)
from ingest.records import QueryRecord

log = logging.getLogger(__name__)

MAX_SOURCE_IPS = 8
_NDARRAY_EXT = 1


def next_evaluation(n: int) -> int:
    """The session query count at which the session is scored next, after ``n`` queries."""
    step = 5 if n < 50 else 25 if n < 500 else 100
    return (n // step + 1) * step


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        header = msgspec.msgpack.encode((obj.dtype.str, obj.shape))
        return msgspec.msgpack.Ext(_NDARRAY_EXT, len(header).to_bytes(2, "big") + header + obj.tobytes())
    raise NotImplementedError(f"cannot checkpoint {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _NDARRAY_EXT:
        raise ValueError(f"unknown checkpoint extension {code}")
    size = int.from_bytes(data[:2], "big")
    dtype, shape = msgspec.msgpack.decode(data[2 : 2 + size])
    return np.frombuffer(bytes(data[2 + size :]), dtype=np.dtype(dtype)).reshape(shape).copy()


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Session:
    __slots__ = (
        "client_id",
        "first_seen",
        "ips",
        "kind_max",
        "last_score",
        "last_seen",
        "model_id",
        "n",
        "partition",
        "scored_against",
        "session_id",
        "warming",
    )

    def __init__(self, model_id: str, client_id: str, session_id: str, partition: int, ts: float) -> None:
        self.model_id = model_id
        self.client_id = client_id
        self.session_id = session_id
        self.partition = partition
        self.first_seen = ts
        self.last_seen = ts
        self.n = 0
        self.ips: list[str] = []
        self.kind_max: dict[str, float] = {}
        self.last_score: SessionScore | None = None
        self.warming = False  # last scored while a baseline was warming up or the population young
        self.scored_against = 0  # version of the population baselines it was last scored against


class _ClientHistory:
    """Everything kept per (model, client) across its sessions: the signals and the bookkeeping that
    feeds the population baselines (one contribution per client and query-count bucket)."""

    __slots__ = (
        "flagged",
        "group",
        "hash",
        "last_bucket",
        "last_seen",
        "last_values",
        "open_session",
        "partition",
        "queries",
        "sample_count",
        "sample_epoch",
        "sessions",
        "signals",
    )

    def __init__(self, partition: int, client_id: str, signals: list[SessionSignal], n_values: int) -> None:
        self.partition = partition
        self.queries = 0
        self.sessions = 0
        self.open_session: str | None = None
        self.signals = signals
        self.hash = text_hash(client_id)
        self.flagged = False  # a kind crossed the threshold: its values no longer train the baseline
        self.last_bucket = 0  # client query count at its previous evaluation
        self.last_values = np.full(n_values, np.nan)
        self.sample_epoch = -1
        self.sample_count = 0
        self.group: str | None = None  # source group (network of the latest source IP)
        self.last_seen = float("-inf")  # event time of the client's newest record

    def state(self) -> dict[str, Any]:
        return {
            "q": self.queries,
            "s": self.sessions,
            "open": self.open_session,
            "flagged": self.flagged,
            "lb": self.last_bucket,
            "lv": self.last_values,
            "se": self.sample_epoch,
            "sc": self.sample_count,
            "g": self.group,
            "ls": self.last_seen,
            "signals": {sig.name: sig.to_state() for sig in self.signals},
        }

    def load(self, data: Any) -> None:
        if isinstance(data, list):  # checkpoints from before per-client signals
            self.queries, self.sessions, self.open_session = data
            return
        self.queries, self.sessions, self.open_session = data["q"], data["s"], data["open"]
        self.flagged, self.last_bucket = data["flagged"], data["lb"]
        self.last_values = np.asarray(data["lv"], dtype=np.float64)
        self.sample_epoch, self.sample_count = data["se"], data["sc"]
        self.group = data.get("g")
        self.last_seen = float(data.get("ls", float("-inf")))
        for sig in self.signals:
            if sig.name in data["signals"]:
                sig.load_state(data["signals"][sig.name])


SessionKey = tuple[str, str, str]
ClientKey = tuple[str, str]
# One client's records of a micro-batch, in order, as consecutive same-session segments.
Segments = list[tuple[SessionKey, list[QueryRecord]]]
POPULATION_PARTITION = -1
# Per model, at most this many sessions scored during warm-up wait to be scored again (open or ended).
MAX_AWAITING_RESCORE = 10_000
# A group member's evaluation counts for its group this long (event time), then it is forgotten.
GROUP_MEMBER_TTL_S = 24 * 3600.0
# A client's tail probabilities of the kinds judged across clients (KindScores.tail_p has every kind).
_group_tail_p = operator.itemgetter(*GROUP_KINDS)


class SessionDetector:
    """Holds per-session and per-client state for the partitions this worker owns, and the per-model
    population baselines, and scores sessions.

    ``process`` returns the scores worth storing from one micro-batch: each touched session's latest
    evaluation, every evaluation at which a kind's score first reached the alert threshold, and the
    final score of sessions that ended.
    """

    def __init__(
        self,
        *,
        alert_threshold: float = 0.8,
        min_queries: int = 10,
        inactivity_gap_s: float = 1800.0,
        allowed_lateness_s: float = 60.0,
        max_open_sessions: int = 1_000_000,
        client_ttl_s: float = 30 * 86400.0,
        signal_types: Sequence[type[SessionSignal]] = DEFAULT_SIGNALS,
        false_alarm_budget: float = 1e-3,
        epoch_records: int = 250,
        min_population: int = 8,
        checkpointing: bool = True,
        group_v4_prefix: int = 24,
        group_v6_prefix: int = 48,
        network_label: Callable[[str], str] | None = None,
        shared_population: bool = False,
        worker_id: str = "",
    ) -> None:
        self.alert_threshold = alert_threshold
        river_anomaly()  # now, not in the middle of the stream at the first publish (seconds)
        # Without checkpoints (a file run) nothing is tracked for take_checkpoint, which would
        # otherwise remember every session ever seen.
        self.checkpointing = checkpointing
        self.min_queries = min_queries
        self.gap = inactivity_gap_s
        self.lateness = allowed_lateness_s
        self.max_open_sessions = max_open_sessions
        self.client_ttl = client_ttl_s
        self._next_sweep = float("-inf")  # event time of the next sweep for expired clients
        self._forgotten: dict[ClientKey, int] = {}  # expired clients -> partition, for tombstones
        self.signal_types = tuple(signal_types)
        self.specs = output_specs(self.signal_types)
        self.scales = [spec[2] for spec in self.specs]
        self.scorer = CalibratedScorer(
            self.specs, alert_threshold=alert_threshold, false_alarm_budget=false_alarm_budget
        )
        self.epoch_records = epoch_records
        self.min_population = min_population
        self.sessions: dict[SessionKey, _Session] = {}
        # Each client's open session ids (in opening order): its checkpoint entry holds those sessions.
        self._client_sessions: dict[ClientKey, dict[str, None]] = {}
        self.clients: dict[ClientKey, _ClientHistory] = {}
        self.populations: dict[str, ModelPopulation] = {}
        self.watermarks: dict[int, float] = {}
        self.late_records = 0
        self._dirty_partitions: set[int] = set()
        self._dirty_clients: set[ClientKey] = set()
        # Session entries of checkpoints from before sessions went into their client's entry, restored
        # and to be deleted by the next checkpoint (partition -> keys).
        self._legacy_session_keys: dict[int, set[str]] = {}
        self._dirty_models: set[str] = set()
        # Per model, the sessions (open or ended) last scored against baselines still warming up or a
        # young population: scored again at the model's next publish (see _rescore_warming).
        self._warming: dict[str, dict[SessionKey, _Session]] = {}
        self._adopted_warming: list[SessionKey] = []  # restored while waiting: see _rescore_adopted
        # Source groups (API keys sharing a network, see detectors.groups): (model, group id) -> group.
        self.group_prefixes = (group_v4_prefix, group_v6_prefix)
        self.network_label = network_label  # how a network is named in group ids (e.g. hashed)
        self.groups: dict[ClientKey, SourceGroup] = {}
        self._group_scores: list[SessionScore] = []  # made at member evaluations, emitted by process
        # With shared_population, groups are judged as every worker of the consumer group sees them:
        # model -> group id -> the digests of its members on each source partition, folded from the
        # population log. This worker's groups (above) then only say what to publish: the groups
        # whose members changed since the last digests were taken (see _take_group_digests).
        self.shared_groups: dict[str, dict[str, SharedSourceGroup]] = {}
        self._touched_groups: set[ClientKey] = set()
        # Per model, the population log offset after the last entry folded into its shared groups;
        # checkpointed with them, apart from the baselines (a fold of digests, a few kilobytes, does
        # not rewrite the baselines, tens of kilobytes), so each part skips what it holds already.
        self._groups_folded_to: dict[str, int] = {}
        self._dirty_groups: set[str] = set()
        # Population baselines shared by the workers of a consumer group: an epoch's evidence leaves
        # as a contribution (take_population_contributions) for the population log, and the
        # baselines change only when the log's contributions, every worker's, are folded in
        # (fold_population). Otherwise each worker publishes its own evidence at its epoch ends.
        self.shared_population = shared_population
        self.worker_id = worker_id  # names this worker's contributions
        self._contributions: list[tuple[str, bytes]] = []
        self.stream_share = 1.0  # the share of the stream this worker reads (see set_stream_share)

    # ----------------------------------------------------------------------------------- processing
    def process(self, records: Sequence[QueryRecord]) -> list[SessionScore]:
        runs: dict[ClientKey, Segments] = {}
        emitted: list[SessionScore] = self._rescore_adopted()
        watermarks, lateness = self.watermarks, self.lateness
        model_id, population = "", None
        for record in records:
            partition = record.position.partition
            newest = watermarks.get(partition, -math.inf)
            if record.ts < newest - lateness:
                self.late_records += 1
            elif record.ts > newest:
                watermarks[partition] = record.ts
            self._route(record, partition, runs, emitted)
            if population is None or record.model_id != model_id:
                # Records of one model come in runs: look its population up once per run.
                model_id = record.model_id
                population = self._population(model_id)
                self._note_model_change(model_id)
            if population.count(1):
                # An epoch of this model's stream is complete: fold everything before this point in,
                # then publish the baselines later records are scored against.
                # Sessions idle by now end in this epoch too, whatever the batch cut (their final
                # scores read this epoch's baselines).
                emitted.extend(self._flush(runs))
                emitted.extend(self._close_idle())
                if self.shared_population:
                    contribution = population.take_contribution(self.worker_id)
                    self._contributions.append((model_id, _encoder.encode(contribution.state())))
                else:
                    population.publish()
                    emitted.extend(self._rescore_warming(model_id))
        emitted.extend(self._flush(runs))
        emitted.extend(self._close_idle())
        emitted.extend(self._group_scores)
        self._group_scores.clear()
        return emitted

    # --------------------------------------------------------------------- shared population baselines
    def take_population_contributions(self) -> list[tuple[str, bytes]]:
        """(model id, encoded contribution) of the epochs completed since the last call, in order: for
        the population log, with the batch's checkpoint (shared baselines only)."""
        out, self._contributions = self._contributions, []
        if self.shared_population and self._touched_groups:
            out += self._take_group_digests()
        return out

    def population_log_start(self) -> int:
        """The population log offset to read from: the lowest of the models' folded positions (each
        model skips what it has folded already). 0, the log's beginning, before any fold."""
        folded = [p.folded_to for p in self.populations.values()] + list(self._groups_folded_to.values())
        return min(folded, default=0)

    def fold_population(self, entries: Iterable[tuple[int, str, bytes]]) -> list[SessionScore]:
        """Fold contributions read from the population log, (offset, model id, encoded contribution)
        in log order, into the models' published baselines, as every worker does, and score again
        the sessions that waited for them (see _rescore_warming): once per model, after its last
        contribution here (the workers' epochs end together, so the log holds runs of them). A
        contribution that cannot be read is logged and skipped: it cannot be mended, and the log
        must go on."""
        emitted: list[SessionScore] = []
        folded: dict[str, ModelPopulation] = {}  # models with contributions folded, refreshed at the end
        for offset, model_id, blob in entries:
            population = self._population(model_id)
            # Where the baselines and the groups each stand (checkpointed apart, they may differ).
            baselines_from, groups_from = population.folded_to, self._groups_folded_to.get(model_id, 0)
            if offset < baselines_from and offset < groups_from:
                continue  # folded before the checkpoint this state came from
            digests: list[tuple[str, int, GroupDigest]] | None = None  # an entry of source-group digests
            contribution: PopulationContribution | None = None
            try:
                data = _decoder.decode(blob)
                if isinstance(data, dict) and "groups" in data:
                    digests = [(str(g), int(p), GroupDigest.from_state(d)) for g, p, d in data["groups"]]
                else:
                    contribution = PopulationContribution.from_state(data, len(self.specs))
            except (msgspec.DecodeError, ValueError, TypeError, KeyError, IndexError) as exc:
                log.error("skipped population contribution at offset %d for model %r: %s", offset, model_id, exc)
            population.folded_to = max(baselines_from, offset + 1)
            self._groups_folded_to[model_id] = max(groups_from, offset + 1)
            self._note_model_change(model_id)
            if digests is not None and offset >= groups_from:
                emitted.extend(self._fold_group_digests(model_id, digests))
                self._dirty_groups.add(model_id)
            elif contribution is not None and offset >= baselines_from:
                population.fold(contribution, refresh=False)
                folded[model_id] = population
        for model_id, population in folded.items():
            population.refresh()
            emitted.extend(self._rescore_warming(model_id))
        return emitted

    def _rescore_warming(self, model_id: str) -> list[SessionScore]:
        """Score again, right after a publish, the sessions last scored while a baseline they need was
        warming up or the population was young, including sessions that have ended since (scored as
        closed). Otherwise an attacker that arrives before the population has formed (a new model, or
        a backlog whose partitions are consumed one after another) is judged only at its later
        evaluations, and a short attack has none. A publish is a fixed point of the model's record
        stream, so this is as independent of batch boundaries as the scheduled evaluations."""
        waiting = self._warming.pop(model_id, None)
        due: list[tuple[_Session, _ClientHistory]] = []
        for key, session in (waiting or {}).items():
            history = self.clients.get((key[0], key[1]))
            if history is not None and not history.flagged:
                due.append((session, history))
        return [score for score in self._rescore(due) if score.crossed_kinds]

    def _rescore_adopted(self) -> list[SessionScore]:
        """Score the sessions restored while waiting for a warm population against this worker's
        baselines, if those are not the ones they were scored against. A worker that adopts a
        partition on rebalance has its own population, often warm already (it read other
        partitions), and its next publish may be far off: the adopted partition may even be fully
        read, as when a worker read a backlog partition alone and was then killed. Sessions restored
        with the very baselines they were scored against (a restart) wait as before, so a restart
        continues exactly."""
        adopted, self._adopted_warming = self._adopted_warming, []
        due: list[tuple[_Session, _ClientHistory]] = []
        for key in adopted:
            session = self._warming.get(key[0], {}).get(key)
            history = self.clients.get((key[0], key[1]))
            population = self.populations.get(key[0])
            if session is None or history is None or history.flagged or population is None:
                continue
            if population.epochs and session.scored_against != population.version:
                due.append((session, history))
        return [score for score in self._rescore(due) if score.crossed_kinds]

    def _rescore(self, due: Sequence[tuple[_Session, _ClientHistory]]) -> list[SessionScore]:
        """Score sessions again, in order, as scoring each one in turn would, but in as few vectorised
        evaluations as that allows: an evaluation takes one session per client (a client's sessions
        share its history, which each evaluation advances)."""
        out: list[SessionScore] = []
        start = 0
        while start < len(due):
            clients: set[ClientKey] = set()
            stop = start
            while stop < len(due) and (due[stop][0].model_id, due[stop][0].client_id) not in clients:
                clients.add((due[stop][0].model_id, due[stop][0].client_id))
                stop += 1
            chunk = due[start:stop]
            out += self._evaluate_many(
                chunk, [(s.model_id, s.client_id, s.session_id) not in self.sessions for s, _ in chunk]
            )
            start = stop
        return out

    def _population(self, model_id: str) -> ModelPopulation:
        population = self.populations.get(model_id)
        if population is None:
            population = self.populations[model_id] = ModelPopulation(
                model_id,
                len(self.specs),
                epoch_records=self.epoch_records,
                min_clients=self.min_population,
                shared=self.shared_population,
                scales=self.scales,
            )
            population.set_stream_share(self.stream_share)
        return population

    def set_stream_share(self, share: float) -> None:
        """The share of every model's stream this worker reads, in (0, 1]: as a consumer-group
        member, its partitions of the topic's (records are keyed by client, so partitions carry
        about equal shares). With shared baselines it places the epochs, so that workers starting
        together form the group's baselines as early in the stream as one worker would (see
        ModelPopulation.count)."""
        if not 0.0 < share <= 1.0:  # here too: a model seen later would meet it in the stream's loop
            raise ValueError(f"a stream share is in (0, 1], got {share}")
        for population in self.populations.values():
            population.set_stream_share(share)
        self.stream_share = share

    def _flush(self, runs: dict[ClientKey, Segments]) -> list[SessionScore]:
        """Learn the pending runs of every client and score them at their evaluation points.

        The per-query features of all runs are derived per model in one pass (the published
        population cannot change before the next publish, which only follows a flush). Then the
        clients advance together, one chunk (up to each one's next evaluation point) per round, so
        that each signal learns a whole round of clients' chunks in one vectorised call. A client's
        own chunks stay in order; what clients share within a flush (pending population sums, the
        bottom-k reference sample) does not depend on the order between clients."""
        per_model: dict[str, tuple[list[QueryRecord], list[np.ndarray]]] = {}
        cursors: list[_ClientCursor] = []
        for (model_id, client_id), segments in runs.items():
            records, hashes = per_model.setdefault(model_id, ([], []))
            history = self.clients[(model_id, client_id)]
            cursor = _ClientCursor(history, self._population(model_id))
            for key, run in segments:
                session = self.sessions.get(key)
                if session is not None and run:
                    cursor.segments.append((session, run, len(records)))
                    records.extend(run)
                    hashes.append(np.full(len(run), history.hash, dtype=np.uint64))
            if cursor.segments:
                cursors.append(cursor)
        runs.clear()
        batches = {
            model_id: _ModelBatch(records, self._population(model_id), np.concatenate(hashes))
            for model_id, (records, hashes) in per_model.items()
            if records
        }
        active = cursors
        while active:
            # A round per model: its blocks share the model's input width.
            by_model: dict[str, list[_ClientCursor]] = {}
            for cursor in active:
                by_model.setdefault(cursor.session.model_id, []).append(cursor)
            for model_id, members in by_model.items():
                blocks = BlockRound([cursor.next_block(batches[model_id]) for cursor in members])
                for j, signal_type in enumerate(self.signal_types):
                    signal_type.learn_many([cursor.history.signals[j] for cursor in members], blocks)
                self._offer_samples(members[0].population, members, blocks.blocks)
                for cursor, block in zip(members, blocks.blocks, strict=True):
                    self._learned(cursor, block)
            due = [cursor for cursor in active if cursor.session.n == cursor.target]
            scores = self._evaluate_many([(cursor.session, cursor.history) for cursor in due])
            for cursor, score in zip(due, scores, strict=True):
                cursor.latest = score
                if score.crossed_kinds:
                    cursor.out.append(score)
            for cursor in active:
                if cursor.run_done:
                    # A run's output: every score that crossed a kind's threshold, and its latest score.
                    if cursor.latest is not None and (not cursor.out or cursor.out[-1] is not cursor.latest):
                        cursor.out.append(cursor.latest)
                    self._mark_dirty(cursor.session)
                    cursor.next_run()
            active = [cursor for cursor in active if not cursor.done]
        return [score for cursor in cursors for score in cursor.out]

    def _learned(self, cursor: _ClientCursor, block: QueryBlock) -> None:
        """Bookkeeping after a client's chunk was learned (the round then scores the sessions due)."""
        session, history, chunk = cursor.session, cursor.history, cursor.chunk
        session.n += len(chunk)
        history.queries += len(chunk)
        session.last_seen = max(session.last_seen, float(block.ts.max()))
        session.first_seen = min(session.first_seen, float(block.ts.min()))
        for record in chunk:
            if record.source_ip and record.source_ip not in session.ips and len(session.ips) < MAX_SOURCE_IPS:
                session.ips.append(record.source_ip)
        if chunk[-1].source_ip and any(self.group_prefixes):
            self._join_group(session.model_id, session.client_id, history, chunk[-1].source_ip)

    def _route(
        self,
        record: QueryRecord,
        partition: int,
        runs: dict[ClientKey, Segments],
        emitted: list[SessionScore],
    ) -> None:
        """Append ``record`` to its session's pending run, first opening, ending or forgetting
        sessions as its time says (which flushes the client's pending runs)."""
        client_key = (record.model_id, record.client_id)
        history = self.clients.get(client_key)
        if history is not None and self._expired(history, record.ts):
            # Back after more than the client TTL: it starts clean, exactly as if it had been swept.
            if client_key in runs:
                emitted.extend(self._flush({client_key: runs.pop(client_key)}))
            self._forget_client(client_key, history)
            history = None
        if history is None:
            history = self.clients[client_key] = _ClientHistory(
                partition, record.client_id, [t() for t in self.signal_types], len(self.specs)
            )
        if record.ts > history.last_seen:
            history.last_seen = record.ts
        segments = runs.get(client_key)
        if record.session_id is not None:
            key = (record.model_id, record.client_id, record.session_id)
        else:
            key = (record.model_id, record.client_id, history.open_session or "")
            session = self.sessions.get(key)
            if session is not None:
                # The open session's last_seen has not yet seen this batch's records: count them too.
                if segments and segments[-1][0] == key:
                    pending: list[QueryRecord] | None = segments[-1][1]
                else:
                    pending = next((run for k, run in reversed(segments) if k == key), None) if segments else None
                last_seen = max(session.last_seen, pending[-1].ts) if pending else session.last_seen
                if record.ts - last_seen > self.gap:
                    if segments:
                        emitted.extend(self._flush({client_key: segments}))
                        runs.pop(client_key, None)
                    emitted.extend(self._end(session))
                    session = None
            if session is None:
                key = (record.model_id, record.client_id, _iso(record.ts))
                history.open_session = key[2]
        if key not in self.sessions:
            self.sessions[key] = _Session(key[0], key[1], key[2], partition, record.ts)
            self._client_sessions.setdefault(client_key, {})[key[2]] = None
            history.sessions += 1
            if len(self.sessions) > self.max_open_sessions:
                emitted.extend(self._evict_oldest(len(self.sessions) - self.max_open_sessions, runs))
        segments = runs.get(client_key)  # a flush above may have taken the client's runs
        if segments is None:
            runs[client_key] = [(key, [record])]
        elif segments[-1][0] == key:
            segments[-1][1].append(record)
        else:
            segments.append((key, [record]))

    @staticmethod
    def _offer_samples(
        population: ModelPopulation, cursors: Sequence[_ClientCursor], blocks: Sequence[QueryBlock]
    ) -> None:
        """A few inputs per client and epoch go to the model's reference sample: a round's offers in
        one update (bottom-k by hash, so the order of the offers does not matter)."""
        takes: list[np.ndarray] = []
        starts: list[int] = []
        owners: list[int] = []
        for cursor, block in zip(cursors, blocks, strict=True):
            history = cursor.history
            if block.vectors is None or history.flagged:
                continue
            if history.sample_epoch != population.contributions:
                history.sample_epoch, history.sample_count = population.contributions, 0
            room = SAMPLE_PER_CLIENT_EPOCH - history.sample_count
            if room <= 0:
                continue
            takes.append(block.vectors[:room])
            starts.append(history.queries)
            owners.append(history.hash)
            history.sample_count += len(takes[-1])
        if not takes:
            return
        lengths = [len(take) for take in takes]
        index = np.concatenate(
            [np.arange(start, start + n, dtype=np.uint64) for start, n in zip(starts, lengths, strict=True)]
        )
        clients = np.repeat(np.array(owners, dtype=np.uint64), lengths)
        hashes = mix64(index * np.uint64(0x9E3779B97F4A7C15 & 0xFFFFFFFF) + clients)
        population.add_inputs(np.concatenate(takes), hashes, clients)

    def _evaluate_many(
        self, due: Sequence[tuple[_Session, _ClientHistory]], closed: bool | Sequence[bool] = False
    ) -> list[SessionScore]:
        """Score sessions of different clients at once: their signal values are read as one matrix and
        join the population baselines in one update per model. ``closed``: all of them, or per session,
        whether the score is the session's final one."""
        if not due:
            return []
        final = [closed] * len(due) if isinstance(closed, bool) else list(closed)
        values = np.hstack(
            [
                signal_type.values_many([history.signals[j] for _, history in due])
                for j, signal_type in enumerate(self.signal_types)
            ]
        )
        per_model: dict[str, list[int]] = {}
        for row, (session, _) in enumerate(due):
            per_model.setdefault(session.model_id, []).append(row)
        kinds: dict[int, KindScores] = {}
        for model_id, rows in per_model.items():
            population = self.populations.get(model_id)
            # The values join the population of their query-count bucket, weighted by the queries
            # since the client's previous evaluation (integers: the sums do not depend on order), so
            # every client weighs the same in every bucket it passes through. Flagged clients no
            # longer train it.
            joining = [row for row in rows if not due[row][1].flagged]
            if population is not None and joining:
                histories = [due[row][1] for row in joining]
                population.add_values(
                    values[joining],
                    buckets_of([h.queries for h in histories]),
                    np.array([h.queries - h.last_bucket for h in histories], dtype=np.int64),
                )
                self._note_model_change(model_id)
            scored = self.scorer.score_many(
                values[rows], [due[row][1].signals for row in rows], population, [due[row][1].queries for row in rows]
            )
            kinds.update(zip(rows, scored, strict=True))
        held = self._client_bytes([history for _, history in due])
        return [
            self._score_session(session, history, values[row], kinds[row], final[row], held[row])
            for row, (session, history) in enumerate(due)
        ]

    def _score_session(
        self,
        session: _Session,
        history: _ClientHistory,
        values: np.ndarray,
        kinds: KindScores,
        closed: bool,
        client_bytes: int,
    ) -> SessionScore:
        population = self.populations.get(session.model_id)
        history.last_bucket = history.queries
        history.last_values = values
        scores = kinds.scores if session.n >= self.min_queries else {k: 0.0 for k in kinds.scores}
        score = SessionScore(
            model_id=session.model_id,
            client_id=session.client_id,
            session_id=session.session_id,
            event_time=session.last_seen,
            first_seen=session.first_seen,
            n_queries=session.n,
            client_queries=history.queries,
            score=max(scores.values(), default=0.0),
            kind_scores=scores,
            signals=kinds.signals,
            reasons=kinds.reasons,
            source_ips=list(session.ips),
            closed=closed,
            warming_up=kinds.warming_up,
            state_bytes=self._session_bytes(session) + client_bytes,
        )
        for kind, value in scores.items():
            if value >= self.alert_threshold > session.kind_max.get(kind, 0.0):
                score.crossed_kinds.append(kind)
                history.flagged = True
            session.kind_max[kind] = max(session.kind_max.get(kind, 0.0), value)
        score.peak_kind_scores = dict(session.kind_max)
        session.last_score = score
        self._mark_dirty(session)  # also after the session ended: a re-score changes the client state
        key = (session.model_id, session.client_id, session.session_id)
        # Scores read against a young population are provisional too: its next publish may well change
        # them (a backlog consumed partition by partition shows the model's clients a third at a time).
        session.warming = kinds.warming_up or (population is not None and population.young)
        session.scored_against = 0 if population is None else population.version
        if session.warming:
            waiting = self._warming.setdefault(session.model_id, {})
            waiting[key] = session
            if len(waiting) > MAX_AWAITING_RESCORE:  # a model that never warms up: keep the newest
                waiting.pop(next(iter(waiting)))
        elif session.model_id in self._warming:
            self._warming[session.model_id].pop(key, None)
        if history.group is not None and not session.warming and session.n >= self.min_queries:
            self._judge_group(session, history, kinds.tail_p)
        return score

    # ------------------------------------------------------------------------------ source groups
    def _join_group(self, model_id: str, client_id: str, history: _ClientHistory, ip: str) -> None:
        group_id = source_group(ip, *self.group_prefixes, self.network_label)
        if group_id != history.group:
            self._leave_group(model_id, client_id, history)
            history.group = group_id

    def _leave_group(self, model_id: str, client_id: str, history: _ClientHistory) -> None:
        """Take the client out of its source group (the history keeps its group id)."""
        if history.group is None:
            return
        group_key = (model_id, history.group)
        group = self.groups.get(group_key)
        if group is not None:
            group.forget(client_id)
            if not group.members:
                del self.groups[group_key]
            if self.shared_population:
                self._touched_groups.add(group_key)

    def _judge_group(self, session: _Session, history: _ClientHistory, tail_p: dict[str, float]) -> None:
        """Record a member's evaluation in its source group and score the group (detectors.groups)."""
        assert history.group is not None
        group_key = (session.model_id, history.group)
        group = self.groups.get(group_key)
        if group is None:
            group = self.groups[group_key] = SourceGroup()
        now = session.last_seen
        group.update(session.client_id, _group_tail_p(tail_p), now, history.queries)
        if self.shared_population:
            group.expire(now - GROUP_MEMBER_TTL_S)
            self._touched_groups.add(group_key)  # judged when its digests come back from the log
            return
        if len(group.members) < MIN_SUSPICIOUS:  # most networks hold one client: nothing to add up
            return
        group.expire(now - GROUP_MEMBER_TTL_S)
        score = group.judge(session.model_id, history.group, now, self.scorer.score_of, self.alert_threshold)
        if score is not None:
            self._group_scores.append(score)

    def _take_group_digests(self) -> list[tuple[str, bytes]]:
        """(model id, encoded digests) for the population log: for each group whose members changed, a
        digest per source partition this worker owns where it differs from what the log says. Off the
        log stays a network of one client that looks honest, unless another worker has put it there:
        most networks are that. A network of several clients here (a NAT, say) goes on it with its
        member count before any of them is suspicious, so that a suspicion elsewhere is judged against
        all its members, not only the suspicious ones."""
        rows: dict[str, list[Any]] = {}
        for model_id, group_id in sorted(self._touched_groups):
            group = self.groups.get((model_id, group_id))
            shared = self.shared_groups.get(model_id, {}).get(group_id)
            if shared is None and (group is None or not (group.has_suspicious() or len(group.members) > 1)):
                continue
            mine = group.digests(functools.partial(self._client_partition, model_id)) if group else {}
            theirs = shared.digests if shared is not None else {}
            for partition in sorted((set(mine) | set(theirs)) & self.watermarks.keys()):
                digest = mine.get(partition, EMPTY_DIGEST)
                if digest.signature() != theirs.get(partition, EMPTY_DIGEST).signature():
                    rows.setdefault(model_id, []).append([group_id, partition, digest.state()])
        self._touched_groups.clear()
        return [
            (model_id, _encoder.encode({"groups": digests, "contributor": self.worker_id}))
            for model_id, digests in rows.items()
        ]

    def _client_partition(self, model_id: str, client_id: str) -> int | None:
        history = self.clients.get((model_id, client_id))
        return None if history is None else history.partition

    def partition_of(self, model_id: str, client_id: str) -> int | None:
        """The source partition whose owner holds this client's state and emits its scores (None: not
        known to this worker): a client's own partition, or for a shared source group (``net:…``) its
        home partition. Alert incidents move with it on a rebalance."""
        if client_id.startswith(GROUP_PREFIX):
            shared = self.shared_groups.get(model_id, {}).get(client_id)
            return None if shared is None else shared.home
        return self._client_partition(model_id, client_id)

    def _fold_group_digests(self, model_id: str, digests: list[tuple[str, int, GroupDigest]]) -> list[SessionScore]:
        """Fold one worker's digests into the shared groups and judge the groups they changed, as every
        worker does at this log offset. One worker emits a group's scores, so that its incidents are
        one worker's: the owner of the group's home partition (SharedSourceGroup.home; whoever
        published the digest, who may since have died)."""
        shared_groups = self.shared_groups.setdefault(model_id, {})
        for group_id, partition, digest in digests:
            shared = shared_groups.get(group_id)
            if shared is None:
                shared = shared_groups[group_id] = SharedSourceGroup()
            shared.replace(partition, digest)
            if (model_id, group_id) in self.groups:
                self._touched_groups.add((model_id, group_id))  # our members of it count too
        emitted: list[SessionScore] = []
        for group_id in dict.fromkeys(group_id for group_id, _, _ in digests):
            shared = shared_groups[group_id]
            if not shared.digests:
                del shared_groups[group_id]
                continue
            now = shared.latest_evaluation()
            score = shared.judge(model_id, group_id, now, self.scorer.score_of, self.alert_threshold)
            if score is not None and shared.home in self.watermarks:
                emitted.append(score)
        return emitted

    def _end(self, session: _Session) -> list[SessionScore]:
        return self._end_many([session])

    def _end_many(self, sessions: Sequence[_Session]) -> list[SessionScore]:
        """Close sessions (of different clients) and score each one a last time, together."""
        final: list[tuple[_Session, _ClientHistory]] = []
        for session in sessions:
            self.sessions.pop((session.model_id, session.client_id, session.session_id), None)
            client_key = (session.model_id, session.client_id)
            open_ids = self._client_sessions.get(client_key)
            if open_ids is not None:
                open_ids.pop(session.session_id, None)
                if not open_ids:
                    del self._client_sessions[client_key]
            history = self.clients.get(client_key)
            if history is not None and history.open_session == session.session_id:
                history.open_session = None
            self._mark_dirty(session)
            if session.n and history is not None:
                final.append((session, history))
        return self._evaluate_many(final, closed=True)

    def _close_idle(self) -> list[SessionScore]:
        idle = [
            session
            for session in self.sessions.values()
            if self.watermarks.get(session.partition, float("-inf")) - self.lateness - session.last_seen > self.gap
        ]
        out = self._end_many(idle)
        self._sweep_expired_clients()
        return out

    def _sweep_expired_clients(self) -> None:
        """Forget clients silent for longer than the client TTL (memory and checkpoints stay bounded
        over months of new clients). Runs when event time has moved a sixteenth of the TTL since the
        last sweep; a swept client that comes back starts clean, as the TTL check on its next record
        would have made it anyway."""
        newest = max(self.watermarks.values(), default=float("-inf"))
        if self.client_ttl <= 0 or newest < self._next_sweep:
            return
        self._next_sweep = newest + max(self.client_ttl / 16, 60.0)
        busy = {(s.model_id, s.client_id) for s in self.sessions.values()}
        for key, history in list(self.clients.items()):
            watermark = self.watermarks.get(history.partition, float("-inf"))
            if key not in busy and self._expired(history, watermark):
                self._forget_client(key, history)

    def _expired(self, history: _ClientHistory, now: float) -> bool:
        # last_seen is -inf only for histories restored from checkpoints older than this field.
        return self.client_ttl > 0 and history.last_seen > float("-inf") and now - history.last_seen > self.client_ttl

    def _forget_client(self, key: ClientKey, history: _ClientHistory) -> None:
        self.clients.pop(key, None)
        self._leave_group(key[0], key[1], history)
        if self.checkpointing:
            self._forgotten[key] = history.partition

    def _evict_oldest(self, count: int, runs: dict[ClientKey, Segments]) -> list[SessionScore]:
        oldest = sorted(self.sessions.values(), key=lambda s: s.last_seen)[:count]
        log.warning("more than %d open sessions: closing the %d least recent", self.max_open_sessions, count)
        out: list[SessionScore] = []
        for session in oldest:
            client_key = (session.model_id, session.client_id)
            if client_key in runs:
                out.extend(self._flush({client_key: runs.pop(client_key)}))
            out.extend(self._end(session))
        return out

    # -------------------------------------------------------------------------------- state & stats
    @staticmethod
    def _session_bytes(session: _Session) -> int:
        return 200 + 40 * len(session.ips) + 16 * len(session.kind_max)

    def _client_bytes(self, histories: Sequence[_ClientHistory]) -> list[int]:
        """Approximate bytes of state per client (its history and signals; one pass per signal type)."""
        if not histories:
            return []
        per_type = [
            signal_type.state_bytes_many(signals)
            for signal_type, signals in zip(
                self.signal_types, zip(*(history.signals for history in histories), strict=True), strict=True
            )
        ]
        return [
            160 + history.last_values.nbytes + sum(sizes)
            for history, sizes in zip(histories, zip(*per_type, strict=True), strict=True)
        ]

    def state_bytes(self) -> int:
        return (
            sum(self._session_bytes(s) for s in self.sessions.values())
            + sum(self._client_bytes(list(self.clients.values())))
            + sum(p.nbytes() for p in self.populations.values())
            + sum(g.nbytes() for g in self.groups.values())
            + sum(g.nbytes() for groups in self.shared_groups.values() for g in groups.values())
        )

    def _note_model_change(self, model_id: str) -> None:
        if self.checkpointing:
            self._dirty_models.add(model_id)

    def _mark_dirty(self, session: _Session) -> None:
        """The session changed, opened or ended: its client's entry (which holds its open sessions)
        goes into the next checkpoint, with its partition's watermark."""
        if not self.checkpointing:
            return
        self._dirty_partitions.add(session.partition)
        self._dirty_clients.add((session.model_id, session.client_id))

    def take_checkpoint(self) -> dict[int, dict[str, bytes | None]]:
        """Serialized state changed since the last call (None: deleted). Per partition: the entry of
        each changed client, holding its history and its open sessions (one Kafka record per client,
        not one per session too: half the changelog records of many short sessions), and the
        watermark; per-model population baselines under -1."""
        out: dict[int, dict[str, bytes | None]] = {}
        for partition in self._dirty_partitions:
            out[partition] = {"__watermark__": _encoder.encode(self.watermarks.get(partition, float("-inf")))}
        for partition, keys in self._legacy_session_keys.items():
            out.setdefault(partition, {}).update(dict.fromkeys(keys))
        for (model_id, client_id), partition in self._forgotten.items():
            if (model_id, client_id) not in self.clients:  # still gone: delete its checkpoint
                out.setdefault(partition, {})[f"client\x1f{model_id}\x1f{client_id}"] = None
        self._forgotten.clear()
        for model_id, client_id in self._dirty_clients:
            history = self.clients.get((model_id, client_id))
            if history is not None:
                state = history.state()
                group = self.groups.get((model_id, history.group)) if history.group else None
                if group is not None and client_id in group.members:
                    state["ge"] = group.members[client_id]
                state["ss"] = {
                    session_id: self._session_state(self.sessions[(model_id, client_id, session_id)])
                    for session_id in self._client_sessions.get((model_id, client_id), ())
                }
                out.setdefault(history.partition, {})[f"client\x1f{model_id}\x1f{client_id}"] = _encoder.encode(state)
        for model_id in sorted(self._dirty_models):
            population = self.populations[model_id]
            entries = out.setdefault(POPULATION_PARTITION, {})
            if not self.shared_population:
                # Shared baselines: a worker's pending evidence is its own (all workers write -1), and
                # goes with the worker; what a restart loses of it is less than one epoch's.
                entries[f"pop\x1f{model_id}\x1fpending"] = _encoder.encode(population.pending_state())
            if population.dirty_published:
                entries[f"pop\x1f{model_id}\x1fpublished"] = _encoder.encode(population.published_state())
                population.dirty_published = False
            if model_id in self._dirty_groups:
                shared = self.shared_groups.get(model_id, {})
                entries[f"pop\x1f{model_id}\x1fgroups"] = _encoder.encode(
                    {
                        "folded_to": self._groups_folded_to.get(model_id, 0),
                        "groups": {group_id: group.state() for group_id, group in shared.items()},
                    }
                )
        self._dirty_partitions.clear()
        self._legacy_session_keys.clear()
        self._dirty_clients.clear()
        self._dirty_models.clear()
        self._dirty_groups.clear()
        return out

    @staticmethod
    def _session_state(session: _Session) -> dict[str, Any]:
        return {
            "first_seen": session.first_seen,
            "last_seen": session.last_seen,
            "n": session.n,
            "ips": session.ips,
            "kind_max": session.kind_max,
            "warming": session.warming,
            "scored_against": session.scored_against,
        }

    def restore(self, partition: int, entries: dict[str, bytes]) -> None:
        """Load the checkpointed state of one partition (sessions, client histories, watermark), or
        with partition -1 the per-model population baselines."""
        for key, blob in entries.items():
            if key == "__watermark__":
                self.watermarks[partition] = float(_decoder.decode(blob))
            elif key.startswith("pop\x1f"):
                _, model_id, part = key.split("\x1f")
                population = self._population(model_id)
                if part == "groups":
                    data = _decoder.decode(blob)
                    self.shared_groups[model_id] = {
                        str(group_id): SharedSourceGroup.from_state(state) for group_id, state in data["groups"].items()
                    }
                    self._groups_folded_to[model_id] = int(data["folded_to"])
                elif part == "published":
                    population.load_published(_decoder.decode(blob))
                    if self.shared_population:
                        # Without an entry of its groups (a checkpoint from before they were shared),
                        # the model's shared groups start from the baselines' offset.
                        self._groups_folded_to.setdefault(model_id, population.folded_to)
                        # This worker's evidence since its last contribution went ahead with batches the
                        # restore undoes (an aborted transaction); their replay gathers it again.
                        population.take_contribution()
                elif not self.shared_population:  # shared: another worker's evidence (see take_checkpoint)
                    population.load_pending(_decoder.decode(blob))
            elif key.startswith("client\x1f"):
                _, model_id, client_id = key.split("\x1f")
                history = _ClientHistory(partition, client_id, [t() for t in self.signal_types], len(self.specs))
                data = _decoder.decode(blob)
                history.load(data)
                self.clients[(model_id, client_id)] = history
                if history.group and isinstance(data, dict) and "ge" in data:
                    kind_p, ts, queries = data["ge"]
                    group = self.groups.setdefault((model_id, history.group), SourceGroup())
                    group.update(client_id, tuple(kind_p), float(ts), int(queries))
                if isinstance(data, dict):
                    for session_id, session_data in data.get("ss", {}).items():
                        self._restore_session(partition, model_id, client_id, session_id, session_data)
            else:
                # A session's own entry, from a checkpoint before sessions went into their client's
                # entry: restored, and deleted by the next checkpoint, which writes the client's entry.
                model_id, client_id, session_id = key.split("\x1f")
                self._restore_session(partition, model_id, client_id, session_id, _decoder.decode(blob))
                if self.checkpointing:
                    self._legacy_session_keys.setdefault(partition, set()).add(key)
                    self._dirty_clients.add((model_id, client_id))

    def _restore_session(
        self, partition: int, model_id: str, client_id: str, session_id: str, data: dict[str, Any]
    ) -> None:
        session = _Session(model_id, client_id, session_id, partition, data["first_seen"])
        session.last_seen = data["last_seen"]
        session.n = data["n"]
        session.ips = list(data["ips"])
        session.kind_max = dict(data["kind_max"])
        session.warming = bool(data.get("warming", False))
        session.scored_against = int(data.get("scored_against", 0))
        session_key = (model_id, client_id, session_id)
        self.sessions[session_key] = session
        self._client_sessions.setdefault((model_id, client_id), {})[session_id] = None
        if session.warming:
            self._warming.setdefault(model_id, {})[session_key] = session
            self._adopted_warming.append(session_key)

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions this worker no longer owns (after they were checkpointed).
        The population baselines (partition -1) are shared and stay."""
        gone = set(partitions) - {POPULATION_PARTITION}
        self.sessions = {k: s for k, s in self.sessions.items() if s.partition not in gone}
        sessions = self.sessions
        remaining = {key: {i: None for i in ids if (*key, i) in sessions} for key, ids in self._client_sessions.items()}
        self._client_sessions = {key: ids for key, ids in remaining.items() if ids}
        for (model_id, client_id), history in self.clients.items():
            if history.partition in gone:
                self._leave_group(model_id, client_id, history)
        self.clients = {k: c for k, c in self.clients.items() if c.partition not in gone}
        for model_id, waiting in self._warming.items():
            self._warming[model_id] = {k: s for k, s in waiting.items() if s.partition not in gone}
        for partition in gone:
            self.watermarks.pop(partition, None)
            self._dirty_partitions.discard(partition)
            self._legacy_session_keys.pop(partition, None)

    def top_sessions(self, limit: int = 10) -> list[SessionScore]:
        scored = [s.last_score for s in self.sessions.values() if s.last_score is not None]
        return sorted(scored, key=lambda s: s.score, reverse=True)[:limit]


class _ClientCursor:
    """Where one client is in its runs of a flush (one run per session, learned in order)."""

    __slots__ = ("chunk", "history", "i", "latest", "out", "population", "segments", "target")

    def __init__(self, history: _ClientHistory, population: ModelPopulation) -> None:
        self.history = history
        self.population = population
        self.segments: list[tuple[_Session, list[QueryRecord], int]] = []  # (session, run, batch offset)
        self.i = 0  # position in the current run
        self.chunk: list[QueryRecord] = []
        self.target = 0  # the session's query count at the end of the chunk being learned
        self.latest: SessionScore | None = None
        self.out: list[SessionScore] = []

    @property
    def session(self) -> _Session:
        return self.segments[0][0]

    @property
    def run_done(self) -> bool:
        return self.i >= len(self.segments[0][1])

    @property
    def done(self) -> bool:
        return not self.segments

    def next_block(self, batch: _ModelBatch) -> QueryBlock:
        """The next chunk of the current run: up to the session's next evaluation point."""
        session, run, offset = self.segments[0]
        self.target = next_evaluation(session.n)
        self.chunk = run[self.i : self.i + self.target - session.n]
        start = offset + self.i
        self.i += len(self.chunk)
        return batch.block(start, start + len(self.chunk), self.history.hash)

    def next_run(self) -> None:
        self.segments.pop(0)
        self.i = 0
        self.latest = None


class _ModelBatch:
    """One model's queries of a flush, in columns, with their per-query features derived once
    (detectors.signals.derive_features); clients' blocks are slices of it."""

    __slots__ = ("columns", "vectors_before")

    def __init__(self, records: list[QueryRecord], population: ModelPopulation, client_hashes: np.ndarray) -> None:
        n = len(records)
        nan = float("nan")
        has_vector = np.fromiter((r.vector is not None for r in records), dtype=bool, count=n)
        # How many queries before each row have a vector, as Python ints: whether a block has vectors
        # for all its queries is then a subtraction (numpy's all() on a slice per block costs more).
        self.vectors_before: list[int] = np.concatenate(([0], np.cumsum(has_vector))).tolist()
        matrix = z = zp = exact = None
        if has_vector.any():
            present = np.flatnonzero(has_vector)
            # np.array stacks equal-length vectors in one C pass (np.stack does Python work per vector).
            stacked = np.array([records[i].vector for i in present])
            # Rows without a vector stay zero: no block uses them (a block has vectors for all its
            # queries or none), and one matrix keeps every client's rows at their offsets.
            matrix = stacked if len(present) == n else np.zeros((n, stacked.shape[1]), dtype=stacked.dtype)
            if len(present) < n:
                matrix[present] = stacked
            exact = exact_hashes(matrix)
            if population.frame is not None and population.frame.centre.shape == (matrix.shape[1],):
                z = population.frame.standardise(matrix)
                zp = population.frame.project(z)
        labels = [r.label for r in records]
        self.columns = derive_features(
            QueryBlock(
                ts=np.fromiter((r.ts for r in records), dtype=np.float64, count=n),
                vectors=matrix,
                margins=np.fromiter((nan if r.margin is None else r.margin for r in records), np.float32, count=n),
                confidences=np.fromiter(
                    (nan if r.confidence is None else r.confidence for r in records), np.float32, count=n
                ),
                labels=labels,
                label_codes=label_codes(labels),
                z=z,
                zp=zp,
                exact=exact,
                population=population,
            ),
            client_hashes,
        )

    def block(self, start: int, stop: int, client_hash: int) -> QueryBlock:
        with_vectors = self.vectors_before[stop] - self.vectors_before[start] == stop - start
        return self.columns.rows(start, stop, client_hash, with_vectors)
