"""Turn a client's signal values into one calibrated score per attack kind, with the reasons behind it.

Calibration is per model and population-relative, not hand-tuned: for each signal value the model's
population baseline (histograms of client values at a similar query count, learned from the stream)
gives a tail probability p — an exponential tail beyond the population's upper quartile whose rate is
set by the robust spread q75 - q50 (at least a per-signal unit floor). For shares that count queries
(k of the client's n) p is exact under that model: the binomial chance of k or more in n queries,
integrated over the population's rates, so a high share of few queries is as surprising as it is and
no more; other shares take the binomial noise of n queries as a floor on the spread.

Each kind has *primary* signals — evidence specific to the attack (coverage for extraction; label
flips, halving and coordinate-wise steps, low margins for boundary probing; clipped and rough inputs
for adversarial inputs) — and *corroborating* ones that honest clients also produce (a high rate: batch
scorers; near-duplicates: sensors; out-of-distribution inputs and irregular nearest-neighbour distances:
drifting data). A kind's p is max(best primary p, best other p): two lines of evidence, one of them
primary, must agree; or a primary signal alone must be extreme enough for both (p ≤ budget² / m).
``volume`` never alerts alone. The score maps p onto [0, 1] so that the alert threshold corresponds to
the false-alarm budget: score = threshold · log(1/p) / log(1/budget), capped at 1. A score of 0.9
thus means p = budget^(0.9/threshold), and severity follows from the score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from detectors.population import (
    ModelPopulation,
    bucket_floor,
    bucket_of,
    share_tail_probability,
    tail_probability,
)
from detectors.scores import ATTACK_KINDS
from detectors.signals import SessionSignal

# Signals that may back up a primary signal but never raise a kind on their own (see the docstring).
CORROBORATING_ONLY = frozenset({"query_rate_per_min", "near_duplicate_share", "ood_share", "prada_nonnormality"})
# Shares that count queries (k of the client's n): their sampling noise is binomial, tested exactly.
COUNT_SHARES = frozenset(
    {
        "ood_share",
        "near_duplicate_share",
        "label_flip_share",
        "halving_step_share",
        "sparse_step_share",
        "low_margin_share",
    }
)


class KindScores:
    """Scores in [0, 1] per attack kind, plus the reasons (signals that contributed most)."""

    __slots__ = ("reasons", "scores", "signals", "tail_p", "warming_up")

    def __init__(
        self,
        scores: dict[str, float],
        signals: dict[str, float],
        reasons: list[str],
        tail_p: dict[str, float],
        warming_up: bool = False,
    ) -> None:
        self.scores = scores
        self.signals = signals
        self.reasons = reasons
        self.tail_p = tail_p  # per kind, the tail probability the score was mapped from (1.0: none)
        self.warming_up = warming_up


class CalibratedScorer:
    """Population-calibrated per-kind scores at a false-alarm budget (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[tuple[str, tuple[str, ...], str, float]],
        *,
        alert_threshold: float = 0.8,
        false_alarm_budget: float = 1e-3,
    ) -> None:
        self.specs = list(specs)
        self.names = [s[0] for s in self.specs]
        self.scales = [s[2] for s in self.specs]
        self.threshold = alert_threshold
        self.budget = false_alarm_budget
        self._primary = [name not in CORROBORATING_ONLY for name in self.names]

    def score(
        self,
        values: np.ndarray,
        signals: Sequence[SessionSignal],
        population: ModelPopulation | None,
        client_queries: int,
    ) -> KindScores:
        bucket = bucket_of(client_queries)
        per_kind: dict[str, list[tuple[float, int, str]]] = {k: [] for k in ATTACK_KINDS}
        warming = population is None
        shown: dict[str, float] = {}
        texts: dict[int, tuple[int, float, float, float, float]] = {}
        baselines = population.baselines(bucket) if population is not None else []
        for s, ((name, kinds, scale, floor), value) in enumerate(zip(self.specs, values.tolist(), strict=True)):
            if math.isnan(value):
                continue
            shown[name] = value
            if population is None:
                continue
            warm, q50, q75, total = baselines[s]
            if math.isnan(warm):
                warming = True
                continue
            wb = int(warm)
            if scale == "log":  # rates and counts: compare orders of magnitude
                p = tail_probability(math.log10(max(value, 1e-3)), math.log10(q50), math.log10(q75), floor)
            elif name in COUNT_SHARES:  # k of n queries: the luck of few queries, integrated exactly
                p = share_tail_probability(value * client_queries, client_queries, q50, q75, floor)
            else:  # other shares: the spread is at least the binomial noise of this many queries
                noise = math.sqrt(max(q75, 1.0 / client_queries) * (1.0 - min(q75, 0.99)) / client_queries)
                p = tail_probability(value, q50, q75, max(floor, noise))
            for kind in kinds:
                per_kind[kind].append((p, s, ""))
            texts[s] = (wb, q50, q75, total, p)
        scores: dict[str, float] = {}
        tail_p: dict[str, float] = {}
        reasons: list[tuple[float, str]] = []
        for kind, found in per_kind.items():
            found.sort()
            scores[kind], tail_p[kind] = 0.0, 1.0
            if not found or (kind == "volume" and len(found) < 2):
                continue
            primary = [item for item in found if self._primary[item[1]]]
            if not primary:
                continue
            p1 = primary[0]
            others = [item for item in found if item is not p1]
            single = math.sqrt(len(found) * p1[0])
            p_kind = max(min(max(p1[0], others[0][0]) if others else 1.0, single), 1e-300)
            found = [p1, *others]
            value = self.score_of(p_kind)
            scores[kind], tail_p[kind] = round(value, 6), p_kind
            if value >= 0.5 * self.threshold:
                signals_by_index = [(sig, i) for sig in signals for i in range(len(sig.OUTPUTS))]
                reasons.extend(
                    (
                        value - 1e-3 * rank,
                        f"{kind}: {self._reason(signals_by_index[s], texts[s], values[s], s)}",
                    )
                    for rank, (p, s, _) in enumerate(found[:2])
                    if p <= max(p_kind, found[0][0])
                )
        reasons.sort(key=lambda item: -item[0])
        return KindScores(scores, shown, [r for _, r in reasons], tail_p, warming)

    def score_of(self, p: float) -> float:
        """The score in [0, 1] of a tail probability: the alert threshold is the false-alarm budget."""
        return min(1.0, self.threshold * math.log(1.0 / max(p, 1e-300)) / math.log(1.0 / self.budget))

    def _reason(
        self,
        signal: tuple[SessionSignal, int],
        base: tuple[int, float, float, float, float],
        value: float,
        s: int,
    ) -> str:
        sig, i = signal
        wb, q50, q75, total, p = base
        return (
            f"{sig.evidence(i)}; {self.names[s]} = {value:.3g} where the model's {total:.0f} clients at "
            f"{bucket_floor(wb)}+ queries have median {q50:.3g}, 75th percentile {q75:.3g} (tail p≈{p:.0e})"
        )
