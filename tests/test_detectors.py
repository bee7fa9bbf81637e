"""Each signal's behaviour, bounded state, and the population calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors import population
from detectors.engine import SessionDetector
from detectors.groups import EMPTY_DIGEST, GroupDigest, SharedSourceGroup, SourceGroup, source_group
from detectors.input_model import (
    N_TREES,
    SEED,
    TREE_HEIGHT,
    InputDensityModel,
    input_summaries,
    pinned_at_bounds,
    river_anomaly,
    tree_features,
)
from detectors.population import (
    ModelPopulation,
    binomial_tail,
    bucket_of,
    mix64,
    share_tail_probabilities,
    share_tail_probability,
    tail_probability,
)
from detectors.scoring import CalibratedScorer
from detectors.signals import (
    DEFAULT_SIGNALS,
    BlockRound,
    CellCoverageSignal,
    ClassCoverageSignal,
    InputShapeSignal,
    LowMarginShareSignal,
    NearDuplicateChainSignal,
    PradaSignal,
    QueryBlock,
    StepGeometrySignal,
    beyond_other_clients,
    derive_features,
    exact_hashes,
    label_codes,
    nearest_other_client,
    output_specs,
)
from ingest.records import QueryRecord, SourcePosition


def block(
    z: np.ndarray | None, labels: list[str | None] | None = None, pop: ModelPopulation | None = None
) -> QueryBlock:
    n = len(z) if z is not None else len(labels or [])
    labels = labels if labels is not None else ["0"] * n
    return derive_features(
        QueryBlock(
            ts=np.arange(n, dtype=np.float64),
            vectors=None if z is None else z.astype(np.float32),
            margins=np.full(n, np.nan, dtype=np.float32),
            confidences=np.full(n, np.nan, dtype=np.float32),
            labels=labels,
            label_codes=label_codes(labels),
            z=None if z is None else z.astype(np.float32),
            zp=None if z is None else z.astype(np.float32),
            exact=None if z is None else exact_hashes(z.astype(np.float32)),
            population=pop,
        )
    )


def test_cell_coverage_separates_space_filling_from_clustered_queries() -> None:
    rng = np.random.default_rng(0)
    spread, clustered = CellCoverageSignal(), CellCoverageSignal()
    spread.learn_block(block(rng.uniform(-3, 3, size=(300, 8))))
    clustered.learn_block(block(rng.normal(2.0, 0.2, size=(300, 8))))
    assert spread.values()[0] > 0.5 > 0.2 > clustered.values()[0]


def test_class_coverage_works_label_only_without_vectors() -> None:
    one, every = ClassCoverageSignal(), ClassCoverageSignal()
    one.learn_block(block(None, ["3"] * 100))
    every.learn_block(block(None, [str(i % 10) for i in range(100)]))
    assert one.values()[0] == 1.0
    assert 9.5 < every.values()[0] <= 10.0


def test_prada_flags_synthetic_queries_and_keeps_a_bounded_ring() -> None:
    rng = np.random.default_rng(1)
    natural, synthetic = PradaSignal(), PradaSignal()
    natural.learn_block(block(rng.normal(size=(400, 8))))
    # JbDA-like: a few seeds, each followed by tiny perturbations of itself
    seeds = rng.normal(size=(8, 8))
    queries = np.concatenate([s + rng.normal(0, 0.01, size=(50, 8)) * (1 + (i % 2) * 40) for i, s in enumerate(seeds)])
    synthetic.learn_block(block(queries))
    assert synthetic.values()[0] > natural.values()[0]
    assert natural.ring.shape[0] == PradaSignal.RING and natural.dists.shape[0] == PradaSignal.KEEP


def test_near_duplicates_exclude_retries_and_count_label_flips() -> None:
    rng = np.random.default_rng(2)
    walk = np.cumsum(rng.normal(0, 0.01, size=(100, 8)), axis=0)
    sensor, retries, probe = (
        NearDuplicateChainSignal(),
        NearDuplicateChainSignal(),
        NearDuplicateChainSignal(),
    )
    sensor.learn_block(block(walk))
    retries.learn_block(block(np.repeat(rng.normal(size=(20, 8)) * 3, 5, axis=0)))
    probe.learn_block(block(walk, [str(i % 2) for i in range(100)]))  # labels alternate across tiny steps
    assert sensor.values()[0] > 0.9 and sensor.values()[1] == 0.0
    assert retries.values()[0] == 0.0  # identical re-sends are not near-duplicates
    assert probe.values()[1] > 0.9


def test_step_geometry_sees_binary_search_and_coordinate_wise_steps() -> None:
    x0, x1 = np.zeros(8), np.ones(8)
    lo, hi, seq = 0.0, 1.0, []
    for k in range(40):  # bisection: every step half the previous one
        mid = (lo + hi) / 2
        seq.append(x0 + mid * (x1 - x0))
        lo, hi = (mid, hi) if k % 2 else (lo, mid)
    bisect = StepGeometrySignal()
    bisect.learn_block(block(np.array(seq)))
    simba = StepGeometrySignal()
    rng = np.random.default_rng(3)
    x, out = np.zeros(20), []
    for i in rng.integers(0, 20, size=60):
        x = x.copy()
        x[i] += 0.3
        out.append(x)
    simba.learn_block(block(np.array(out)))
    assert bisect.values()[0] > 0.9
    assert simba.values()[1] > 0.9 and simba.values()[0] < 0.2


def test_a_round_of_many_clients_learns_what_each_client_learns_alone() -> None:
    # The engine folds a round of many clients' chunks in one vectorised pass per signal; nothing may
    # leak between the clients of a round (windows of recent queries, carried steps, last inputs).
    rng = np.random.default_rng(9)
    pop = ModelPopulation("m", 1, min_clients=4)
    for client in range(8):
        raw = rng.normal(size=(40, 8)).astype(np.float32)
        pop.add_inputs(raw, mix64(np.arange(40, dtype=np.uint64) + np.uint64(1000 * client)), np.full(40, client + 1))
    pop.publish()
    assert pop.inputs_ready and pop.input_model is not None
    assert len(pop.sample_clients) == len(pop.sample)  # whose input each is: left out for that client
    clients = 5
    together = [[t() for t in DEFAULT_SIGNALS] for _ in range(clients)]
    alone = [[t() for t in DEFAULT_SIGNALS] for _ in range(clients)]
    for _ in range(7):  # enough rounds to wrap the rings of recent queries
        blocks = []
        for c in range(clients):
            n = int(rng.integers(1, 16))
            labels: list[str | None] = [str(v) for v in rng.integers(0, 4, size=n)]
            if c == 3:  # label-only outputs, no input vectors
                b = block(None, labels, pop=pop)
            else:
                walk = rng.normal(size=(1, 8)) * 2 + np.cumsum(rng.normal(scale=0.05, size=(n, 8)), axis=0)
                b = block(np.repeat(walk[:1], n, axis=0) if c == 1 else walk, labels, pop=pop)  # 1: retries
            b.margins = rng.uniform(0.0, 0.3, size=n).astype(np.float32)
            blocks.append(b)
        for j, signal_type in enumerate(DEFAULT_SIGNALS):
            signal_type.learn_many([together[c][j] for c in range(clients)], BlockRound(blocks))
        for c in range(clients):
            for signal in alone[c]:
                signal.learn_block(blocks[c])
    for c in range(clients):
        for mine, reference in zip(together[c], alone[c], strict=True):
            assert np.array_equal(mine.values(), reference.values(), equal_nan=True), (c, mine.name)
            for slot, value in reference.to_state().items():
                assert np.array_equal(mine.to_state()[slot], value), (c, mine.name, slot)
    assert together[0][DEFAULT_SIGNALS.index(NearDuplicateChainSignal)].near > 0  # the walks were seen


def test_pinned_share_reads_the_population_bounds() -> None:
    pop = ModelPopulation("m", 1)
    pop.low, pop.high = np.zeros(8, dtype=np.float32), np.full(8, 16.0, dtype=np.float32)
    clipped, natural = InputShapeSignal(), InputShapeSignal()
    rng = np.random.default_rng(4)
    clipped.learn_block(block(np.clip(rng.normal(8, 20, size=(50, 8)), 0, 16), pop=pop))
    natural.learn_block(block(rng.uniform(4, 12, size=(50, 8)), pop=pop))
    assert clipped.values()[0] > 0.2 > 0.01 > natural.values()[0]


def test_features_pinned_query_after_query_are_not_counted_again() -> None:
    # Drifted data clipped at the same bounds, or the same input sent again and again, pins the same
    # features every time: a property of the client's data, not a perturbation crafted per input.
    pop = ModelPopulation("m", 1)
    pop.low, pop.high = np.zeros(8, dtype=np.float32), np.full(8, 16.0, dtype=np.float32)
    rng = np.random.default_rng(6)
    natural = rng.uniform(4, 12, size=(60, 8))
    drifted = natural.copy()
    drifted[:, :3] = 16.0  # three features past the training range, clipped, in every query
    crafted = natural.copy()
    crafted[np.arange(60), rng.integers(0, 8, size=60)] = 0.0  # one feature per input, a different one
    crafted[np.arange(60), rng.integers(0, 8, size=60)] = 16.0
    shares = []
    for x in (drifted, crafted):
        signal = InputShapeSignal()
        signal.learn_block(block(x, pop=pop))
        shares.append(signal.values()[0])
    assert shares[0] == pytest.approx(3 / 8 / 60)  # counted at the first query only
    assert shares[1] > 0.15
    # Across blocks the comparison carries over (the client's last query), through a checkpoint too,
    # so cutting the stream differently gives the same value.
    whole, cut = InputShapeSignal(), InputShapeSignal()
    whole.learn_block(block(crafted, pop=pop))
    cut.learn_block(block(crafted[:25], pop=pop))
    restored = InputShapeSignal()
    restored.load_state(cut.to_state())
    restored.learn_block(block(crafted[25:], pop=pop))
    assert restored.values()[:2] == whole.values()[:2]  # (strangeness needs a fitted input model)
    # A checkpoint from before fresh pinning (its sum of every pinned feature under "pinned") does not
    # carry that sum into the new value: the client's share starts again from zero.
    older = InputShapeSignal()
    older.load_state({"n": 60, "n_scored": 0, "pinned": 30_000_000, "rough": 0, "strange": 0})
    assert older.values()[0] == 0.0


def test_state_per_client_is_bounded_and_kilobytes() -> None:
    rng = np.random.default_rng(5)
    detector = SessionDetector(epoch_records=500, min_population=2)
    sizes = []
    for n_batch in range(4):
        vectors = rng.normal(size=(2000, 64)).astype(np.float32)
        detector.process(
            [
                QueryRecord(
                    ts=1.8e9 + n_batch * 2000 + i,
                    client_id=f"c{i % 3}",
                    model_id="m",
                    position=SourcePosition("t", 0, n_batch * 2000 + i),
                    vector=vectors[i],
                    label=str(i % 7),
                    margin=0.5,
                )
                for i in range(2000)
            ]
        )
        sizes.append(max(detector._client_bytes(list(detector.clients.values()))))
    assert sizes[1] == sizes[-1] < 16 * 1024
    assert sum(p.nbytes() for p in detector.populations.values()) < 1024 * 1024


def test_tail_probability_is_monotone_and_robust_to_spread() -> None:
    ps = [tail_probability(v, 1.0, 2.0, 0.1) for v in (0.5, 1.5, 2.5, 4.0, 10.0)]
    assert ps == sorted(ps, reverse=True) and ps[0] == 1.0 and ps[-1] < 1e-3
    assert tail_probability(4.0, 1.0, 1.0, 0.5) < tail_probability(4.0, 1.0, 1.0, 1.0)  # floor sets the scale


def test_alert_threshold_corresponds_to_the_false_alarm_budget() -> None:
    """A population with an exponential tail: the value whose tail probability is the budget scores
    exactly the threshold on every signal; twice as extreme evidence (p = budget²) scores 1."""
    specs = output_specs(DEFAULT_SIGNALS)
    pop = ModelPopulation("m", len(specs), min_clients=4, scales=[s[2] for s in specs])
    rng = np.random.default_rng(6)
    for value in rng.exponential(0.02, size=400):
        pop.add_values(np.full((1, len(specs)), value), np.array([bucket_of(100)]), np.array([40]))
    pop.publish()
    scorer = CalibratedScorer(specs, alert_threshold=0.8, false_alarm_budget=1e-3)
    shares = [i for i, s in enumerate(specs) if s[2] == "unit" and "boundary_probing" in s[1]]
    _, q50, q75, _ = pop.baselines(bucket_of(100))[shares[0]]
    spread = max(q75 - q50, 0.01)
    at_budget = q75 + spread * math.log2(0.25 / 1e-3)
    values = np.full(len(specs), np.nan)
    values[shares] = at_budget
    signals = [t() for t in DEFAULT_SIGNALS]
    result = scorer.score(values, signals, pop, client_queries=100_000)  # binomial noise negligible
    assert abs(result.scores["boundary_probing"] - 0.8) < 0.02
    values[shares] = q75 + spread * math.log2(0.25 / 1e-6)
    assert scorer.score(values, signals, pop, client_queries=100_000).scores["boundary_probing"] >= 0.99
    values[shares] = q50
    assert scorer.score(values, signals, pop, client_queries=100_000).scores["boundary_probing"] < 0.1


def test_input_density_model_scores_crafted_inputs_above_normal_ones() -> None:
    rng = np.random.default_rng(3)
    low, high = np.zeros(8), np.ones(8)
    normal = rng.normal(0.5, 0.08, size=(384, 8)).clip(0, 1)
    centre, scale = normal.mean(axis=0), normal.std(axis=0)

    def summarise(x: np.ndarray) -> np.ndarray:
        return input_summaries(pinned_at_bounds(x, low, high), (x - centre) / scale)

    model = InputDensityModel(summarise(normal))
    fresh = rng.normal(0.5, 0.08, size=(200, 8)).clip(0, 1)
    # Crafted: half the features pushed to the clip bounds, the rest left natural.
    crafted = fresh.copy()
    crafted[:, ::2] = np.where(crafted[:, ::2] > 0.5, 1.0, 0.0)
    normal_scores = model.score(summarise(fresh))
    crafted_scores = model.score(summarise(crafted))
    assert np.median(crafted_scores) > np.quantile(normal_scores, 0.95)
    # Rebuilt from the same reference sample (as after a restart), the trees score identically.
    again = InputDensityModel(summarise(normal))
    assert np.array_equal(again.score(summarise(crafted)), crafted_scores)
    # The numpy fit and walk score exactly what River's own HalfSpaceTrees does, fed the same window
    # row by row with learn_one and scored row by row with score_one.
    reference = tree_features(summarise(normal))
    river = river_anomaly().HalfSpaceTrees(
        n_trees=N_TREES,
        height=TREE_HEIGHT,
        window_size=len(reference),
        seed=SEED,
        limits={i: (0.0, 1.0) for i in range(reference.shape[1])},
    )
    for row in reference.tolist():
        river.learn_one(dict(enumerate(row)))
    summaries = summarise(crafted)
    rows = tree_features(np.concatenate([summaries, summarise(fresh)]))
    river_scores = np.array([river.score_one(dict(enumerate(row))) for row in rows.tolist()])
    assert np.array_equal(np.concatenate([crafted_scores, normal_scores]), river_scores)


def test_pinned_means_at_the_bound_not_near_it_in_a_wide_box() -> None:
    # One client with wild values widened the learned box to [7, 3700]; ordinary inputs a little above
    # the lower bound are not "pinned" (a width-relative tolerance of 3.7 said they were: on
    # breast_cancer most benign clients alerted as adversarial_input). Clipped inputs sit exactly on it.
    low, high = np.full(4, 7.0), np.full(4, 3700.0)
    ordinary = np.array([[7.5, 9.0, 12.0, 20.0], [8.1, 7.9, 15.0, 11.0]])
    clipped = np.array([[7.0, 3700.0, 12.0, 7.0], [6.5, 9.0, 3700.0, 3701.0]])  # at or beyond the bounds
    z = np.zeros((2, 4))
    assert input_summaries(pinned_at_bounds(ordinary, low, high), z)[:, 0].tolist() == [0.0, 0.0]
    assert input_summaries(pinned_at_bounds(clipped, low, high), z)[:, 0].tolist() == [0.75, 0.75]


def test_low_margin_share_counts_a_repeated_input_once() -> None:
    rng = np.random.default_rng(5)
    canary_input = np.repeat(rng.normal(size=(1, 8)), 40, axis=0)  # a health check on the boundary
    walk = rng.normal(size=(40, 8))  # a boundary walk: every query new, every output near the boundary
    canary, walker = LowMarginShareSignal(), LowMarginShareSignal()
    for signal, z in ((canary, canary_input), (walker, walk)):
        for half in (z[:20], z[20:]):  # across blocks too
            b = block(half)
            b.margins = np.full(len(half), 0.02, dtype=np.float32)
            signal.learn_block(b)
    assert (canary.known, canary.low) == (1, 1)
    assert walker.values()[0] == 1.0 and walker.known == 40


def test_source_group_is_the_network_of_the_address() -> None:
    assert source_group("203.0.113.77") == "net:203.0.113.0/24"
    assert source_group("2001:db8:1:2::5") == "net:2001:db8:1::/48"
    assert source_group("10.1.2.3", 16) == "net:10.1.0.0/16"
    assert source_group("not-an-ip") is None
    assert source_group("10.1.2.3", 0) is None  # grouping off for IPv4


def test_group_evidence_needs_several_suspicious_members() -> None:
    group = SourceGroup()
    ordinary, suspicious = (0.5, 1.0, 0.5), (0.03, 1.0, 0.5)
    for i in range(12):  # twelve honest clients behind one NAT, two of them a little odd
        group.update(f"nat-{i}", suspicious if i < 2 else ordinary, 100.0 + i, 50)
    assert group.evidence()["extraction"][0] == 1.0
    for i in range(4):  # four keys of one actor, each only a little suspicious
        group.update(f"key-{i}", suspicious, 200.0 + i, 50)
    p, members, m = group.evidence()["extraction"]
    assert m == 16 and members == ["key-0", "key-1", "key-2", "key-3", "nat-0", "nat-1"]
    assert p == pytest.approx(binomial_tail(6, 16, 0.05)) and p < 1e-4
    group.expire(150.0)  # the NAT clients' evaluations are old
    assert sorted(group.members) == ["key-0", "key-1", "key-2", "key-3"]
    assert binomial_tail(3, 3, 0.05) == pytest.approx(0.05**3)
    assert binomial_tail(2, 10, 0.1) == pytest.approx(1 - 0.9**10 - 10 * 0.1 * 0.9**9)


def test_a_shared_group_judges_every_partitions_members_and_keeps_its_home() -> None:
    """Digests from three partitions: the group counts all their members and judges their suspicious
    ones together, as one worker's group of them all would; its home (whose owner emits its scores)
    is the first partition to publish, until no member is left there."""
    suspicious = (0.03, 1.0, 0.5)
    shared, alone = SharedSourceGroup(), SourceGroup()
    for partition, keys in ((2, ["a", "b"]), (0, ["c"]), (1, ["d"])):
        members = {k: (suspicious, 100.0, 40) for k in keys}
        shared.replace(partition, GroupDigest(len(keys) + 3, 40 * (len(keys) + 3), members))
        for k in keys:
            alone.update(k, suspicious, 100.0, 40)
        for i in range(3):
            alone.update(f"{k}-honest-{i}", (0.5, 1.0, 0.5), 100.0, 40)
    assert shared.evidence() == alone.evidence()
    assert shared.member_count() == 13 and shared.queries() == alone.queries()
    assert shared.home == 2  # the first to publish, though 0 is lower
    shared.replace(2, EMPTY_DIGEST)
    assert shared.home == 0 and sorted(shared.digests) == [0, 1]
    restored = SharedSourceGroup.from_state(shared.state())
    assert (restored.digests, restored.home) == (shared.digests, 0)
    shared.replace(0, EMPTY_DIGEST)
    shared.replace(1, EMPTY_DIGEST)
    assert shared.home is None and not shared.digests


def test_share_tail_probability_weighs_the_luck_of_few_queries() -> None:
    q50, q75, floor = 0.0025, 0.0025, 0.01
    # One event in five queries is ordinary luck; seven in ten is not (HopSkipJump's first queries).
    assert share_tail_probability(1, 5, q50, q75, floor) > 0.01
    assert share_tail_probability(7, 10, q50, q75, floor) < 1e-6
    # The same share is more surprising the more queries it rests on, and never below the
    # population tail alone: with many queries the two agree.
    p10, p100, p1000 = (share_tail_probability(0.3 * n, n, q50, q75, floor) for n in (10, 100, 1000))
    assert p10 > p100 > p1000
    assert p1000 >= tail_probability(0.3, q50, q75, floor)
    assert share_tail_probability(100, 1000, 0.0, 0.1, 0.05) == pytest.approx(0.25, rel=0.2)  # at q75
    assert share_tail_probability(0, 10, q50, q75, floor) == 1.0


def test_share_tail_probabilities_of_many_clients_are_each_clients_own() -> None:
    # Clients against different baselines, with nothing, everything or more than their queries:
    # grouping rows by baseline must not mix them up.
    k = np.array([3.0, 0.0, 12.0, 7.0, 2.5, 40.0, 1.0])
    n = np.array([10.0, 10.0, 10.0, 10.0, 5.0, 400.0, 25.0])
    q50 = np.array([0.01, 0.01, 0.01, 0.2, 0.01, 0.05, 0.2])
    q75 = np.array([0.02, 0.02, 0.02, 0.3, 0.02, 0.08, 0.3])
    population._SHARE_TAILS.clear()  # computed, not remembered
    many = share_tail_probabilities(k, n, q50, q75, 0.01)
    alone = []
    for row in zip(k, n, q50, q75, strict=True):
        population._SHARE_TAILS.clear()
        alone.append(share_tail_probability(*row, 0.01))
    assert many.tolist() == alone
    assert share_tail_probabilities(k, n, q50, q75, 0.01).tolist() == alone  # remembered: the same
    assert many[1] == 1.0 and many[2] == 0.0  # no queries counted; more than it sent: impossible
    assert len(set(many.tolist())) == len(many)


def test_out_of_distribution_leaves_the_clients_own_reference_inputs_out() -> None:
    rng = np.random.default_rng(11)
    pop = ModelPopulation("m", 1)
    pop.sample = rng.normal(size=(384, 8)).astype(np.float32)
    pop.sample_clients = np.repeat(np.arange(3, dtype=np.uint64), 128)
    pop.sample_sq = (pop.sample.astype(np.float64) ** 2).sum(axis=1)
    radius = 1.5
    # Random queries, and queries placed at the radius (to float rounding) from another client's input.
    direction = rng.normal(size=(200, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    at_radius = pop.sample[:200].astype(np.float64) + radius * direction
    queries = np.concatenate([rng.normal(scale=2.0, size=(500, 8)), at_radius])
    clients = np.concatenate([rng.integers(0, 4, size=500), np.full(200, 2)]).astype(np.uint64)
    # BLAS decides most rows; the answer is the exact per-pair distances' answer, row for row.
    assert np.array_equal(
        beyond_other_clients(pop, queries, clients, radius), nearest_other_client(pop, queries, clients) > radius
    )
    # A client's own reference input does not make its query ordinary; another client's does.
    lone = np.zeros((1, 8), dtype=np.float32)
    pop.sample = np.concatenate([np.full((383, 8), 50.0, dtype=np.float32), lone])
    pop.sample_sq = (pop.sample.astype(np.float64) ** 2).sum(axis=1)
    owner = pop.sample_clients[-1:]
    assert beyond_other_clients(pop, lone, owner, radius).tolist() == [True]
    assert beyond_other_clients(pop, lone, owner + 1, radius).tolist() == [False]
