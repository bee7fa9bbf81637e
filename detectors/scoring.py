"""Turn a session's signal values into one score per attack kind, with the reasons behind it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from detectors.signals import SessionSignal


class KindScores:
    """Scores in [0, 1] per attack kind, plus the reasons (signals that contributed most)."""

    __slots__ = ("reasons", "scores", "signals")

    def __init__(self, scores: dict[str, float], signals: dict[str, float], reasons: list[str]) -> None:
        self.scores = scores
        self.signals = signals
        self.reasons = reasons


class HeuristicScorer:
    """First scorer: saturating transforms of the signals, each damped by how much evidence there is.

    The constants are deliberately simple; a calibrated, population-relative scorer replaces this
    class behind the same ``score`` method.
    """

    def __init__(self, reason_floor: float = 0.5) -> None:
        self.reason_floor = reason_floor

    def score(self, signals: Sequence[SessionSignal], n_queries: int) -> KindScores:
        values = {s.name: s.value() for s in signals}
        by_name = {s.name: s for s in signals}
        evidence_small = 1.0 - math.exp(-n_queries / 10.0)
        evidence_large = 1.0 - math.exp(-n_queries / 200.0)
        parts: dict[str, dict[str, float]] = {"volume": {}, "extraction": {}, "boundary_probing": {}}
        if "query_rate_per_min" in values:
            rate = values["query_rate_per_min"]
            parts["volume"]["query_rate_per_min"] = rate / (rate + 120.0) * evidence_large
        if "distinct_input_cells" in values and n_queries:
            ratio = min(values["distinct_input_cells"] / n_queries, 1.0)
            parts["extraction"]["distinct_input_cells"] = ratio * evidence_large
        for name in ("low_margin_share", "near_duplicate_share"):
            if name in values:
                parts["boundary_probing"][name] = values[name] * evidence_small
        scores = {kind: max(p.values(), default=0.0) for kind, p in parts.items()}
        contributions = sorted(
            ((v, name) for p in parts.values() for name, v in p.items() if v >= self.reason_floor),
            reverse=True,
        )
        reasons = [f"{by_name[name].kind}: {by_name[name].evidence()}" for _, name in contributions]
        return KindScores(scores, values, reasons)
