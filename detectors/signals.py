"""Per-client signals: small estimators with bounded state and one consistent API.

Every signal follows the same protocol, in the spirit of River's ``learn_one`` / ``score_one`` but
vectorised over a block of queries: ``learn_block(block)`` folds a client's queries from one chunk
into the state (numpy over the whole block, no Python loop per value), ``values()`` reads the current
signal values (NaN: not available, e.g. no input vectors or label-only outputs) and ``evidence(i)``
explains value ``i`` in words. State is fixed-size, so a client costs the same bytes after ten queries
or ten million.

What a signal needs per query that depends only on the query and the model's published population
(fingerprints, LSH cells, nearest reference input, pinned features) is derived once per model for a
whole micro-batch by ``derive_features``, across clients, and a client's block is a slice of it.
Folding into state is vectorised across clients too: the engine advances all clients one chunk per
round, and ``learn_many`` folds a whole round (a ``BlockRound``) in one pass, exactly as the clients'
blocks one by one would. (Per block, numpy call overhead was most of the cost when clients send a
few queries each.)

Signals live on the (model, client) history, not on one session, so pausing between sessions does
not start clean. Everything accumulated is exact under re-chunking (integer counters, fixed-point
sums, per-query computations that do not depend on the block's shape): the alerts of a replay must
not depend on how the stream was cut into batches.

Which attack kind each value is evidence for, and how it is calibrated, is declared in ``OUTPUTS``:
(value name, kinds, histogram scale "unit" for shares in [0, 1] or "log", spread floor).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np

from detectors.input_model import input_summaries, pinned_at_bounds
from detectors.population import ModelPopulation, mix64

FIXED = 1_000_000  # fixed-point scale for exact sums of per-query floats


class QueryBlock(msgspec.Struct, gc=False):
    """One client's queries from one chunk, in columns, plus what the model's population gives (the
    engine also holds a model's whole micro-batch in one, and cuts clients' blocks from it: ``rows``)."""

    ts: np.ndarray  # float64 event times, epoch seconds
    vectors: np.ndarray | None  # float32 (n, d) where every query had an input vector, else None
    margins: np.ndarray  # float32 top-1 minus top-2 probability; NaN where unknown
    confidences: np.ndarray  # float32 top-1 probability; NaN where unknown
    labels: list[str | None]
    label_codes: np.ndarray | None = None  # uint32 per query (0: no label)
    z: np.ndarray | None = None  # standardised inputs (model frame), when the model is warm
    zp: np.ndarray | None = None  # z projected to ≤ 32 dims
    exact: np.ndarray | None = None  # uint64 content hash of each raw vector
    population: ModelPopulation | None = None
    client_hash: int = 0
    # Per-query features (derive_features), where the inputs they need are there:
    cells: np.ndarray | None = None  # uint64 LSH cell hash of zp
    fp: np.ndarray | None = None  # uint32 content fingerprints of z
    far: np.ndarray | None = None  # bool: farther from other clients' reference inputs than normal
    pinned: np.ndarray | None = None  # bool (n, d): features at the model's input bounds
    roughness: np.ndarray | None = None  # float64 high-frequency energy of the input (input_summaries)
    strangeness: np.ndarray | None = None  # float64 HalfSpaceTrees anomaly score of the input

    def __len__(self) -> int:
        return len(self.ts)

    def rows(self, start: int, stop: int, client_hash: int, with_vectors: bool) -> QueryBlock:
        """Rows ``start:stop`` as one client's block (views, no copies). ``with_vectors`` false drops
        every vector-derived column: a block has vectors for all its queries or for none."""
        cut = slice(start, stop)

        def part(column: np.ndarray | None, vector_derived: bool = True) -> np.ndarray | None:
            return None if column is None or (vector_derived and not with_vectors) else column[cut]

        return QueryBlock(
            ts=self.ts[cut],
            vectors=part(self.vectors),
            margins=self.margins[cut],
            confidences=self.confidences[cut],
            labels=self.labels[cut],
            label_codes=part(self.label_codes, vector_derived=False),
            z=part(self.z),
            zp=part(self.zp),
            exact=part(self.exact),
            population=self.population,
            client_hash=client_hash,
            cells=part(self.cells),
            fp=part(self.fp),
            far=part(self.far),
            pinned=part(self.pinned),
            roughness=part(self.roughness),
            strangeness=part(self.strangeness),
        )


def derive_features(block: QueryBlock, client_hashes: np.ndarray | None = None) -> QueryBlock:
    """Fill the block's per-query features from its vectors and population (in place; returns it).

    Each row's features depend on its own query and the published population only (exact per row:
    no BLAS), so deriving them for a model's whole micro-batch at once gives what block by block
    would. ``client_hashes`` names each row's client for the leave-one-client-out distance (default:
    the block's ``client_hash``)."""
    pop = block.population
    if block.zp is not None:
        block.cells = lsh_cells(block.zp)
        if pop is not None and pop.inputs_ready:
            clients = client_hashes if client_hashes is not None else np.full(len(block), block.client_hash, np.uint64)
            block.far = beyond_other_clients(pop, block.zp, clients, pop.ood_radius)
    if block.z is not None:
        block.fp = fingerprints(block.z)
        if block.vectors is not None and pop is not None and pop.low is not None and pop.high is not None:
            block.pinned = pinned_at_bounds(block.vectors, pop.low, pop.high)
            summaries = input_summaries(block.pinned, block.z)
            block.roughness = summaries[:, 1]
            if pop.input_model is not None:
                block.strangeness = pop.input_model.score(summaries)
    return block


def label_codes(labels: list[str | None]) -> np.ndarray:
    """A stable small code per label (0 = no label)."""
    out = np.zeros(len(labels), dtype=np.uint32)
    cache: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label is None:
            continue
        code = cache.get(label)
        if code is None:
            code = (
                int(label) + 1
                if label.isdigit() and len(label) < 6
                else ((sum(label.encode()) * 2654435761 + len(label)) & 0x7FFFFFFF) | 1
            )
            cache[label] = code
        out[i] = code
    return out


def exact_hashes(vectors: np.ndarray) -> np.ndarray:
    """A 64-bit content hash per vector (equal vectors, equal hashes); order-free, exact."""
    words = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = mix64(words + np.arange(words.shape[1], dtype=np.uint64)[None, :] * np.uint64(0x9E3779B1))
        return mixed.sum(axis=1, dtype=np.uint64)


