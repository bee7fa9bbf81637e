"""Per-session signals: small estimators with bounded state and one consistent API.

Every signal follows the same protocol, in the spirit of River's ``learn_one`` / ``score_one`` but
vectorised over a block of queries: ``learn_block(block)`` folds a session's queries from one
micro-batch into the state (numpy over the whole block, no Python loop per value), ``value()``
reads the current signal value and ``evidence()`` explains it in words. State is fixed-size, so a
session costs the same bytes after ten queries or ten million.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec
import numpy as np


class QueryBlock(msgspec.Struct, gc=False):
    """One session's queries from one micro-batch, in columns."""

    ts: np.ndarray  # float64 event times, epoch seconds
    vectors: np.ndarray | None  # float32 (n, d) where every query had an input vector, else None
    margins: np.ndarray  # float32 top-1 minus top-2 probability; NaN where unknown
    confidences: np.ndarray  # float32 top-1 probability; NaN where unknown
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.ts)


class SessionSignal:
    """Base class: a named signal that is evidence for one attack kind."""

    name: ClassVar[str]
    kind: ClassVar[str]
    __slots__: tuple[str, ...] = ()

    def learn_block(self, block: QueryBlock) -> None:
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError

    def evidence(self) -> str:
        raise NotImplementedError

    def state_bytes(self) -> int:
        total = 0
        for slot in self.__slots__:
            item = getattr(self, slot)
            total += item.nbytes if isinstance(item, np.ndarray) else 8
        return total

    def to_state(self) -> dict[str, object]:
        return {slot: getattr(self, slot) for slot in self.__slots__}

    def load_state(self, state: dict[str, object]) -> None:
        for slot in self.__slots__:
            setattr(self, slot, state[slot])


class QueryRateSignal(SessionSignal):
    """Queries per minute of event time over the session so far."""

    name = "query_rate_per_min"
    kind = "volume"
    __slots__ = ("first_ts", "last_ts", "n")

    def __init__(self) -> None:
        self.first_ts = float("inf")
        self.last_ts = float("-inf")
        self.n = 0

    def learn_block(self, block: QueryBlock) -> None:
        self.first_ts = min(self.first_ts, float(block.ts.min()))
        self.last_ts = max(self.last_ts, float(block.ts.max()))
        self.n += len(block)

    def value(self) -> float:
        # A floor of one minute keeps a handful of queries in the same second from looking like a flood.
        span_min = max((self.last_ts - self.first_ts) / 60.0, 1.0)
        return self.n / span_min

    def evidence(self) -> str:
        return f"{self.value():.0f} queries/min over {self.n} queries"


class HyperLogLog:
    """A 2^p-register HyperLogLog over 64-bit hashes, updated with numpy (p=8: 256 bytes, ~6.5% error)."""

    def __init__(self, p: int = 8, registers: np.ndarray | None = None) -> None:
        self.p = p
        self.registers = registers if registers is not None else np.zeros(1 << p, dtype=np.uint8)

    def add_hashes(self, hashes: np.ndarray) -> None:
        hashes = hashes.astype(np.uint64, copy=False)
        index = (hashes >> np.uint64(64 - self.p)).astype(np.int64)
        rest = (hashes << np.uint64(self.p)) | np.uint64(1 << (self.p - 1))
        # Rank = position of the first set bit in the remaining bits (1-based).
        rank = (64 - np.floor(np.log2(rest.astype(np.float64))).astype(np.int64)).astype(np.uint8)
        np.maximum.at(self.registers, index, rank)

    def count(self) -> float:
        m = float(len(self.registers))
        alpha = 0.7213 / (1 + 1.079 / m)
        estimate = alpha * m * m / float(np.sum(np.exp2(-self.registers.astype(np.float64))))
        zeros = int(np.count_nonzero(self.registers == 0))
        if estimate <= 2.5 * m and zeros:
            return m * float(np.log(m / zeros))  # linear counting for small cardinalities
        return estimate


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads structured integers (cell codes) over all 64 bits."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class InputCellHasher:
    """Random-hyperplane LSH: maps input vectors to cells (one 64-bit code per vector).

    Shared by all sessions of a model (the hyperplanes are a function of the dimension and a fixed
    seed), so that cells are comparable across clients and across restarts.
    """

    def __init__(self, dim: int, bits: int = 24, seed: int = 20261129) -> None:
        rng = np.random.default_rng(seed + dim)
        self.planes = rng.standard_normal((dim, bits)).astype(np.float32)
        self.weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64)).astype(np.uint64)

    def cells(self, vectors: np.ndarray) -> np.ndarray:
        centred = vectors - vectors.mean(axis=1, keepdims=True) if vectors.shape[1] > 1 else vectors
        bits = (centred @ self.planes) > 0
        return _mix64(bits.astype(np.uint64) @ self.weights)


