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
    buckets_of,
    share_tail_probabilities,
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
        # Per kind, the columns of its signals and which of them are primary.
        self._kind_columns: dict[str, tuple[list[int], np.ndarray]] = {}
        for kind in ATTACK_KINDS:
            columns = [s for s, spec in enumerate(self.specs) if kind in spec[1]]
            primary = np.array([self.names[s] not in CORROBORATING_ONLY for s in columns], dtype=bool)
            self._kind_columns[kind] = (columns, primary)

    def score(
        self,
        values: np.ndarray,
        signals: Sequence[SessionSignal],
        population: ModelPopulation | None,
        client_queries: int,
    ) -> KindScores:
        """One client's scores (see ``score_many``)."""
        return self.score_many(values[None, :], [signals], population, [client_queries])[0]

    def score_many(
        self,
        values: np.ndarray,
        signals: Sequence[Sequence[SessionSignal]],
        population: ModelPopulation | None,
        client_queries: Sequence[int],
    ) -> list[KindScores]:
        """Scores of many clients of one model (rows of ``values``, NaN: not available), each against
        the population's baselines at its query count. Tail probabilities and their combination per
        kind are computed a signal (a column) at a time; only reasons are written per client, and only
        for the kinds that score high enough to show them."""
        names = self.names
        # The values shown with each score: the available ones (v == v: not NaN).
        shown = [{name: v for name, v in zip(names, row, strict=True) if v == v} for row in values.tolist()]
        if population is None:
            return [
                KindScores(dict.fromkeys(ATTACK_KINDS, 0.0), row, [], dict.fromkeys(ATTACK_KINDS, 1.0), True)
                for row in shown
            ]
        base = population.table[:, buckets_of(client_queries)]  # (signal, client, 4)
        warm, q50, q75 = base[:, :, 0].T, base[:, :, 1].T, base[:, :, 2].T
        present = ~np.isnan(values)
        usable = present & ~np.isnan(warm)
        warming = (present & ~usable).any(axis=1).tolist()
        queries = np.asarray(client_queries, dtype=np.float64)
        tails = np.full(values.shape, np.inf)  # inf: no evidence from this signal
        for s, (name, _, scale, floor) in enumerate(self.specs):
            rows = np.flatnonzero(usable[:, s])
            if not len(rows):
                continue
            value, a, b = values[rows, s], q50[rows, s], q75[rows, s]
            if scale == "log":  # rates and counts: compare orders of magnitude
                tails[rows, s] = _tail_probabilities(
                    np.log10(np.maximum(value, 1e-3)), np.log10(a), np.log10(b), np.full(len(rows), floor)
                )
            elif name in COUNT_SHARES:  # k of n queries: the luck of few queries, integrated exactly
                n = queries[rows]
                tails[rows, s] = share_tail_probabilities(value * n, n, a, b, floor)
            else:  # other shares: the spread is at least the binomial noise of this many queries
                k = queries[rows]
                noise = np.sqrt(np.maximum(b, 1.0 / k) * (1.0 - np.minimum(b, 0.99)) / k)
                tails[rows, s] = _tail_probabilities(value, a, b, np.maximum(floor, noise))
        out = [KindScores({}, row, [], {}, warm_up) for row, warm_up in zip(shown, warming, strict=True)]
        ranked: list[list[tuple[float, str]]] = [[] for _ in out]
        for kind, (columns, primary) in self._kind_columns.items():
            combined = self._combine(kind, tails[:, columns], primary)
            for row, (p_kind, best, second) in enumerate(combined):
                result = out[row]
                if p_kind is None:
                    result.scores[kind], result.tail_p[kind] = 0.0, 1.0
                    continue
                value = self.score_of(p_kind)
                result.scores[kind], result.tail_p[kind] = round(value, 6), p_kind
                if value < 0.5 * self.threshold:
                    continue
                p1 = tails[row, columns[best]]
                for rank, j in enumerate((best, second)):
                    if j is None or tails[row, columns[j]] > max(p_kind, p1):
                        continue
                    s = columns[j]
                    text = self._reason(signals[row], s, values[row, s], float(tails[row, s]), base[s, row])
                    ranked[row].append((value - 1e-3 * rank, f"{kind}: {text}"))
        for result, reasons in zip(out, ranked, strict=True):
            reasons.sort(key=lambda item: -item[0])
            result.reasons = [r for _, r in reasons]
        return out

    def _combine(self, kind: str, tails: np.ndarray, primary: np.ndarray) -> list[tuple[float | None, int, int | None]]:
        """Per client, the kind's tail probability (None: no score) from its signals' ``tails`` (inf:
        none), with the column of the best primary signal and of the best other one (ties: the
        earlier signal). p = max(best primary, best other), or sqrt(m · best primary) if smaller:
        two lines of evidence must agree, or a primary one alone be extreme enough for both."""
        found = np.isfinite(tails)
        count = found.sum(axis=1)
        primary_tails = np.where(primary[None, :], tails, np.inf)
        best = primary_tails.argmin(axis=1)
        p1 = primary_tails[np.arange(len(tails)), best]
        rest = tails.copy()
        rest[np.arange(len(tails)), best] = np.inf
        second = rest.argmin(axis=1)
        p2 = rest[np.arange(len(tails)), second]
        out: list[tuple[float | None, int, int | None]] = []
        minimum = 2 if kind == "volume" else 1  # volume never alerts alone
        for n, b, q1, c, q2 in zip(
            count.tolist(), best.tolist(), p1.tolist(), second.tolist(), p2.tolist(), strict=True
        ):
            if n < minimum or math.isinf(q1):
                out.append((None, b, None))
                continue
            others = n > 1
            single = math.sqrt(n * q1)
            p_kind = max(min(max(q1, q2) if others else 1.0, single), 1e-300)
            out.append((p_kind, b, c if others else None))
        return out

    def score_of(self, p: float) -> float:
        """The score in [0, 1] of a tail probability: the alert threshold is the false-alarm budget."""
        return min(1.0, self.threshold * math.log(1.0 / max(p, 1e-300)) / math.log(1.0 / self.budget))

    def _reason(self, signals: Sequence[SessionSignal], s: int, value: float, p: float, baseline: np.ndarray) -> str:
        """Signal ``s``'s evidence, against the population's quartiles at the client's query count."""
        sig, i = self._outputs_of(signals)[s]
        warm, q50, q75, total = baseline.tolist()
        return (
            f"{sig.evidence(i)}; {self.names[s]} = {value:.3g} where the model's {total:.0f} clients at "
            f"{bucket_floor(int(warm))}+ queries have median {q50:.3g}, 75th percentile {q75:.3g} (tail p≈{p:.0e})"
        )

    @staticmethod
    def _outputs_of(signals: Sequence[SessionSignal]) -> list[tuple[SessionSignal, int]]:
        return [(sig, i) for sig in signals for i in range(len(sig.OUTPUTS))]


def _tail_probabilities(value: np.ndarray, q50: np.ndarray, q75: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """``tail_probability`` element-wise (the same arithmetic, so the same values)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        beyond = 0.25 * np.power(2.0, -(value - q75) / np.maximum(q75 - q50, floor))
    return np.where(value <= q75, np.where(value > q50, 0.5, 1.0), beyond)