def bcast_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b without BLAS, so each row's result does not depend on how many rows there are."""
    return (a.astype(np.float64)[:, :, None] * b.astype(np.float64)[None, :, :]).sum(axis=1)


def bcast_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows of a and rows of b, per-pair exact."""
    diff = a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None, :, :]
    return np.sqrt((diff * diff).sum(axis=2))


@functools.cache
def _shapiro() -> Callable[[np.ndarray], Any]:
    """scipy's Shapiro–Wilk, imported on first use (scipy.stats takes over a second to import, which
    CLI commands that score nothing should not pay), without its nan-policy wrapper (ten times the
    cost of the test itself on 128 values; the distances are never NaN)."""
    from scipy.stats import shapiro

    return getattr(shapiro, "__wrapped__", shapiro)


def ring_append(
    rings: tuple[np.ndarray, ...], items: tuple[np.ndarray, ...], cursor: int, filled: int
) -> tuple[int, int]:
    """Write the last ``len(ring)`` rows of ``items`` (parallel arrays) into the fixed-size ``rings``
    from ``cursor`` on, wrapping; returns the new (cursor, filled)."""
    size = len(rings[0])
    m = min(len(items[0]), size)
    if m == 0:
        return cursor, filled
    if cursor + m <= size:  # the common case: no wrap, a slice
        for ring, values in zip(rings, items, strict=True):
            ring[cursor : cursor + m] = values[len(values) - m :]
    else:
        slots = (cursor + np.arange(m)) % size
        for ring, values in zip(rings, items, strict=True):
            ring[slots] = values[len(values) - m :]
    return (cursor + m) % size, min(filled + m, size)


class RecentWindows:
    """For a round of clients, each query's window of the client's recent queries: the ring of its
    last ``size`` queries from earlier blocks (oldest first, right-aligned), then the round's block,
    padded to the longest block. Query ``i`` of a block sits at position ``size + i``; its earlier
    queries within ``size`` are the positions ``[i, size + i)`` that hold a query (see ``earlier``).
    Per-pair arithmetic is what a block-by-block window gives, so results do not depend on rounds."""

    def __init__(self, size: int, cursors: np.ndarray, filled: np.ndarray, owner: np.ndarray) -> None:
        self.size = size
        self.filled = filled
        self.owner = owner
        self.index = np.arange(len(owner)) - _block_bounds(owner, len(cursors))[owner]
        self.width = size + (int(self.index.max()) + 1 if len(owner) else 0)
        # Ring slot at window position p (p < size): (cursor + p) % size, oldest first; a ring not yet
        # full has cursor == filled, so its empty slots come first and fall outside `earlier`.
        self._slots = (cursors[:, None] + np.arange(size)[None, :]) % size

    @classmethod
    def over_rings(cls, signals: Sequence[Any], size: int, width: int, dtype: type, owner: np.ndarray) -> RecentWindows:
        """Windows over the rings of ``signals`` (each with ``ring``, ``cursor`` and ``filled``); a
        ring of another width than the round's queries (the model's input changed) starts empty."""
        for signal in signals:
            if signal.ring.shape[1:] != (width,):
                signal.ring = np.zeros((size, width), dtype=dtype)
                signal.filled = signal.cursor = 0
        return cls(size, np.array([sig.cursor for sig in signals]), np.array([sig.filled for sig in signals]), owner)

    def stack(self, rings: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """One padded window array from the clients' rings and the round's rows of one column."""
        ring = _stacked(rings)
        out = np.zeros((len(rings), self.width, *rows.shape[1:]), dtype=ring.dtype)
        out[:, : self.size] = ring[np.arange(len(rings))[:, None], self._slots]
        out[self.owner, self.size + self.index] = rows
        return out

    def recent(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """Index (into a ``stack``) of the ``size`` window positions before each of the round's query
        ``rows``: (client, position) pairs to index with, the clients as (rows, 1) and the positions
        ``[i, size + i)`` for query ``i`` of its block as (rows, size)."""
        return self.owner[rows][:, None], self.index[rows][:, None] + np.arange(self.size)[None, :]

    def earlier(self, rows: slice) -> np.ndarray:
        """(rows, size) mask over ``recent(rows)``: the positions holding an earlier query of the row's
        client (a ring not yet full has its empty slots first)."""
        position = self.index[rows][:, None] + np.arange(self.size)[None, :]
        return position >= self.size - self.filled[self.owner[rows]][:, None]


_WINDOW_ROWS = 256  # query rows per slab of window arithmetic (bounded temporaries)


class BlockRound:
    """One round of many clients' blocks (one block per client), for a vectorised ``learn_many``:
    a column of every block that has it, concatenated, with each row's index into those blocks."""

    __slots__ = ("_columns", "blocks")

    def __init__(self, blocks: Sequence[QueryBlock]) -> None:
        self.blocks = blocks
        self._columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices of the blocks that have column ``name``, their rows concatenated, the position
        in those indices of each row's block). Cached: several signals read the same columns."""
        found = self._columns.get(name)
        if found is None:
            which: list[int] = []
            parts: list[np.ndarray] = []
            for i, block in enumerate(self.blocks):
                part = getattr(block, name)
                if part is not None:
                    which.append(i)
                    parts.append(part)
            rows = np.concatenate(parts) if parts else np.zeros(0)
            owner = np.repeat(np.arange(len(which)), [len(part) for part in parts])
            found = (np.array(which, dtype=np.int64), rows, owner)
            self._columns[name] = found
        return found


def _per_block(values: np.ndarray, owner: np.ndarray, n_blocks: int) -> np.ndarray:
    """Sum of ``values`` (integers, or floats holding integers: exact in any order) per block."""
    return np.bincount(owner, weights=values, minlength=n_blocks).astype(np.int64)


def _stacked(arrays: list[np.ndarray]) -> np.ndarray:
    """Same-shaped arrays, one per client of a round, stacked: ``np.array`` builds it in one C pass,
    where ``np.stack`` spends Python work on every array (2.5 times the cost for hundreds of rings)."""
    return np.array(arrays)