class DistinctInputCellsSignal(SessionSignal):
    """How many distinct LSH input cells a session has touched (HyperLogLog), and how fast it grows.

    Model extraction has to cover the input space; an ordinary client asks about the inputs its
    business produces, which fall in comparatively few cells.
    """

    name = "distinct_input_cells"
    kind = "extraction"
    __slots__ = ("registers", "n")
    hasher_for: ClassVar[dict[int, InputCellHasher]] = {}

    def __init__(self) -> None:
        self.registers = np.zeros(256, dtype=np.uint8)
        self.n = 0

    def learn_block(self, block: QueryBlock) -> None:
        if block.vectors is None:
            return
        dim = block.vectors.shape[1]
        hasher = self.hasher_for.get(dim)
        if hasher is None:
            hasher = self.hasher_for.setdefault(dim, InputCellHasher(dim))
        HyperLogLog(registers=self.registers).add_hashes(hasher.cells(block.vectors))
        self.n += len(block)

    def distinct(self) -> float:
        return HyperLogLog(registers=self.registers).count() if self.n else 0.0

    def value(self) -> float:
        return self.distinct()

    def evidence(self) -> str:
        return f"{self.distinct():.0f} distinct input cells in {self.n} queries"


class LowMarginShareSignal(SessionSignal):
    """Share of queries whose top-1 minus top-2 probability is under ``threshold``.

    Boundary attacks spend their queries right at the decision boundary, where the margin is tiny;
    ordinary traffic sits mostly far from it.
    """

    name = "low_margin_share"
    kind = "boundary_probing"
    threshold: ClassVar[float] = 0.1
    __slots__ = ("known", "low")

    def __init__(self) -> None:
        self.known = 0
        self.low = 0

    def learn_block(self, block: QueryBlock) -> None:
        known = ~np.isnan(block.margins)
        self.known += int(known.sum())
        self.low += int((block.margins[known] < self.threshold).sum())

    def value(self) -> float:
        return self.low / self.known if self.known else 0.0

    def evidence(self) -> str:
        return f"{self.low} of {self.known} outputs within {self.threshold} of the decision boundary"


class NearDuplicateShareSignal(SessionSignal):
    """Share of queries that lie within a tiny relative distance of one of the session's recent queries.

    Decision-based attacks (HopSkipJump, Boundary Attack) walk in small steps, so each query is
    a near-copy of a recent one. A fixed ring of the last ``ring_size`` vectors bounds the state.
    Exact repeats (retries) are not counted: they carry no new information for an attacker.
    """

    name = "near_duplicate_share"
    kind = "boundary_probing"
    ring_size: ClassVar[int] = 16
    relative_radius: ClassVar[float] = 0.05
    __slots__ = ("ring", "filled", "cursor", "n", "near")

    def __init__(self) -> None:
        self.ring = np.zeros((0, 0), dtype=np.float32)
        self.filled = 0
        self.cursor = 0
        self.n = 0
        self.near = 0

    def learn_block(self, block: QueryBlock) -> None:
        if block.vectors is None:
            return
        vectors = block.vectors
        if self.ring.shape[1] != vectors.shape[1]:
            self.ring = np.zeros((self.ring_size, vectors.shape[1]), dtype=np.float32)
            self.filled = self.cursor = 0
        # Each query is compared with the ring as it stood before the block plus the block's earlier
        # queries: one distance matrix for the whole block.
        history = np.concatenate([self.ring[: self.filled], vectors])
        dists = np.linalg.norm(vectors[:, None, :] - history[None, :, :], axis=2)
        offset = self.filled
        n = len(vectors)
        idx = np.arange(n)
        # Only earlier queries count, within the last ring_size of them.
        earlier = np.arange(len(history))[None, :] < (offset + idx)[:, None]
        recent = np.arange(len(history))[None, :] >= (offset + idx - self.ring_size)[:, None]
        valid = earlier & recent
        scale = np.linalg.norm(vectors, axis=1) + 1e-6
        close = (dists <= self.relative_radius * scale[:, None]) & (dists > 1e-9) & valid
        self.near += int(close.any(axis=1).sum())
        self.n += n
        for vector in vectors[-self.ring_size :]:
            self.ring[self.cursor] = vector
            self.cursor = (self.cursor + 1) % self.ring_size
            self.filled = min(self.filled + 1, self.ring_size)

    def value(self) -> float:
        return self.near / self.n if self.n else 0.0

    def evidence(self) -> str:
        return f"{self.near} of {self.n} queries are small steps from a recent query"


DEFAULT_SIGNALS: tuple[type[SessionSignal], ...] = (
    QueryRateSignal,
    DistinctInputCellsSignal,
    LowMarginShareSignal,
    NearDuplicateShareSignal,
)
