"""Per-model population baselines: what normal clients of a model look like, learned from the stream.

Two things per model, both bounded and checkpointed under partition ``-1``:

* an input *frame* and *reference sample* — per-feature centre/scale (frozen once warm, so LSH cells
  and content fingerprints stay comparable for the model's lifetime), per-feature bounds, and a
  bottom-k hash sample of recent inputs (capped per client and epoch) used for out-of-distribution
  tests;
* per signal and per client-query-count bucket, a histogram of client signal values (the
  "population"), from which the calibrated tail probabilities come.

Determinism: shared state is read from the *published* snapshot only; new evidence goes into a
*pending* accumulator whose updates commute (integer-valued histogram counts, a bottom-k sample by
hash), and pending is folded into the published snapshot at fixed points of the model's own record
stream (every ``epoch_records`` records). So a replay of the log, however it is cut into batches,
reads exactly the baselines the live stream read.

Sharing: an epoch's pending evidence is a :class:`PopulationContribution`, and publishing is folding
one into the published snapshot (``fold``, a pure function of both). Workers that share a model's
stream fold every worker's contributions in one order (``probewatch.population_log``) and so hold the
same baselines.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from detectors.input_model import InputDensityModel, input_summaries, pinned_at_bounds

N_BINS = 200
LOG_LO, LOG_HI = -3.0, 6.0  # log10 range of "log"-scaled signal values
# Client query-count buckets: [5,10), [10,20), ..., [5120, inf)
BUCKET_EDGES = np.array([10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120], dtype=np.int64)
N_BUCKETS = len(BUCKET_EDGES) + 1
BUCKET_WIDTHS = np.diff(np.concatenate([[5], BUCKET_EDGES, [BUCKET_EDGES[-1] * 2]])).astype(np.float64)
PROJ_DIMS = 32  # inputs with more features are projected (fixed random projection) for distances
SAMPLE_SIZE = 384
SAMPLE_PER_CLIENT_EPOCH = 12


def bucket_of(n: int) -> int:
    return int(np.searchsorted(BUCKET_EDGES, n, side="right"))


def buckets_of(counts: Sequence[int]) -> np.ndarray:
    """``bucket_of`` of many query counts (int64)."""
    return np.searchsorted(BUCKET_EDGES, np.asarray(counts, dtype=np.int64), side="right").astype(np.int64)


def bucket_floor(b: int) -> int:
    return 5 if b == 0 else int(BUCKET_EDGES[b - 1])


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads structured integers over all 64 bits."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def text_hash(text: str) -> int:
    """A stable 63-bit hash of a string (Python's hash() is salted per process)."""
    value = 1469598103934665603
    for byte in text.encode():
        value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return int(mix64(np.array([value], dtype=np.uint64))[0] >> np.uint64(1))


def to_bins(values: np.ndarray, log: np.ndarray) -> np.ndarray:
    """Histogram bin of each value: on the log scale where ``log``, else on [0, 1] (NaN: bin 0)."""
    values = np.nan_to_num(values, nan=0.0)
    unit = np.clip(values, 0.0, 1.0) * N_BINS
    logs = (np.log10(np.maximum(values, 10**LOG_LO)) - LOG_LO) / (LOG_HI - LOG_LO) * N_BINS
    return np.clip(np.where(log, logs, unit).astype(np.int64), 0, N_BINS - 1)


def from_bin(index: float, scale: str) -> float:
    """Value at a (fractional) bin position."""
    if scale == "unit":
        return index / N_BINS
    return float(10 ** (LOG_LO + index / N_BINS * (LOG_HI - LOG_LO)))


class Frame:
    """The model's input coordinate frame: z = (x - centre) / scale, projected to ≤ PROJ_DIMS."""

    __slots__ = ("centre", "proj", "scale")

    def __init__(self, centre: np.ndarray, scale: np.ndarray) -> None:
        self.centre = centre.astype(np.float32)
        self.scale = scale.astype(np.float32)
        d = len(centre)
        if d > PROJ_DIMS:
            rng = np.random.default_rng(20261129 + d)
            self.proj: np.ndarray | None = (rng.standard_normal((d, PROJ_DIMS)) / math.sqrt(PROJ_DIMS)).astype(
                np.float32
            )
        else:
            self.proj = None

    def standardise(self, x: np.ndarray) -> np.ndarray:
        # float64 throughout: per-row results must not depend on the block's shape (float32 reductions
        # can differ in the 7th digit with the number of rows).
        return (x.astype(np.float64) - self.centre) / self.scale

    def project(self, z: np.ndarray) -> np.ndarray:
        if self.proj is None:
            return z
        # Broadcast, not BLAS: a row's result must not depend on how many rows come with it.
        return (z[:, :, None] * self.proj[None, :, :]).sum(axis=1)


class PopulationContribution:
    """One epoch of a worker's evidence about a model's population: weighted signal-value counts per
    signal, query-count bucket and bin, and its offers to the reference sample (bottom-k by hash)."""

    __slots__ = ("clients", "contributor", "hashes", "inputs", "records", "values")

    def __init__(
        self,
        values: np.ndarray,
        inputs: np.ndarray,
        hashes: np.ndarray,
        clients: np.ndarray,
        contributor: str = "",
        records: int = 0,
    ) -> None:
        self.values = values  # float64 (signals, buckets, bins)
        self.inputs = inputs  # float32 (rows, input width): raw inputs
        self.hashes = hashes  # uint64 (rows,)
        self.clients = clients  # uint64 (rows,): the client hash of each row
        self.contributor = contributor  # the worker whose evidence it is
        self.records = records  # the model's records this evidence was gathered from

    def state(self) -> dict[str, Any]:
        idx, val = _sparse(self.values, np.float64)  # float64: folded as they are, on every worker
        return {
            "idx": idx,
            "val": val,
            "inputs": self.inputs,
            "hashes": self.hashes,
            "clients": self.clients,
            "contributor": self.contributor,
            "records": self.records,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any], n_signals: int) -> PopulationContribution:
        idx = np.asarray(data["idx"], dtype=np.int64)
        if idx.ndim != 2 or idx.shape[0] != 3 or (idx.shape[1] and idx[0].max() >= n_signals):
            raise ValueError(f"a contribution of another shape than this detector's {n_signals} signals")
        values = _dense(idx, data["val"], (n_signals, N_BUCKETS, N_BINS))
        inputs = np.asarray(data["inputs"], dtype=np.float32)
        hashes = np.asarray(data["hashes"], dtype=np.uint64)
        clients = np.asarray(data["clients"], dtype=np.uint64)
        if inputs.ndim != 2 or not len(inputs) == len(hashes) == len(clients):
            raise ValueError("a contribution whose sample rows, hashes and clients do not match")
        return cls(values, inputs, hashes, clients, str(data.get("contributor", "")), int(data.get("records", 0)))