def _block_bounds(owner: np.ndarray, n_blocks: int) -> np.ndarray:
    """Where each block's rows begin in a column (``owner`` as ``BlockRound.column`` gives it, or of
    rows selected from it, which stay in block order), then the row count: block j's rows are
    ``bounds[j]:bounds[j + 1]``. (Not ``np.r_`` over the changes of owner: its indexing machinery
    costs more than the arithmetic on a round's rows.)"""
    bounds = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_blocks), out=bounds[1:])
    return bounds


class SessionSignal:
    """Base class: one or more named values that are evidence for attack kinds.

    A signal implements ``learn_block`` (one client's chunk) or ``learn_many`` (a round of many
    clients' chunks, vectorised across them, where per-block work is mostly numpy call overhead);
    each defaults to the other. Likewise ``values`` and ``values_many``."""

    name: ClassVar[str]
    OUTPUTS: ClassVar[tuple[tuple[str, tuple[str, ...], str, float], ...]]
    __slots__: tuple[str, ...] = ()

    def learn_block(self, block: QueryBlock) -> None:
        type(self).learn_many([self], BlockRound([block]))

    @classmethod
    def learn_many(cls, signals: Sequence[Any], blocks: BlockRound) -> None:
        """``signals[i]`` learns ``blocks.blocks[i]``, for each i."""
        for signal, block in zip(signals, blocks.blocks, strict=True):
            signal.learn_block(block)

    def values(self) -> list[float]:
        """This signal's values (NaN: not available)."""
        return type(self).values_many([self])[0].tolist()

    @classmethod
    def values_many(cls, signals: Sequence[Any]) -> np.ndarray:
        """The values of many clients' signals, one row each (float64, NaN: not available). A signal
        implements ``values`` or ``values_many``; each defaults to the other."""
        return np.array([signal.values() for signal in signals], dtype=np.float64).reshape(
            len(signals), len(cls.OUTPUTS)
        )

    def evidence(self, i: int) -> str:
        raise NotImplementedError

    @classmethod
    def state_bytes_many(cls, signals: Sequence[Any]) -> list[int]:
        """Approximate bytes of state of many signals of this type: their arrays' bytes, 8 per other
        slot. A slot holds an array always or never (arrays start empty), so the first signal tells
        which slots to measure: every client's evaluation reports its state, and a per-slot type test
        cost as much as the rest of the evaluation's bookkeeping."""
        if not signals:
            return []
        arrays = [slot for slot in cls.__slots__ if isinstance(getattr(signals[0], slot), np.ndarray)]
        scalars = 8 * (len(cls.__slots__) - len(arrays))
        if not arrays:
            return [scalars] * len(signals)
        # An attrgetter of dotted names reads the arrays' nbytes in C (one per signal, not per array).
        if len(arrays) == 1:
            size = operator.attrgetter(f"{arrays[0]}.nbytes")
            return [scalars + size(signal) for signal in signals]
        sizes = operator.attrgetter(*(f"{slot}.nbytes" for slot in arrays))
        return [scalars + sum(sizes(signal)) for signal in signals]

    def to_state(self) -> dict[str, object]:
        return {slot: getattr(self, slot) for slot in self.__slots__}

    def load_state(self, state: dict[str, object]) -> None:
        for slot in self.__slots__:
            if slot in state:
                setattr(self, slot, state[slot])


def _codes_of(blocks: BlockRound, which: np.ndarray) -> np.ndarray:
    """Label codes of the rows of blocks ``which`` (0 where a block has none)."""
    return np.concatenate(
        [
            codes if (codes := blocks.blocks[i].label_codes) is not None else np.zeros(len(blocks.blocks[i]), np.uint32)
            for i in which.tolist()
        ]
    )


def _share(num: int, den: int) -> float:
    return num / den if den else float("nan")


# --------------------------------------------------------------------------------------- extraction
HLL_P = 8  # 2^8 HyperLogLog registers: 256 bytes, ~6.5% error


