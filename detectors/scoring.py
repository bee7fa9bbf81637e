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
from itertools import compress

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
# How a signal's tail probability is calibrated (CalibratedScorer._tails): on a log scale, as a share
# that counts queries, or as another share.
_LOG, _COUNTED, _SHARE = 0, 1, 2


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
        # Per kind (rows, in ATTACK_KINDS order) and signal: whether the signal counts for the kind,
        # and whether it is primary for it; and the fewest signals the kind needs.
        self.kinds = ATTACK_KINDS
        self._kind_signals = np.array([[kind in spec[1] for spec in self.specs] for kind in self.kinds])
        self._primary_signals = self._kind_signals & np.array([name not in CORROBORATING_ONLY for name in self.names])
        self._kind_minimum = np.array([2 if kind == "volume" else 1 for kind in self.kinds])  # volume never alone
        # Per signal, how its tail probability is calibrated (see _tails) and its spread's floor.
        self._calibration = np.array(
            [_LOG if spec[2] == "log" else _COUNTED if spec[0] in COUNT_SHARES else _SHARE for spec in self.specs]
        )
        self._floors = np.array([spec[3] for spec in self.specs], dtype=np.float64)

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
        the population's baselines at its query count. Tail probabilities, their combination per
        kind and the scores are computed for all clients, signals and kinds at once (a call scores a
        few dozen clients: numpy's per-call overhead, not arithmetic, is the cost); only the result
        dicts are built per client, and reasons only for the kinds that score high enough to show them."""
        present = ~np.isnan(values)
        # The values shown with each score: the available ones.
        shown = [
            dict(compress(zip(self.names, row, strict=True), available))
            for row, available in zip(values.tolist(), present.tolist(), strict=True)
        ]
        if population is None:
            return [
                KindScores(dict.fromkeys(self.kinds, 0.0), row, [], dict.fromkeys(self.kinds, 1.0), True)
                for row in shown
            ]
        base = population.table[:, buckets_of(client_queries)]  # (signal, client, 4)
        warm, q50, q75 = base[:, :, 0].T, base[:, :, 1].T, base[:, :, 2].T
        usable = present & ~np.isnan(warm)
        warming = (present & ~usable).any(axis=1).tolist()
        tails = self._tails(values, usable, q50, q75, np.asarray(client_queries, dtype=np.float64))
        p_kind, best, second = self._combine(tails)
        scored = ~np.isnan(p_kind)
        unrounded = np.zeros(p_kind.shape)
        unrounded[scored] = self.scores_of(p_kind[scored])
        scores: np.ndarray = np.zeros(p_kind.shape)  # (client, kind)
        scores[scored] = [round(v, 6) for v in unrounded[scored].tolist()]  # Python's round: np.round differs
        # Reasons, for the few (client, kind) that score high enough to show them: per client in kind
        # order (np.nonzero is row-major), then ranked by score.
        ranked: dict[int, list[tuple[float, str]]] = {}
        high_rows, high_kinds = np.nonzero(scored & (unrounded >= 0.5 * self.threshold))
        for row, k in zip(high_rows.tolist(), high_kinds.tolist(), strict=True):
            value = float(unrounded[row, k])
            p1 = tails[row, best[row, k]]
            for rank, s in enumerate((int(best[row, k]), int(second[row, k]))):
                if s < 0 or tails[row, s] > max(p_kind[row, k], p1):
                    continue
                text = self._reason(signals[row], s, values[row, s], float(tails[row, s]), base[s, row])
                ranked.setdefault(row, []).append((value - 1e-3 * rank, f"{self.kinds[k]}: {text}"))
        kind_scores: list[list[float]] = scores.tolist()
        kind_p: list[list[float]] = np.where(scored, p_kind, 1.0).tolist()
        kinds = self.kinds
        out = [
            KindScores(dict(zip(kinds, row_scores, strict=True)), row, [], dict(zip(kinds, row_p, strict=True)), warm)
            for row, row_scores, row_p, warm in zip(shown, kind_scores, kind_p, warming, strict=True)
        ]
        for row, reasons in ranked.items():
            reasons.sort(key=lambda item: -item[0])
            out[row].reasons = [r for _, r in reasons]
        return out

    def _tails(
        self, values: np.ndarray, usable: np.ndarray, q50: np.ndarray, q75: np.ndarray, queries: np.ndarray
    ) -> np.ndarray:
        """Per client (row) and signal, the tail probability of its value against the population's
        quartiles (inf: not usable, no evidence). The usable values of all signals calibrated alike
        are computed together, element by element as one signal's alone."""
        tails = np.full(values.shape, np.inf)
        rows, signals = np.nonzero(usable)
        value, a, b = values[rows, signals], q50[rows, signals], q75[rows, signals]
        floor, calibration = self._floors[signals], self._calibration[signals]
        at = calibration == _LOG  # rates and counts: compare orders of magnitude
        tails[rows[at], signals[at]] = _tail_probabilities(
            np.log10(np.maximum(value[at], 1e-3)), np.log10(a[at]), np.log10(b[at]), floor[at]
        )
        at = calibration == _COUNTED  # k of n queries: the luck of few queries, integrated exactly
        n = queries[rows[at]]
        tails[rows[at], signals[at]] = share_tail_probabilities(value[at] * n, n, a[at], b[at], floor[at])
        at = calibration == _SHARE  # other shares: the spread is at least the binomial noise of n queries
        n, b = queries[rows[at]], b[at]
        noise = np.sqrt(np.maximum(b, 1.0 / n) * (1.0 - np.minimum(b, 0.99)) / n)
        tails[rows[at], signals[at]] = _tail_probabilities(value[at], a[at], b, np.maximum(floor[at], noise))
        return tails

    def _combine(self, tails: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per client and kind, the kind's tail probability (NaN: no score) from its signals' ``tails``
        (inf: none), with the best primary signal and the best other one (-1: none; ties: the earlier
        signal). p = max(best primary, best other), or sqrt(m · best primary) if smaller: two lines of
        evidence must agree, or a primary one alone be extreme enough for both."""
        kind_tails = np.where(self._kind_signals, tails[:, None, :], np.inf)  # (client, kind, signal)
        count = np.isfinite(kind_tails).sum(axis=2)
        primary_tails = np.where(self._primary_signals, kind_tails, np.inf)
        best = primary_tails.argmin(axis=2)[:, :, None]
        p1 = np.take_along_axis(primary_tails, best, axis=2)[:, :, 0]
        np.put_along_axis(kind_tails, best, np.inf, axis=2)  # the rest
        second = kind_tails.argmin(axis=2)[:, :, None]
        p2 = np.take_along_axis(kind_tails, second, axis=2)[:, :, 0]
        others = count > 1
        with np.errstate(invalid="ignore"):  # 0 · inf: a client without evidence (not scored)
            single = np.sqrt(count * p1)
        p_kind = np.maximum(np.minimum(np.where(others, np.maximum(p1, p2), 1.0), single), 1e-300)
        scored = (count >= self._kind_minimum) & np.isfinite(p1)
        return np.where(scored, p_kind, np.nan), best[:, :, 0], np.where(scored & others, second[:, :, 0], -1)

    def score_of(self, p: float) -> float:
        """The score in [0, 1] of a tail probability: the alert threshold is the false-alarm budget."""
        return float(self.scores_of(np.array([p]))[0])

    def scores_of(self, p: np.ndarray) -> np.ndarray:
        """``score_of`` of many tail probabilities. The logarithms are math.log's, one at a time:
        numpy's vectorised log may differ from it in the last bit, and scores must not change."""
        logs = np.array(list(map(math.log, (1.0 / np.maximum(p, 1e-300)).tolist())), dtype=np.float64)
        return np.minimum(1.0, self.threshold * logs / math.log(1.0 / self.budget))

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
