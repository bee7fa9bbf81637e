"""The session engine: groups records into (model, client, session), feeds the signals, scores.

Time is event time only. A record without ``session_id`` belongs to its client's open session unless
more than ``inactivity_gap_s`` of event time has passed since that session's last record. Records up
to ``allowed_lateness_s`` behind the newest one of their partition are ordinary; older ones are still
counted (never dropped) and reported as late.

Scores are computed at fixed query counts of a session (every 5 queries up to 50, every 25 up to 500,
then every 100), not at micro-batch ends, so the alerts a log produces do not depend on how the
stream was cut into batches: replaying a file gives the alerts the live stream gave.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np

from detectors.scores import SessionScore
from detectors.scoring import HeuristicScorer
from detectors.signals import DEFAULT_SIGNALS, QueryBlock, SessionSignal
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
        "session_id",
        "signals",
    )

    def __init__(
        self, model_id: str, client_id: str, session_id: str, partition: int, ts: float, signals: list[SessionSignal]
    ) -> None:
        self.model_id = model_id
        self.client_id = client_id
        self.session_id = session_id
        self.partition = partition
        self.first_seen = ts
        self.last_seen = ts
        self.n = 0
        self.signals = signals
        self.ips: list[str] = []
        self.kind_max: dict[str, float] = {}
        self.last_score: SessionScore | None = None


class _ClientHistory:
    __slots__ = ("open_session", "partition", "queries", "sessions")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.queries = 0
        self.sessions = 0
        self.open_session: str | None = None


SessionKey = tuple[str, str, str]


class SessionDetector:
    """Holds per-session state for the partitions this worker owns and scores sessions.

    ``process`` returns the scores worth storing from one micro-batch: each touched session's latest
    evaluation, every evaluation at which a kind's score first reached the alert threshold, and the
    final score of sessions that ended.
    """

    def __init__(
        self,
        *,
        alert_threshold: float = 0.8,
        min_queries: int = 20,
        inactivity_gap_s: float = 1800.0,
        allowed_lateness_s: float = 60.0,
        max_open_sessions: int = 1_000_000,
        signal_types: Sequence[type[SessionSignal]] = DEFAULT_SIGNALS,
        scorer: HeuristicScorer | None = None,
    ) -> None:
        self.alert_threshold = alert_threshold
        self.min_queries = min_queries
        self.gap = inactivity_gap_s
        self.lateness = allowed_lateness_s
        self.max_open_sessions = max_open_sessions
        self.signal_types = tuple(signal_types)
        self.scorer = scorer or HeuristicScorer()
        self.sessions: dict[SessionKey, _Session] = {}
        self.clients: dict[tuple[str, str], _ClientHistory] = {}
        self.watermarks: dict[int, float] = {}
        self.late_records = 0
        self._dirty: dict[int, set[str]] = {}

    # ----------------------------------------------------------------------------------- processing
    def process(self, records: Sequence[QueryRecord]) -> list[SessionScore]:
        runs: dict[SessionKey, list[QueryRecord]] = {}
        emitted: list[SessionScore] = []
        for record in records:
            partition = record.position.partition
            newest = self.watermarks.get(partition, float("-inf"))
            if record.ts < newest - self.lateness:
                self.late_records += 1
            elif record.ts > newest:
                self.watermarks[partition] = record.ts
            key = self._session_key(record, partition, runs, emitted)
            runs.setdefault(key, []).append(record)
        for key, run in runs.items():
            emitted.extend(self._learn_run(self.sessions[key], run))
        emitted.extend(self._close_idle())
        return emitted

    def _session_key(
        self,
        record: QueryRecord,
        partition: int,
        runs: dict[SessionKey, list[QueryRecord]],
        emitted: list[SessionScore],
    ) -> SessionKey:
        client_key = (record.model_id, record.client_id)
        history = self.clients.get(client_key)
        if history is None:
            history = self.clients[client_key] = _ClientHistory(partition)
        if record.session_id is not None:
            key = (record.model_id, record.client_id, record.session_id)
        else:
            key = (record.model_id, record.client_id, history.open_session or "")
            session = self.sessions.get(key)
            # The open session's last_seen has not yet seen this batch's records: count them too.
            pending = runs.get(key)
            last_seen = max(session.last_seen, pending[-1].ts) if session and pending else (
                session.last_seen if session else None
            )
            if session is not None and last_seen is not None and record.ts - last_seen > self.gap:
                if pending:
                    emitted.extend(self._learn_run(session, pending))
                    del runs[key]
                emitted.extend(self._end(session))
                session = None
            if session is None:
                key = (record.model_id, record.client_id, _iso(record.ts))
                history.open_session = key[2]
        if key not in self.sessions:
            self.sessions[key] = _Session(
                key[0], key[1], key[2], partition, record.ts, [t() for t in self.signal_types]
            )
            history.sessions += 1
            if len(self.sessions) > self.max_open_sessions:
                emitted.extend(self._evict_oldest(len(self.sessions) - self.max_open_sessions))
        return key

    def _learn_run(self, session: _Session, run: list[QueryRecord]) -> list[SessionScore]:
        history = self.clients[(session.model_id, session.client_id)]
        out: list[SessionScore] = []
        latest: SessionScore | None = None
        i = 0
        while i < len(run):
            target = next_evaluation(session.n)
            chunk = run[i : i + target - session.n]
            i += len(chunk)
            block = _block(chunk)
            for signal in session.signals:
                signal.learn_block(block)
            session.n += len(chunk)
            history.queries += len(chunk)
            session.last_seen = max(session.last_seen, float(block.ts.max()))
            session.first_seen = min(session.first_seen, float(block.ts.min()))
            for record in chunk:
                if record.source_ip and record.source_ip not in session.ips and len(session.ips) < MAX_SOURCE_IPS:
                    session.ips.append(record.source_ip)
            if session.n == target:
                latest = self._evaluate(session, history.queries)
                if latest.crossed_kinds:
                    out.append(latest)
        if latest is not None and (not out or out[-1] is not latest):
            out.append(latest)
        self._mark_dirty(session)
        return out

    def _evaluate(self, session: _Session, client_queries: int, closed: bool = False) -> SessionScore:
        kinds = self.scorer.score(session.signals, session.n)
        scores = kinds.scores if session.n >= self.min_queries else {k: 0.0 for k in kinds.scores}
        score = SessionScore(
            model_id=session.model_id,
            client_id=session.client_id,
            session_id=session.session_id,
            event_time=session.last_seen,
            first_seen=session.first_seen,
            n_queries=session.n,
            client_queries=client_queries,
            score=max(scores.values(), default=0.0),
            kind_scores=scores,
            signals=kinds.signals,
            reasons=kinds.reasons,
            source_ips=list(session.ips),
            closed=closed,
            state_bytes=self._session_bytes(session),
        )
        for kind, value in scores.items():
            if value >= self.alert_threshold > session.kind_max.get(kind, 0.0):
                score.crossed_kinds.append(kind)
            session.kind_max[kind] = max(session.kind_max.get(kind, 0.0), value)
        score.peak_kind_scores = dict(session.kind_max)
        session.last_score = score
        return score

    def _end(self, session: _Session) -> list[SessionScore]:
        key = (session.model_id, session.client_id, session.session_id)
        self.sessions.pop(key, None)
        history = self.clients.get((session.model_id, session.client_id))
        if history is not None and history.open_session == session.session_id:
            history.open_session = None
        self._mark_dirty(session, deleted=True)
        if session.n == 0:
            return []
        return [self._evaluate(session, history.queries if history else session.n, closed=True)]

    def _close_idle(self) -> list[SessionScore]:
        out: list[SessionScore] = []
        for session in list(self.sessions.values()):
            watermark = self.watermarks.get(session.partition, float("-inf")) - self.lateness
            if watermark - session.last_seen > self.gap:
                out.extend(self._end(session))
        return out

    def _evict_oldest(self, count: int) -> list[SessionScore]:
        oldest = sorted(self.sessions.values(), key=lambda s: s.last_seen)[:count]
        log.warning("more than %d open sessions: closing the %d least recent", self.max_open_sessions, count)
        return [score for session in oldest for score in self._end(session)]

    # -------------------------------------------------------------------------------- state & stats
    @staticmethod
    def _session_bytes(session: _Session) -> int:
        return 200 + sum(s.state_bytes() for s in session.signals) + 40 * len(session.ips)

    def state_bytes(self) -> int:
        return sum(self._session_bytes(s) for s in self.sessions.values()) + 120 * len(self.clients)

    def _mark_dirty(self, session: _Session, deleted: bool = False) -> None:
        self._dirty.setdefault(session.partition, set()).add(
            "\x1f".join((session.model_id, session.client_id, session.session_id))
        )

    def take_checkpoint(self) -> dict[int, dict[str, bytes | None]]:
        """Serialized state of every session changed since the last call (None: session ended)."""
        out: dict[int, dict[str, bytes | None]] = {}
        for partition, keys in self._dirty.items():
            entries: dict[str, bytes | None] = {}
            for key in keys:
                model_id, client_id, session_id = key.split("\x1f")
                session = self.sessions.get((model_id, client_id, session_id))
                entries[key] = None if session is None else self._encode_session(session)
            clients = {(k.split("\x1f")[0], k.split("\x1f")[1]) for k in keys}
            for model_id, client_id in clients:
                history = self.clients.get((model_id, client_id))
                if history is not None:
                    entries[f"client\x1f{model_id}\x1f{client_id}"] = _encoder.encode(
                        [history.queries, history.sessions, history.open_session]
                    )
            entries["__watermark__"] = _encoder.encode(self.watermarks.get(partition, float("-inf")))
            out[partition] = entries
        self._dirty.clear()
        return out

    def _encode_session(self, session: _Session) -> bytes:
        return _encoder.encode(
            {
                "first_seen": session.first_seen,
                "last_seen": session.last_seen,
                "n": session.n,
                "ips": session.ips,
                "kind_max": session.kind_max,
                "signals": {s.name: s.to_state() for s in session.signals},
            }
        )

    def restore(self, partition: int, entries: dict[str, bytes]) -> None:
        """Load the checkpointed state of one partition (sessions, client histories, watermark)."""
        for key, blob in entries.items():
            if key == "__watermark__":
                self.watermarks[partition] = float(_decoder.decode(blob))
            elif key.startswith("client\x1f"):
                _, model_id, client_id = key.split("\x1f")
                history = _ClientHistory(partition)
                history.queries, history.sessions, history.open_session = _decoder.decode(blob)
                self.clients[(model_id, client_id)] = history
            else:
                model_id, client_id, session_id = key.split("\x1f")
                data = _decoder.decode(blob)
                signals = [t() for t in self.signal_types]
                for signal in signals:
                    if signal.name in data["signals"]:
                        signal.load_state(data["signals"][signal.name])
                session = _Session(model_id, client_id, session_id, partition, data["first_seen"], signals)
                session.last_seen = data["last_seen"]
                session.n = data["n"]
                session.ips = list(data["ips"])
                session.kind_max = dict(data["kind_max"])
                self.sessions[(model_id, client_id, session_id)] = session

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions this worker no longer owns (after they were checkpointed)."""
        gone = set(partitions)
        self.sessions = {k: s for k, s in self.sessions.items() if s.partition not in gone}
        self.clients = {k: c for k, c in self.clients.items() if c.partition not in gone}
        for partition in gone:
            self.watermarks.pop(partition, None)
            self._dirty.pop(partition, None)

    def top_sessions(self, limit: int = 10) -> list[SessionScore]:
        scored = [s.last_score for s in self.sessions.values() if s.last_score is not None]
        return sorted(scored, key=lambda s: s.score, reverse=True)[:limit]


def _block(chunk: list[QueryRecord]) -> QueryBlock:
    nan = float("nan")
    vectors = [r.vector for r in chunk]
    return QueryBlock(
        ts=np.fromiter((r.ts for r in chunk), dtype=np.float64, count=len(chunk)),
        vectors=np.stack(vectors) if all(v is not None for v in vectors) else None,  # type: ignore[arg-type]
        margins=np.fromiter(
            (nan if r.margin is None else r.margin for r in chunk), dtype=np.float32, count=len(chunk)
        ),
        confidences=np.fromiter(
            (nan if r.confidence is None else r.confidence for r in chunk), dtype=np.float32, count=len(chunk)
        ),
        labels=[r.label for r in chunk],
    )