def hll_update(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(register index, rank) of each 64-bit hash in a 2^HLL_P-register HyperLogLog."""
    hashes = hashes.astype(np.uint64, copy=False)
    index = (hashes >> np.uint64(64 - HLL_P)).astype(np.int64)
    rest = (hashes << np.uint64(HLL_P)) | np.uint64(1 << (HLL_P - 1))
    rank = (64 - np.floor(np.log2(rest.astype(np.float64))).astype(np.int64)).astype(np.uint8)
    return index, rank


# 2^-rank for every uint8 register value: a lookup instead of a float conversion and exp2 per count
# (powers of two are exact either way, and summed in the same order).
_HLL_WEIGHTS = np.ldexp(1.0, -np.arange(256))


def hll_count(registers: np.ndarray) -> float:
    """HyperLogLog cardinality estimate, with the small-range (linear counting) correction."""
    return float(hll_counts(registers[None, :])[0])


def hll_counts(registers: np.ndarray) -> np.ndarray:
    """``hll_count`` of each row of ``registers`` (the same arithmetic: a row sums as a 1-D array)."""
    m = float(registers.shape[1])
    alpha = 0.7213 / (1 + 1.079 / m)
    estimate = alpha * m * m / _HLL_WEIGHTS[registers].sum(axis=1)
    zeros = registers.shape[1] - np.count_nonzero(registers, axis=1)
    with np.errstate(divide="ignore"):  # no empty register: the estimate stands
        linear = m * np.log(m / zeros)
    return np.where((estimate <= 2.5 * m) & (zeros > 0), linear, estimate)


_PLANES: dict[int, np.ndarray] = {}


def lsh_cells(zp: np.ndarray, bits: int = 12) -> np.ndarray:
    """Random-hyperplane LSH cells (through the model's centre) as 64-bit hashes."""
    dim = zp.shape[1]
    planes = _PLANES.get(dim)
    if planes is None:
        planes = _PLANES.setdefault(dim, np.random.default_rng(7 + dim).standard_normal((dim, bits)).astype(np.float32))
    code = (bcast_matmul(zp, planes) > 0).astype(np.uint64) @ (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    return mix64(code)


class CellCoverageSignal(SessionSignal):
    """Distinct LSH input cells (HyperLogLog) per query: extraction has to cover the input space."""

    name = "cells"
    OUTPUTS = (("cell_coverage", ("extraction",), "unit", 0.02),)
    __slots__ = ("n", "registers")

    def __init__(self) -> None:
        self.registers = np.zeros(1 << HLL_P, dtype=np.uint8)
        self.n = 0

    @classmethod
    def learn_many(cls, signals: Sequence[CellCoverageSignal], blocks: BlockRound) -> None:
        which, cells, owner = blocks.column("cells")
        if not len(which):
            return
        registers = _stacked([signals[i].registers for i in which])
        index, rank = hll_update(cells)
        np.maximum.at(registers, (owner, index), rank)
        counts = np.bincount(owner, minlength=len(which))
        for j, i in enumerate(which.tolist()):
            signals[i].registers = registers[j].copy()  # a copy: a view would keep the whole round alive
            signals[i].n += int(counts[j])

    def distinct(self) -> float:
        return hll_count(self.registers) if self.n else 0.0

    @classmethod
    def values_many(cls, signals: Sequence[CellCoverageSignal]) -> np.ndarray:
        # The estimates of all clients in one pass: per client, numpy's call overhead was most of it.
        out = np.full((len(signals), 1), np.nan)
        rows = [j for j, signal in enumerate(signals) if signal.n >= 5]
        if rows:
            distinct = hll_counts(np.array([signals[j].registers for j in rows])).tolist()
            out[rows, 0] = [round(min(d / signals[j].n, 1.0), 4) for d, j in zip(distinct, rows, strict=True)]
        return out

    def evidence(self, i: int) -> str:
        return f"{self.distinct():.0f} distinct input cells in {self.n} queries"


class ClassCoverageSignal(SessionSignal):
    """Effective number of predicted classes (exp of the label entropy): an extraction attack wants
    every class; a client's own business usually produces a few. Works with label-only outputs and
    without input vectors."""

    name = "classes"
    OUTPUTS = (("effective_classes", ("extraction",), "log", 0.03),)
    __slots__ = ("counts", "n")
    BINS: ClassVar[int] = 64

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, dtype=np.int64)
        self.n = 0

    @classmethod
    def learn_many(cls, signals: Sequence[ClassCoverageSignal], blocks: BlockRound) -> None:
        which, codes, owner = blocks.column("label_codes")
        if not len(which):
            return
        known = codes > 0
        counts = _stacked([signals[i].counts for i in which])
        np.add.at(counts, (owner[known], (codes[known] % cls.BINS).astype(np.int64)), 1)
        added = np.bincount(owner[known], minlength=len(which))
        for j, i in enumerate(which.tolist()):
            signals[i].counts = counts[j].copy()
            signals[i].n += int(added[j])

    @classmethod
    def values_many(cls, signals: Sequence[ClassCoverageSignal]) -> np.ndarray:
        # All clients' entropies in one pass (per client, numpy's call overhead was most of it).
        out = np.full((len(signals), 1), np.nan)
        rows = [j for j, signal in enumerate(signals) if signal.n >= 5]
        if rows:
            counts = np.array([signals[j].counts for j in rows])
            p = counts / np.array([signals[j].n for j in rows], dtype=np.float64)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = -np.where(counts > 0, p * np.log(p), 0.0).sum(axis=1)
            out[rows, 0] = [round(value, 4) for value in np.exp(entropy).tolist()]
        return out

    def evidence(self, i: int) -> str:
        return (
            f"predicted labels spread over {self.values()[0]:.1f} effective classes "
            f"({int((self.counts > 0).sum())} seen) in {self.n} queries"
        )


class OutOfDistributionSignal(SessionSignal):
    """Share of queries farther from every other client's inputs than 97% of the model's reference
    inputs are from each other (leave-one-client-out nearest neighbour in the model's frame)."""

    name = "ood"
    OUTPUTS = (("ood_share", ("extraction", "adversarial_input"), "unit", 0.01),)
    __slots__ = ("far", "n")

    def __init__(self) -> None:
        self.n = 0
        self.far = 0

    @classmethod
    def learn_many(cls, signals: Sequence[OutOfDistributionSignal], blocks: BlockRound) -> None:
        which, far, owner = blocks.column("far")
        far_counts = _per_block(far.astype(np.float64), owner, len(which))
        sizes = np.bincount(owner, minlength=len(which))
        for j, i in enumerate(which.tolist()):
            signals[i].far += int(far_counts[j])
            signals[i].n += int(sizes[j])

    def values(self) -> list[float]:
        return [_share(self.far, self.n) if self.n >= 5 else float("nan")]

    def evidence(self, i: int) -> str:
        return f"{self.far} of {self.n} queries are out of the model's input distribution"


_NN_ROWS = 128  # rows per distance slab: (rows, sample, dims) float64 stays ~10 MB
_GEMM_ROWS = 1024  # rows per slab of BLAS distances: (rows, sample) float64 stays ~3 MB
_DOUBT = 1e-9  # relative margin that the BLAS squared distances' rounding error stays far within


def beyond_other_clients(pop: ModelPopulation, zp: np.ndarray, clients: np.ndarray, radius: float) -> np.ndarray:
    """Per query, whether every reference input sent by another client than its own is farther than
    ``radius``: the answer of the exact per-pair distances (``nearest_other_client``), which do not
    depend on how many rows come together.

    Most rows are decided by BLAS (|a|² + |b|² - 2a·b), whose rounding does depend on the batch but
    stays many orders of magnitude below a margin of ``_DOUBT`` × (|a|² + |b|²): a row whose nearest
    other-client distance clears the radius by more than that gets the same answer as exactly. The
    few rows within the margin get the exact distances."""
    far = np.zeros(len(zp), dtype=bool)
    sample = pop.sample.astype(np.float64)
    r2 = radius * radius
    widest = float(pop.sample_sq.max(initial=0.0))
    for start in range(0, len(zp), _GEMM_ROWS):
        rows = slice(start, start + _GEMM_ROWS)
        a = zp[rows].astype(np.float64)
        a_sq = (a * a).sum(axis=1)
        d2 = (a_sq[:, None] + pop.sample_sq[None, :]) - 2.0 * (a @ sample.T)
        np.putmask(d2, clients[rows, None] == pop.sample_clients[None, :], np.inf)
        nearest = d2.min(axis=1)
        slack = _DOUBT * (a_sq + widest)  # bounds every pair's error in the row
        far[rows] = nearest - slack > r2 * (1.0 + _DOUBT)
        doubt = ~far[rows] & ~(nearest + slack < r2 * (1.0 - _DOUBT))
        if doubt.any():
            index = np.flatnonzero(doubt) + start
            far[index] = nearest_other_client(pop, zp[index], clients[index]) > radius
    return far


def nearest_other_client(pop: ModelPopulation, zp: np.ndarray, clients: np.ndarray) -> np.ndarray:
    """Per query, the distance to the nearest reference input sent by another client than its own."""
    out = np.empty(len(zp), dtype=np.float64)
    for start in range(0, len(zp), _NN_ROWS):
        d = bcast_dist(zp[start : start + _NN_ROWS], pop.sample)
        d[clients[start : start + _NN_ROWS, None] == pop.sample_clients[None, :]] = np.inf
        out[start : start + _NN_ROWS] = d.min(axis=1)
    return out


class PradaSignal(SessionSignal):
    """PRADA (Juuti et al. 2019): each query's minimum distance to the client's earlier queries of the
    same predicted class; natural queries give a roughly normal distribution of those distances,
    synthetic extraction queries do not (Shapiro–Wilk W drops). Bounded: earlier queries are a ring of
    the last ``RING`` distinct queries, distances a ring of the last ``KEEP``. Value: 1 - W."""

    name = "prada"
    OUTPUTS = (("prada_nonnormality", ("extraction",), "unit", 0.01),)
    RING: ClassVar[int] = 48
    KEEP: ClassVar[int] = 128
    __slots__ = (
        "_cache",
        "cursor",
        "d_cursor",
        "d_filled",
        "d_total",
        "dists",
        "filled",
        "ring",
        "ring_labels",
    )

    def __init__(self) -> None:
        self.ring = np.zeros((0, 0), dtype=np.float16)
        self.ring_labels = np.zeros(self.RING, dtype=np.uint32)
        self.filled = 0
        self.cursor = 0
        self.dists = np.zeros(self.KEEP, dtype=np.float16)
        self.d_filled = 0
        self.d_cursor = 0
        self.d_total = 0
        self._cache = -1.0

    @classmethod
    def learn_many(cls, signals: Sequence[PradaSignal], blocks: BlockRound) -> None:
        which, zp, owner = blocks.column("zp")
        if not len(which):
            return
        mine = [signals[i] for i in which.tolist()]
        zp = zp.astype(np.float16).astype(np.float32)
        codes = _codes_of(blocks, which)
        windows = RecentWindows.over_rings(mine, cls.RING, zp.shape[1], np.float16, owner)
        # float16 like the rings (zp holds float16 values), then float64 for the distances: converted
        # once, not per pair (each query pairs with up to RING earlier ones).
        hist = windows.stack([sig.ring for sig in mine], zp).astype(np.float64)
        zp64 = zp.astype(np.float64)
        hist_labels = windows.stack([sig.ring_labels for sig in mine], codes)
        dmin = np.empty(len(zp), dtype=np.float64)
        for start in range(0, len(zp), _WINDOW_ROWS):
            rows = slice(start, start + _WINDOW_ROWS)
            clients, positions = windows.recent(rows)
            valid = windows.earlier(rows) & (hist_labels[clients, positions] == codes[rows][:, None])
            # Distances of the valid pairs only (the client's earlier queries of the same label: with
            # many classes a small part of the window); each pair's arithmetic is as before, per pair.
            row, slot = np.nonzero(valid)
            diff = zp64[start + row] - hist[clients[row, 0], positions[row, slot]]
            d = np.full(valid.shape, np.inf)
            d[row, slot] = np.sqrt((diff * diff).sum(axis=1))
            dmin[rows] = d.min(axis=1)
        keep = np.isfinite(dmin) & (dmin > 1e-6)  # exact repeats (retries) carry no information
        new_dists = dmin[keep].astype(np.float16)
        # A query joins the ring only if it moved from the client's previous query in its block.
        moved = np.concatenate(([True], (np.abs(zp[1:] - zp[:-1]).sum(axis=1) > 0) | (owner[1:] != owner[:-1])))
        steps, step_codes = zp[moved], codes[moved]
        dist_bounds = _block_bounds(owner[keep], len(mine)).tolist()
        step_bounds = _block_bounds(owner[moved], len(mine)).tolist()
        for j, signal in enumerate(mine):
            new = new_dists[dist_bounds[j] : dist_bounds[j + 1]]
            signal.d_cursor, signal.d_filled = ring_append((signal.dists,), (new,), signal.d_cursor, signal.d_filled)
            if len(new) and (signal.d_total // 8) != ((signal.d_total + len(new)) // 8):
                signal._cache = -1.0  # W is recomputed every 8 new distances (a fixed, count-based schedule)
            signal.d_total += len(new)
            step = slice(step_bounds[j], step_bounds[j + 1])
            signal.cursor, signal.filled = ring_append(
                (signal.ring, signal.ring_labels), (steps[step], step_codes[step]), signal.cursor, signal.filled
            )

    def values(self) -> list[float]:
        if self.d_filled < 20:
            return [float("nan")]
        if self._cache < 0:
            sample = self.dists[: self.d_filled].astype(np.float64)
            w = float(_shapiro()(np.sort(sample)).statistic) if float(sample.std()) > 1e-9 else 0.0
            self._cache = round(1.0 - w, 4)
        return [self._cache]

    def evidence(self, i: int) -> str:
        value = self.values()[0]
        return f"Shapiro–Wilk W = {1 - value:.3f} on {self.d_filled} nearest-earlier-query distances (PRADA)"


# ---------------------------------------------------------------------------------- boundary probing
_FP_STEP = 0.5  # quantisation step, in units of the feature's population standard deviation


def fingerprints(z: np.ndarray) -> np.ndarray:
    """Blacklight-style content fingerprints: quantise, hash overlapping windows of features at two
    grid offsets. Near-identical inputs share most hashes; one changed feature touches ≤ 2 windows."""
    d = z.shape[1]
    w = max(2, math.ceil(d / 8)) if d >= 2 else 1
    stride = max(1, w // 2)
    starts = np.arange(0, max(d - w, 0) + 1, stride)
    if len(starts) > 16:
        starts = starts[np.linspace(0, len(starts) - 1, 16).astype(np.int64)]
    cols = starts[:, None] + np.arange(w)[None, :]
    # Both grid offsets at once: (2, n, d) cells. A window's hash is a linear combination of its cells
    # with random odd 64-bit weights (distinct windows collide with probability ~2^-64), mixed once,
    # salted by its start and grid offset so that it only ever matches the same slot of another print.
    q = np.floor(z[None, :, :] / _FP_STEP + _FP_OFFSETS[:, None, None]).astype(np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        code = (q[:, :, cols] * _fp_weights(w)).sum(axis=3, dtype=np.uint64)  # (2, n, W)
        code += starts.astype(np.uint64)[None, None, :] * np.uint64(0x85EBCA6B) + _FP_SALTS[:, None, None]
    hashes = mix64(code)
    return (np.concatenate([hashes[0], hashes[1]], axis=1) >> np.uint64(32)).astype(np.uint32)


_FP_OFFSETS = np.array([0.0, 0.5])
_FP_SALTS = np.array([0x632BE59BD9B4E019, 0x9E3779B97F4A7C15], dtype=np.uint64)


@functools.cache
def _fp_weights(w: int) -> np.ndarray:
    return np.random.default_rng(0xF1A9 + w).integers(0, 2**63, size=w, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class NearDuplicateChainSignal(SessionSignal):
    """Near-duplicate chains from content fingerprints (Blacklight, Li et al. 2022), and label flips
    among near-identical inputs. A fixed ring of the client's last ``RING`` fingerprints bounds the
    state. Exact repeats (retries) are not near-duplicates: they carry nothing new for an attacker."""

    name = "neardup"
    OUTPUTS = (
        ("near_duplicate_share", ("boundary_probing",), "unit", 0.02),
        ("label_flip_share", ("boundary_probing",), "unit", 0.01),
    )
    RING: ClassVar[int] = 32
    __slots__ = ("cursor", "filled", "flips", "n", "near", "ring", "ring_exact", "ring_labels")

    def __init__(self) -> None:
        self.ring = np.zeros((0, 0), dtype=np.uint32)
        self.ring_exact = np.zeros(self.RING, dtype=np.uint64)
        self.ring_labels = np.zeros(self.RING, dtype=np.uint32)
        self.filled = 0
        self.cursor = 0
        self.n = 0
        self.near = 0
        self.flips = 0

    @classmethod
    def learn_many(cls, signals: Sequence[NearDuplicateChainSignal], blocks: BlockRound) -> None:
        which, fp, owner = blocks.column("fp")
        if not len(which):
            return
        mine = [signals[i] for i in which.tolist()]
        k = fp.shape[1]
        # Fingerprints come from vectors, as content hashes do: a block with one has the other.
        exact = np.concatenate([blocks.blocks[i].exact for i in which.tolist()])
        codes = _codes_of(blocks, which)
        windows = RecentWindows.over_rings(mine, cls.RING, k, np.uint32, owner)
        hist = windows.stack([sig.ring for sig in mine], fp)
        hist_exact = windows.stack([sig.ring_exact for sig in mine], exact)
        hist_labels = windows.stack([sig.ring_labels for sig in mine], codes)
        near = np.zeros(len(fp), dtype=bool)
        flipped = np.zeros(len(fp), dtype=bool)
        for start in range(0, len(fp), _WINDOW_ROWS):
            rows = slice(start, start + _WINDOW_ROWS)
            clients, positions = windows.recent(rows)
            # A hash encodes its window and grid offset, so it can only match the same slot of another
            # print. Matches counted in uint8 (k ≤ 32 hashes): summing bools as int64 casts every element.
            equal = fp[rows][:, None, :] == hist[clients, positions]
            shared = equal.view(np.uint8).sum(axis=2, dtype=np.uint8)
            valid = windows.earlier(rows) & (hist_exact[clients, positions] != exact[rows][:, None])
            match = valid & (shared * 2 >= k)
            near[rows] = match.any(axis=1)
            latest = np.where(match, np.arange(windows.size)[None, :], -1).max(axis=1)
            label = hist_labels[clients[:, 0], positions[np.arange(len(latest)), np.maximum(latest, 0)]]
            flipped[rows] = near[rows] & (label != codes[rows]) & (codes[rows] > 0)
        near_counts = np.bincount(owner[near], minlength=len(mine)).tolist()
        flip_counts = np.bincount(owner[flipped], minlength=len(mine)).tolist()
        bounds = _block_bounds(owner, len(mine)).tolist()
        for j, signal in enumerate(mine):
            part = slice(bounds[j], bounds[j + 1])
            signal.near += near_counts[j]
            signal.flips += flip_counts[j]
            signal.n += bounds[j + 1] - bounds[j]
            signal.cursor, signal.filled = ring_append(
                (signal.ring, signal.ring_exact, signal.ring_labels),
                (fp[part], exact[part], codes[part]),
                signal.cursor,
                signal.filled,
            )

    def values(self) -> list[float]:
        if self.n < 5:
            return [float("nan"), float("nan")]
        return [self.near / self.n, self.flips / self.n]

    def evidence(self, i: int) -> str:
        if i == 0:
            return f"{self.near} of {self.n} queries are near-duplicates of a recent query (content fingerprints)"
        return f"{self.flips} of {self.n} queries flip the predicted label of a near-identical recent query"


class StepGeometrySignal(SessionSignal):
    """The geometry of consecutive steps: binary searches halve their step (HopSkipJump, boundary
    walks), coordinate-wise attacks change few features at a time (SimBA, Square). A sensor stream
    moves every feature a little; a retry moves nothing (not counted)."""

    name = "steps"
    OUTPUTS = (
        ("halving_step_share", ("boundary_probing",), "unit", 0.01),
        ("sparse_step_share", ("boundary_probing",), "unit", 0.01),
    )
    __slots__ = ("halving", "last", "last_step", "moves", "sparse")

    def __init__(self) -> None:
        self.last = np.zeros(0, dtype=np.float64)
        self.last_step = 0.0
        self.moves = 0
        self.halving = 0
        self.sparse = 0

    @classmethod
    def learn_many(cls, signals: Sequence[StepGeometrySignal], blocks: BlockRound) -> None:
        which, z, owner = blocks.column("z")
        if not len(which):
            return
        mine = [signals[i] for i in which.tolist()]
        d = z.shape[1]
        bounds = _block_bounds(owner, len(mine))
        starts, ends = bounds[:-1].tolist(), (bounds[1:] - 1).tolist()
        # Each query's step from the client's query before it; a client's first query ever has none.
        prev = np.empty_like(z)
        prev[1:] = z[:-1]
        has_prev = np.ones(len(z), dtype=bool)
        for j, signal in enumerate(mine):
            if len(signal.last) == d:
                prev[starts[j]] = signal.last
            else:
                prev[starts[j]] = z[starts[j]]  # no step (and no garbage in the arithmetic)
                has_prev[starts[j]] = False
        diff = z - prev
        n_changed = (np.abs(diff) > 1e-6).sum(axis=1)
        steps = np.sqrt((diff * diff).sum(axis=1)).astype(np.float64)
        moved = has_prev & (n_changed > 0)
        sparse = moved & (n_changed <= max(1, d // 10)) & (n_changed < d)
        # Step ratios over consecutive *moving* steps of a client, carried across blocks.
        mv, mv_owner = steps[moved], owner[moved]
        mv_bounds = _block_bounds(mv_owner, len(mine))
        moves = np.diff(mv_bounds)
        before = np.empty_like(mv)
        before[1:] = mv[:-1]
        first_move = np.zeros(len(mv), dtype=bool)
        first_move[mv_bounds[:-1][moves > 0]] = True
        carried = np.array([signal.last_step for signal in mine])
        before[first_move] = carried[mv_owner[first_move]]
        chained = ~first_move | (before > 0)
        ratio = mv[chained] / np.maximum(before[chained], 1e-12)
        halving = np.bincount(mv_owner[chained][(ratio > 0.45) & (ratio < 0.55)], minlength=len(mine)).tolist()
        sparse_counts = np.bincount(owner[sparse], minlength=len(mine)).tolist()
        last_moving = np.where(moves > 0, mv_bounds[1:] - 1, -1).tolist()  # each client's latest move
        for j, signal in enumerate(mine):
            signal.halving += halving[j]
            signal.sparse += sparse_counts[j]
            signal.moves += int(moves[j])
            if last_moving[j] >= 0:
                signal.last_step = float(mv[last_moving[j]])
            signal.last = z[ends[j]].copy()

    def values(self) -> list[float]:
        if self.moves < 5:
            return [float("nan"), float("nan")]
        return [self.halving / self.moves, self.sparse / self.moves]

    def evidence(self, i: int) -> str:
        if i == 0:
            return f"{self.halving} of {self.moves} steps halve the previous step (binary search)"
        return f"{self.sparse} of {self.moves} steps change only a few features (coordinate-wise search)"


class LowMarginShareSignal(SessionSignal):
    """Share of queries whose top-1 minus top-2 probability is under ``threshold``: boundary attacks
    spend their queries right at the decision boundary. An input sent again unchanged (a retry, a
    health check) is counted once: it tells an attacker nothing new, and a canary that happens to sit
    on the boundary would otherwise look like a boundary walk."""

    name = "margin"
    OUTPUTS = (("low_margin_share", ("boundary_probing",), "unit", 0.01),)
    threshold: ClassVar[float] = 0.1
    __slots__ = ("known", "last", "low")

    def __init__(self) -> None:
        self.known = 0
        self.low = 0
        self.last = 0  # content hash of the previous query's input (0: none yet)

    @classmethod
    def learn_many(cls, signals: Sequence[LowMarginShareSignal], blocks: BlockRound) -> None:
        _, margins, owner = blocks.column("margins")  # every block has margins (NaN where unknown)
        known = ~np.isnan(margins)
        which, exact, exact_owner = blocks.column("exact")
        if len(which):
            # Each input against the one before it from the same client (the first: the client's last).
            bounds = _block_bounds(exact_owner, len(which))
            previous = np.empty_like(exact)
            previous[1:] = exact[:-1]
            previous[bounds[:-1]] = [signals[i].last for i in which.tolist()]
            has_exact = np.zeros(len(blocks), dtype=bool)
            has_exact[which] = True
            repeat = np.zeros(len(margins), dtype=bool)
            repeat[has_exact[owner]] = exact == previous
            known &= ~repeat
            for i, last in zip(which.tolist(), exact[bounds[1:] - 1].tolist(), strict=True):
                signals[i].last = last
        known_counts = np.bincount(owner[known], minlength=len(blocks)).tolist()
        low_counts = np.bincount(owner[known & (margins < cls.threshold)], minlength=len(blocks)).tolist()
        for signal, known_count, low_count in zip(signals, known_counts, low_counts, strict=True):
            signal.known += known_count
            signal.low += low_count

    def values(self) -> list[float]:
        return [self.low / self.known if self.known >= 5 else float("nan")]

    def evidence(self, i: int) -> str:
        return f"{self.low} of {self.known} distinct outputs within {self.threshold} of the decision boundary"


# --------------------------------------------------------------------------------- adversarial input
class InputShapeSignal(SessionSignal):
    """Per-query input statistics against the model's population: share of features *newly* pinned at
    the population's bounds (clipped perturbations), high-frequency energy (roughness: energy of
    differences between neighbouring features relative to the input's own energy), and strangeness:
    the River HalfSpaceTrees anomaly score of the query's input summary under the model's normal
    inputs (detectors/input_model.py), for up to ``SCORED_PER_BLOCK`` evenly spaced queries per block
    (the block's boundaries are fixed query counts, so the choice is too).

    A feature counts as newly pinned when it is at a bound in a query and was not in the client's
    previous query. A perturbation crafted per input pins features that change with the input; a
    feature that sits at its bound query after query is a property of the client's data source (a
    saturated sensor, data drifted past the training range, the same health-check input), not of
    crafting. Counting every pinned feature flagged exactly those benign clients (drifting, canary
    and sensor clients were all the benign adversarial_input alerts of the reference traces)."""

    name = "shape"
    OUTPUTS = (
        ("fresh_pinned_share", ("adversarial_input",), "unit", 0.01),
        ("roughness", ("adversarial_input",), "log", 0.03),
        ("input_strangeness", ("adversarial_input",), "unit", 0.02),
    )
    SCORED_PER_BLOCK = 2
    __slots__ = ("fresh_pinned", "last_pinned", "n", "n_scored", "rough", "strange")

    def __init__(self) -> None:
        self.n = 0
        self.n_scored = 0
        # Fixed-point sums. (Not named "pinned": checkpoints from before fresh pinning counted every
        # pinned feature there, and a restored client must not carry that sum into the new value.)
        self.fresh_pinned = 0
        self.rough = 0
        self.strange = 0
        self.last_pinned = b""  # the previous query's pinned features, bit-packed (numpy's packbits)

    @classmethod
    def learn_many(cls, signals: Sequence[InputShapeSignal], blocks: BlockRound) -> None:
        which, pinned, owner = blocks.column("pinned")
        if not len(which):
            return
        _, roughness, _ = blocks.column("roughness")  # derived with `pinned`: the same blocks and rows
        bounds = _block_bounds(owner, len(which))
        starts = bounds[:-1]
        # Each query against the one before it: within a block the previous row, at a block's start
        # the client's last query from earlier blocks (none yet, or another input width: nothing).
        width = pinned.shape[1]
        packed = (width + 7) // 8
        carried = [signals[i].last_pinned for i in which.tolist()]
        if any(len(last) != packed for last in carried):
            carried = [last if len(last) == packed else bytes(packed) for last in carried]
        before = np.empty_like(pinned)
        before[1:] = pinned[:-1]
        previous = np.frombuffer(b"".join(carried), dtype=np.uint8).reshape(len(carried), packed)
        before[starts] = np.unpackbits(previous, axis=1, count=width).view(bool)
        fresh = np.count_nonzero(pinned & ~before, axis=1) / width
        fresh_sums = _per_block(np.round(fresh * FIXED), owner, len(which)).tolist()
        rough = _per_block(np.round(roughness * FIXED), owner, len(which)).tolist()
        sizes = np.diff(bounds).tolist()
        last_rows = np.packbits(pinned[bounds[1:] - 1], axis=1).tobytes()
        for j, i in enumerate(which.tolist()):
            signal = signals[i]
            signal.fresh_pinned += fresh_sums[j]
            signal.rough += rough[j]
            signal.n += sizes[j]
            signal.last_pinned = last_rows[j * packed : (j + 1) * packed]
        scored, strangeness, owner = blocks.column("strangeness")
        if not len(scored):
            return
        # Up to SCORED_PER_BLOCK evenly spaced queries of each block: its first and last.
        bounds = _block_bounds(owner, len(scored))
        starts, ends = bounds[:-1], bounds[1:] - 1
        has_last = ends > starts
        first = np.round(strangeness[starts] * FIXED)
        last = np.where(has_last, np.round(strangeness[ends] * FIXED), 0.0)
        for i, strange, two in zip(scored.tolist(), (first + last).tolist(), has_last.tolist(), strict=True):
            signals[i].strange += int(strange)
            signals[i].n_scored += 2 if two else 1

    @classmethod
    def state_bytes_many(cls, signals: Sequence[Any]) -> list[int]:
        # last_pinned is bytes, which the base class counts as one 8-byte slot.
        sizes = super().state_bytes_many(signals)
        return [size - 8 + len(signal.last_pinned) for size, signal in zip(sizes, signals, strict=True)]

    def values(self) -> list[float]:
        nan = float("nan")
        if self.n < 5:
            return [nan, nan, nan]
        strange = self.strange / FIXED / self.n_scored if self.n_scored >= 2 else nan
        return [self.fresh_pinned / FIXED / self.n, self.rough / FIXED / self.n, strange]

    def evidence(self, i: int) -> str:
        if i == 0:
            share = 100 * self.values()[0]
            return (
                f"on average {share:.0f}% of features newly at the model's input bounds (at a bound the "
                f"client's previous query did not touch; {self.n} queries)"
            )
        if i == 1:
            return f"mean input roughness {self.values()[1]:.2f} over {self.n} queries"
        return (
            f"mean anomaly score {self.values()[2]:.2f} of {self.n_scored} sampled inputs under the model's "
            "HalfSpaceTrees of normal inputs (pinned features, roughness, norm, largest and tail coordinates)"
        )


# -------------------------------------------------------------------------------------------- volume
class QueryRateSignal(SessionSignal):
    """Queries per minute of event time over the client's recent sessions."""

    name = "rate"
    OUTPUTS = (("query_rate_per_min", ("volume", "extraction"), "log", 0.1),)
    __slots__ = ("first_ts", "last_ts", "n")

    def __init__(self) -> None:
        self.first_ts = float("inf")
        self.last_ts = float("-inf")
        self.n = 0

    @classmethod
    def learn_many(cls, signals: Sequence[QueryRateSignal], blocks: BlockRound) -> None:
        _, ts, owner = blocks.column("ts")
        bounds = _block_bounds(owner, len(blocks))
        first = np.minimum.reduceat(ts, bounds[:-1]).tolist()
        last = np.maximum.reduceat(ts, bounds[:-1]).tolist()
        sizes = np.diff(bounds).tolist()
        for signal, lo, hi, size in zip(signals, first, last, sizes, strict=True):
            signal.first_ts = min(signal.first_ts, lo)
            signal.last_ts = max(signal.last_ts, hi)
            signal.n += size

    def values(self) -> list[float]:
        span_min = max((self.last_ts - self.first_ts) / 60.0, 1.0)
        return [round(self.n / span_min, 4) if self.n >= 5 else float("nan")]

    def evidence(self, i: int) -> str:
        return f"{self.values()[0]:.0f} queries/min over {self.n} queries"


DEFAULT_SIGNALS: tuple[type[SessionSignal], ...] = (
    CellCoverageSignal,
    ClassCoverageSignal,
    OutOfDistributionSignal,
    PradaSignal,
    NearDuplicateChainSignal,
    StepGeometrySignal,
    LowMarginShareSignal,
    InputShapeSignal,
    QueryRateSignal,
)


def output_specs(
    signal_types: tuple[type[SessionSignal], ...],
) -> list[tuple[str, tuple[str, ...], str, float]]:
    return [spec for t in signal_types for spec in t.OUTPUTS]