class ModelPopulation:
    """Published and pending population baselines of one model."""

    def __init__(
        self,
        model_id: str,
        n_signals: int,
        *,
        epoch_records: int = 500,
        decay: float = 0.98,
        min_clients: int = 16,
        shared: bool = False,
        scales: list[str] | None = None,
    ) -> None:
        self.model_id = model_id
        self.shared = shared  # baselines folded from every worker's contributions (see fold)
        self.n_signals = n_signals
        self.epoch_records = epoch_records
        self.decay = decay
        self.min_clients = min_clients
        # Where this worker stands in the model's epoch schedule, in records of the model's stream:
        # its own records, each counted as 1/s of the stream's when it reads a share s of it with
        # shared baselines (see count).
        self.records: float = 0
        self.pending_records = 0  # records since the last contribution (the pending evidence's)
        self.counting = False  # this worker has counted records of the model (see fold)
        self._epoch_end = epoch_records  # the position that completes the current epoch
        self._pace = 1.0  # what one of this worker's records advances the schedule by (set_stream_share)
        self._cap = 16 * epoch_records  # the schedule's last doubling epoch ends here
        self.epochs = 0
        self.hist = np.zeros((n_signals, N_BUCKETS, N_BINS), dtype=np.float64)
        self.pending = np.zeros((n_signals, N_BUCKETS, N_BINS), dtype=np.float64)
        # Input frame and reference sample (absent for models whose records carry no vectors).
        self.frame: Frame | None = None
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.sample = np.zeros((0, 0), dtype=np.float32)  # projected z of the reference sample
        self.sample_clients = np.zeros(0, dtype=np.uint64)
        self.sample_sq = np.zeros(0, dtype=np.float64)  # squared norms of the sample's rows
        self.ood_radius = float("inf")
        self.input_model: InputDensityModel | None = None  # River HalfSpaceTrees over input summaries
        self.p_raw = np.zeros((0, 0), dtype=np.float32)  # pending raw inputs (bottom-k by hash)
        self.p_hash = np.zeros(0, dtype=np.uint64)
        self.p_clients = np.zeros(0, dtype=np.uint64)
        self.s_raw = np.zeros((0, 0), dtype=np.float32)  # published raw inputs (for bounds / frame)
        self.s_hash = np.zeros(0, dtype=np.uint64)
        self.s_clients = np.zeros(0, dtype=np.uint64)
        self.dirty_published = True
        self._table_stale = self._inputs_stale = False  # folds whose refresh is due (see fold)
        # Per signal, "log" or "unit": how its values map to histogram bins. Fixed by the signals, not
        # learned: a worker may fold other workers' contributions before it has scored anyone.
        self.scales: list[str] = list(scales) if scales is not None else ["unit"] * n_signals
        if len(self.scales) != n_signals:
            raise ValueError(f"{len(self.scales)} scales for {n_signals} signals")
        self._log_mask = np.array([scale == "log" for scale in self.scales])
        self.table = np.full((n_signals, N_BUCKETS, 4), np.nan)  # warm bucket, q50, q75, clients
        self.version = 0  # names the published baselines (see _refresh_table)
        # Contributions handed over so far: a client offers at most SAMPLE_PER_CLIENT_EPOCH inputs per
        # contribution (with shared baselines, folds come from every worker, so epochs run faster).
        self.contributions = 0
        # Shared baselines: the population log offset after the last contribution folded in (all
        # folds of earlier offsets are in the published state; a replay of the log skips them).
        self.folded_to = 0
        # The model records that the folded contributions stand for: with shared baselines, how far
        # the group's stream has warmed the baselines up (see young).
        self.folded_records = 0

    # -------------------------------------------------------------------------------------- stream
    def count(self, n: int) -> bool:
        """Count ``n`` records of the model; True when that completes an epoch (caller publishes).
        Epochs double from ``epoch_records`` (fast warm-up) up to 16 times that, then stay.

        With shared baselines, a worker that reads a share s of the stream counts each of its records
        as 1/s of the stream's, and its epochs double up to 16 · epoch_records of its *own* records
        (16/s of the stream's). So the group folds its first baselines when the stream, not each
        worker, has reached ``epoch_records``: N workers that start together would otherwise warm up
        N times later, and score nothing until then. And from then on each worker contributes as
        often as before: a group of N folds N contributions per 16 · epoch_records of each worker's
        records, which bounds the folds every worker makes."""
        self.records += n * self._pace
        self.pending_records += n
        self.counting = True
        if self.records < self._epoch_end:
            return False
        self._epoch_end = _epoch_end(self.records, self.epoch_records, self._cap)
        return True

    def set_stream_share(self, share: float) -> None:
        """The share of the model's stream this worker reads, in (0, 1]: a consumer-group member's
        partitions of the topic's. Places the epochs of shared baselines (see count)."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"a stream share is in (0, 1], got {share}")
        if self.shared:
            self._pace = 1.0 / share
            # The doubling goes on for log2(1/s) more epochs (rounded down: never rarer than before).
            self._cap = self.epoch_records * 2 ** (4 + math.floor(math.log2(1.0 / share) + 1e-9))
            self._epoch_end = _epoch_end(self.records, self.epoch_records, self._cap)

    def add_inputs(self, raw: np.ndarray, hashes: np.ndarray, clients: np.ndarray) -> None:
        """Offer inputs (rows of ``raw``, sent by ``clients``) to the pending reference sample
        (bottom-k by hash: order does not matter)."""
        if self.p_raw.shape[1:] != raw.shape[1:]:
            if len(self.p_raw):
                return  # a vector of another width: the decoder dead-letters those; ignore
            self.p_raw = np.zeros((0, raw.shape[1]), dtype=np.float32)
        self.p_raw = np.concatenate([self.p_raw, raw.astype(np.float32)])
        self.p_hash = np.concatenate([self.p_hash, hashes.astype(np.uint64)])
        self.p_clients = np.concatenate([self.p_clients, clients.astype(np.uint64)])
        if len(self.p_hash) > 2 * SAMPLE_SIZE:
            self._trim_pending()

    def _trim_pending(self) -> None:
        keep = np.lexsort((self.p_clients, self.p_hash))[:SAMPLE_SIZE]
        self.p_raw, self.p_hash, self.p_clients = self.p_raw[keep], self.p_hash[keep], self.p_clients[keep]

    def add_values(self, values: np.ndarray, buckets: np.ndarray, weights: np.ndarray) -> None:
        """Clients' signal values (rows; NaN: unavailable), each in its query-count bucket, weighted
        by the queries they stand for."""
        rows, signals = np.nonzero(~np.isnan(values) & (weights > 0)[:, None])
        bins = to_bins(values[rows, signals], self._log_mask[signals])
        np.add.at(self.pending, (signals, buckets[rows], bins), weights[rows].astype(np.float64))

    def publish(self) -> None:
        """Fold this worker's pending evidence into the published baselines (at a fixed point of the
        stream)."""
        self.fold(self.take_contribution())

    def take_contribution(self, contributor: str = "") -> PopulationContribution:
        """The pending evidence of an epoch, handed over (pending starts empty again). Folded here by
        ``publish``, or, with baselines shared by a consumer group, sent to the population log, from
        which every worker folds every worker's contributions in the same order."""
        if len(self.p_hash):
            self._trim_pending()
        contribution = PopulationContribution(
            self.pending, self.p_raw, self.p_hash, self.p_clients, contributor, self.pending_records
        )
        self.contributions += 1
        self.pending_records = 0
        self.pending = np.zeros_like(self.pending)
        self.p_raw, self.p_hash, self.p_clients = self.p_raw[:0], self.p_hash[:0], self.p_clients[:0]
        return contribution

    def fold(self, contribution: PopulationContribution, refresh: bool = True) -> None:
        """Fold an epoch's evidence into the published baselines: a pure function of the published
        state and the contribution, so workers folding the same contributions in the same order hold
        the same baselines. With ``refresh=False`` what scores read (quantile tables, the reference
        sample's distances and density model) waits for :meth:`refresh`: a worker that reads several
        contributions from the log at once refreshes once, which is most of a fold's cost."""
        self.epochs += 1
        self.folded_records += contribution.records
        if self.shared and not self.counting:
            # A worker that has read none of the model's records yet (started, restarted, or joining
            # the group) takes up the group's epoch schedule instead of beginning the doubling
            # epochs again: after a restart, a burst of small contributions renewed the reference
            # sample from a handful of clients, and a drifting benign client was flagged.
            self.records = self.folded_records
            self._epoch_end = _epoch_end(self.records, self.epoch_records, self._cap)
        self.hist = self.hist * self.decay + contribution.values
        self._table_stale = True
        if len(contribution.hashes):
            # Half of the reference sample is renewed each fold: recent inputs, with a memory. With n
            # workers sharing the stream, each contribution holds a 1/n share of the clients and the
            # workers' contributions come one after another: the sample stays as recent as one
            # worker's, which drifting clients need. (Renewing 1/(2n), n counted from worker ids,
            # left it stale after rolling restarts.)
            raw, hashes, clients = contribution.inputs, contribution.hashes, contribution.clients
            old = np.lexsort((self.s_clients, self.s_hash))[: SAMPLE_SIZE - min(len(hashes), SAMPLE_SIZE // 2)]
            new = np.lexsort((clients, hashes))[: SAMPLE_SIZE - len(old)]
            if self.s_raw.shape[1:] != raw.shape[1:]:  # the first inputs, or the model's width changed
                self.s_raw = np.zeros((0, raw.shape[1]), dtype=np.float32)
                old = old[:0]
            self.s_raw = np.concatenate([self.s_raw[old], raw[new]])
            self.s_hash = np.concatenate([self.s_hash[old], hashes[new]])
            self.s_clients = np.concatenate([self.s_clients[old], clients[new]])
            self._inputs_stale = True
            if self.frame is None and self._broad_sample():
                self._frozen_frame()  # at this fold, however many folds the next refresh follows
        self.dirty_published = True
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """Bring what scores read up to the folds made (see fold)."""
        if self._table_stale:
            self._refresh_table()
            self._table_stale = False
        if self._inputs_stale:
            self._refresh_inputs()
            self._inputs_stale = False

    def _broad_sample(self) -> bool:
        """Whether the reference sample holds enough inputs of enough clients to stand for the model."""
        return len(self.s_raw) >= 64 and len(np.unique(self.s_clients)) >= max(4, self.min_clients // 2)

    def _frozen_frame(self) -> Frame:
        """The input frame, fixed from the reference sample the first time it is asked for: from then
        on, cells and fingerprints must stay comparable."""
        if self.frame is None:
            raw = self.s_raw.astype(np.float64)  # float32 squares overflow beyond 1.8e19
            # The spread of each client's inputs within the other clients' range: one client's extreme
            # inputs (a client sending 1e30, by fault or to blind the detector) would otherwise set a
            # feature's scale, and the frame stays as it is first fixed.
            scale = within_other_clients(raw, self.s_clients).std(axis=0)
            floor = max(float(scale.mean()) * 0.05, 1e-6)
            self.frame = Frame(np.median(raw, axis=0), np.maximum(scale, floor))
        return self.frame

    def _refresh_inputs(self) -> None:
        if not self._broad_sample():
            return
        raw = self.s_raw
        frame = self._frozen_frame()
        # The model's input bounds, which inputs clipped by an attack sit at ("pinned"). Reached by two
        # clients at least: one client's wild values must not move them away from where everyone else's
        # inputs end (clipped attack inputs would then no longer count as pinned).
        self.low, self.high = shared_range(raw, self.s_clients)
        standard = frame.standardise(raw)
        self.input_model = InputDensityModel(input_summaries(pinned_at_bounds(raw, self.low, self.high), standard))
        z = frame.project(standard)
        self.sample = z
        self.sample_clients = self.s_clients
        z64 = z.astype(np.float64)
        self.sample_sq = (z64 * z64).sum(axis=1)
        # Leave-one-client-out nearest-neighbour distances inside the sample: the radius of "normal".
        d = _pairwise(z, z)
        d[self.s_clients[:, None] == self.s_clients[None, :]] = np.inf
        nn = d.min(axis=1)
        nn = nn[np.isfinite(nn)]
        self.ood_radius = float(np.quantile(nn, 0.97)) if len(nn) else float("inf")

    def _refresh_table(self) -> None:
        """Per signal and bucket: the warm bucket to use and its median, upper quartile and size."""
        # Weights are queries; a client passing through a bucket contributes about its width.
        # Names the published baselines: sessions scored against other baselines (another worker's,
        # before an adoption) can tell.
        self.version = zlib.crc32(self.hist.tobytes(), self.epochs)
        totals = self.hist.sum(axis=2) / BUCKET_WIDTHS[None, :]
        cum = np.cumsum(self.hist, axis=2) / BUCKET_WIDTHS[None, :, None]
        table = np.full((self.n_signals, N_BUCKETS, 4), np.nan)
        for s in range(self.n_signals):
            warm = -1
            for b in range(N_BUCKETS):
                if totals[s, b] >= self.min_clients:
                    warm = b
                if warm < 0:
                    continue
                q50 = from_bin(int(np.searchsorted(cum[s, warm], 0.5 * totals[s, warm])) + 0.5, self.scales[s])
                q75 = from_bin(int(np.searchsorted(cum[s, warm], 0.75 * totals[s, warm])) + 0.5, self.scales[s])
                table[s, b] = (warm, q50, q75, totals[s, warm])
        self.table = table

    # -------------------------------------------------------------------------------------- reading
    @property
    def young(self) -> bool:
        """Still in the doubling epochs of warm-up: each publish may change the baselines a lot. With
        shared baselines, the records folded in count, the whole group's: this worker's own count
        tells only its share of the stream, and the number of folds says little, since every worker,
        and every restart of one, begins its own doubling epochs (a worker restarted early in a
        backlog had five folds, of 1,700 records, after reading a quarter of one partition, and
        judged that partition's clients against nine of them)."""
        records = self.folded_records if self.shared else self.records
        return _epoch_index(records, self.epoch_records) < 5

    @property
    def inputs_ready(self) -> bool:
        return self.frame is not None and len(self.sample) > 0

    def baselines(self, bucket: int) -> list[list[float]]:
        """Per signal, [bucket used, median, upper quartile, clients] for a client in ``bucket``: the
        highest bucket at or below it with enough clients (all NaN while warming up)."""
        rows: list[list[float]] = self.table[:, bucket].tolist()
        return rows

    # ----------------------------------------------------------------------------------- checkpoint
    def published_state(self) -> dict[str, Any]:
        hist_idx, hist_val = _sparse(self.hist, np.float64)
        return {
            "epochs": self.epochs,
            "folded_to": self.folded_to,
            "folded_records": self.folded_records,
            "hist_idx": hist_idx,
            "hist_val": hist_val,
            "frame": None if self.frame is None else [self.frame.centre, self.frame.scale],
            "s_raw": self.s_raw,
            "s_hash": self.s_hash,
            "s_clients": self.s_clients,
        }

    def pending_state(self) -> dict[str, Any]:
        idx, val = _sparse(self.pending, np.float32)
        return {
            "records": self.records,
            "pending_records": self.pending_records,
            "contributions": self.contributions,
            "pending_idx": idx,
            "pending_val": val,
            "p_raw": self.p_raw,
            "p_hash": self.p_hash,
            "p_clients": self.p_clients,
        }

    def load_published(self, data: dict[str, Any]) -> None:
        self.epochs = int(data["epochs"])
        self.folded_to = int(data.get("folded_to", 0))
        self.folded_records = int(data.get("folded_records", 0))
        self.hist = _dense(data["hist_idx"], data["hist_val"], self.hist.shape)
        self._refresh_table()
        if data["frame"] is not None:
            self.frame = Frame(np.asarray(data["frame"][0]), np.asarray(data["frame"][1]))
        self.s_raw, self.s_hash, self.s_clients = data["s_raw"], data["s_hash"], data["s_clients"]
        self._refresh_inputs()
        self.dirty_published = False

    def load_pending(self, data: dict[str, Any]) -> None:
        self.records = float(data["records"])
        self.pending_records = int(data.get("pending_records", 0))
        self.contributions = int(data.get("contributions", 0))
        self._epoch_end = _epoch_end(self.records, self.epoch_records, self._cap)
        self.pending = _dense(data["pending_idx"], data["pending_val"], self.hist.shape)
        self.p_raw, self.p_hash, self.p_clients = data["p_raw"], data["p_hash"], data["p_clients"]

    def nbytes(self) -> int:
        return int(self.hist.nbytes + self.pending.nbytes + self.s_raw.nbytes + self.p_raw.nbytes + self.sample.nbytes)


def _client_extremes(values: np.ndarray, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's client (an index) and, per client and feature, the minimum and maximum of its rows."""
    ids, owner = np.unique(clients, return_inverse=True)
    low = np.full((len(ids), values.shape[1]), np.inf)
    high = np.full((len(ids), values.shape[1]), -np.inf)
    np.minimum.at(low, owner, values)
    np.maximum.at(high, owner, values)
    return owner, low, high


def within_other_clients(values: np.ndarray, clients: np.ndarray) -> np.ndarray:
    """``values`` (rows of inputs, ``clients`` their senders) with each client's rows clipped, feature
    by feature, to the range of the other clients' rows widened by its width on each side: no one
    client can stretch what is computed from them by more than a few times, and inputs that merely lie
    beyond the others' are kept. (Unchanged with fewer than two clients.)"""
    owner, low, high = _client_extremes(values, clients)
    if len(low) < 2:
        return values
    lows, highs = np.sort(low, axis=0), np.sort(high, axis=0)
    # The others' extreme: the overall one, or the runner-up where this client holds it (on a tie the
    # runner-up equals it).
    others_low = np.where(low == lows[0], lows[1], lows[0])
    others_high = np.where(high == highs[-1], highs[-2], highs[-1])
    width = others_high - others_low
    return np.clip(values, (others_low - width)[owner], (others_high + width)[owner])


def shared_range(values: np.ndarray, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the lowest and highest value that at least two clients' rows reach (the runner-up
    of the clients' minima and maxima; the rows' own extremes with fewer than two clients)."""
    _, low, high = _client_extremes(values, clients)
    if len(low) < 2:
        return values.min(axis=0), values.max(axis=0)
    return np.partition(low, 1, axis=0)[1], np.partition(high, -2, axis=0)[-2]


def _sparse(values: np.ndarray, dtype: type[np.floating[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero cells of a (signal, bucket, bin) array: their indices (3 × n) and values."""
    nz = np.nonzero(values)
    return np.stack(nz).astype(np.int32), values[nz].astype(dtype)


def _dense(idx: Any, val: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The array whose non-zero cells ``_sparse`` gave."""
    out = np.zeros(shape, dtype=np.float64)
    cells = np.asarray(idx, dtype=np.int64)
    if cells.shape[1]:
        out[cells[0], cells[1], cells[2]] = np.asarray(val, dtype=np.float64)
    return out


def _epoch_index(records: float, first: int, cap: int = 0) -> int:
    """Epoch boundaries at first·(1, 2, 4, ...) up to ``cap`` (first times a power of 2; by default
    16·first), then every ``cap`` records."""
    cap = cap or 16 * first
    if records < cap:
        return math.floor(math.log2(records / first)) + 1 if records >= first else 0
    return round(math.log2(cap / first)) + 1 + int((records - cap) // cap)


def _epoch_end(records: float, first: int, cap: int = 0) -> int:
    """The record count after ``records`` at which the next epoch completes (``_epoch_index`` rises)."""
    cap = cap or 16 * first
    if records < first:
        return first
    if records < cap:
        return first * 2 ** (_epoch_index(records, first, cap))
    return cap * (int((records - cap) // cap) + 2)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


_GRID = 256  # rates at which the population's upper tail is integrated in share_tail_probability
_BAND = 8  # ... and its quarter between the median and the upper quartile


def share_tail_probability(k: float, n: int, q50: float, q75: float, floor: float) -> float:
    """P(a population client shows ≥ ``k`` of ``n`` queries), for a share that counts queries: the
    binomial luck of ``n`` queries integrated over the population's rates, modelled as in
    ``tail_probability`` (half the clients at or below q50, a quarter up to q75, the rest in the
    exponential tail). With many queries this is ``tail_probability`` of the share; with few, a high
    share is only as surprising as the chance that an ordinary client, or one of the population's
    higher-rate clients, gets that many by luck."""
    return float(share_tail_probabilities(np.array([k]), np.array([n]), np.array([q50]), np.array([q75]), floor)[0])


def share_tail_probabilities(
    k: np.ndarray, n: np.ndarray, q50: np.ndarray, q75: np.ndarray, floor: float | np.ndarray
) -> np.ndarray:
    """``share_tail_probability`` of many clients (rows; ``floor``: one, or one per row). Remembered:
    a baseline holds between publishes and clients are scored at the same query counts, so the same
    (k, n) against the same quartiles recurs across clients and evaluations (most rows, with many
    short sessions). The rest take one incomplete-beta evaluation per distinct pair of quartiles and
    floor (their rates are shared)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    floors = np.broadcast_to(np.asarray(floor, dtype=np.float64), k.shape)
    out = np.where(k <= 0.0, 1.0, 0.0)  # k > n: impossible by luck
    live = np.flatnonzero((k > 0.0) & (k <= n))
    keys = list(
        zip(
            k[live].tolist(),
            n[live].tolist(),
            q50[live].tolist(),
            q75[live].tolist(),
            floors[live].tolist(),
            strict=True,
        )
    )
    known = list(map(_SHARE_TAILS.get, keys))  # None: not remembered
    missing: dict[tuple[float, float, float], list[int]] = {}  # (q50, q75, floor) -> positions in live
    for i in [i for i, p in enumerate(known) if p is None]:
        missing.setdefault(keys[i][2:], []).append(i)
        known[i] = math.nan
    out[live] = known
    if len(_SHARE_TAILS) > _SHARE_TAILS_MAX:
        _SHARE_TAILS.clear()
    for (x, y, f), found in missing.items():
        rates, mass = _rate_mixture(x, y, f)
        rows = live[found]
        luck = _binomial_sf(k[rows, None], n[rows, None], rates[None, :])
        values = np.minimum(1.0, (mass[None, :] * luck).sum(axis=1))
        out[rows] = values
        _SHARE_TAILS.update(zip((keys[i] for i in found), values.tolist(), strict=True))
    return out


_SHARE_TAILS: dict[tuple[float, float, float, float, float], float] = {}
_SHARE_TAILS_MAX = 65_536


@functools.lru_cache(maxsize=1024)
def _rate_mixture(q50: float, q75: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The population's rates and their probability masses, as ``share_tail_probability`` models them."""
    spread = max(q75 - q50, floor)
    edges = np.linspace(q75, 1.0, _GRID + 1)
    beyond = 0.25 * np.exp2(-(edges - q75) / spread)  # P(rate > edge)
    band = q50 + (q75 - q50) * (np.arange(_BAND) + 0.5) / _BAND  # the quarter between q50 and q75
    rates = np.concatenate([[q50], band, 0.5 * (edges[:-1] + edges[1:]), [1.0]])
    mass = np.concatenate([[0.5], np.full(_BAND, 0.25 / _BAND), beyond[:-1] - beyond[1:], [beyond[-1]]])
    rates.setflags(write=False)  # shared by the cache
    mass.setflags(write=False)
    return rates, mass


def _binomial_sf(k: np.ndarray | float, n: np.ndarray | float, rates: np.ndarray) -> np.ndarray:
    """P(X ≥ k) for X ~ Binomial(n, rate), element-wise (broadcast; 0 < k ≤ n), continuous in k (the
    regularised incomplete beta)."""
    from scipy.special import betainc  # lazily: scipy is slow to import for commands that score nothing

    return np.asarray(betainc(k, n - k + 1.0, np.clip(rates, 0.0, 1.0)), dtype=np.float64)


def binomial_tail(k: float, n: int, rate: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, rate)."""
    if k <= 0.0:
        return 1.0
    if k > n:
        return 0.0
    return float(_binomial_sf(k, n, np.array([rate]))[0])


def tail_probability(value: float, q50: float, q75: float, floor: float) -> float:
    """P(a population value ≥ ``value``): an exponential tail beyond the upper quartile whose rate
    is fixed by the robust spread q75 - q50 (for an exponential tail, the value doubles its odds every
    spread). Quartiles, not extreme quantiles, so that up to a quarter of the population may be
    attackers (or odd) without moving the baseline much."""
    if value <= q75:
        return 0.5 if value > q50 else 1.0
    spread = max(q75 - q50, floor)
    return 0.25 * 2.0 ** (-(value - q75) / spread)
