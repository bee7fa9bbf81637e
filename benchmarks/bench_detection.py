"""Detection quality on the reference traces: who is caught, how fast, and which benign clients are paged.

Any change to a signal, a baseline or a threshold moves these numbers; run this before and after it and
put both tables in the change's note. The traces are simulated (`probewatch simulate`) from fixed
plans and seeds, so every run of this script evaluates the same records:

  gaussian-200   gaussian victim, 200 benign clients, every attack variant, also slow and interleaved
  breast-200     scikit-learn breast_cancer victim (a binary model whose inputs clip at their bounds)
  digits-200     scikit-learn digits victim (64 features, 10 classes)
  gaussian-all   40 benign clients, 4 attackers per variant and 1 slow: a small population, many attackers
  label-only     40 benign clients, label-only outputs (decision-based attacks see no probabilities)
  sybil          120 benign clients, every attack also split over 8 client keys
  faults         the fault tests' scenario (60 benign clients of 200 queries, 2 attackers per variant)

Each is evaluated with one worker, and with --workers 1,3,8 also as three and eight workers sharing
baselines (the log split by Kafka partition as a consumer group would split it). Columns: attackers detected
(an attacker split over keys counts once), of those with an alert of their own kind, median queries
to the first alert, benign clients alerted (and their variants), detector events/s.

The scikit-learn victims need `pip install 'probewatch[simulate]'` (or scikit-learn alone: the
built-in attack implementations are used unless --art yes). Traces are written to --traces (kept
between runs, regenerated only when missing) or to a temporary folder.

Usage:
  python benchmarks/bench_detection.py [--traces DIR] [--only gaussian-200,faults] [--workers 1,3]
                                       [--art no|auto|yes] [--details]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

from probewatch.evaluate import EvalReport, evaluate, format_report
from probewatch.simulate import SimulationPlan, write_simulation

ALL = ("random", "knockoff", "copycat", "hopskipjump", "boundary", "simba", "square", "transfer")

REFERENCE: dict[str, SimulationPlan] = {
    "gaussian-200": SimulationPlan(
        benign_clients=200, attackers_per_kind=1, attacks=ALL, modes=("slow", "interleaved"), malformed=0
    ),
    "breast-200": SimulationPlan(
        victim="breast_cancer", benign_clients=200, attackers_per_kind=1, attacks=ALL, malformed=0
    ),
    "digits-200": SimulationPlan(victim="digits", benign_clients=200, attackers_per_kind=1, attacks=ALL, malformed=0),
    "gaussian-all": SimulationPlan(benign_clients=40, attackers_per_kind=4, attacks=ALL, modes=("slow",), malformed=0),
    "label-only": SimulationPlan(benign_clients=40, attackers_per_kind=2, attacks=ALL, outputs="label", malformed=0),
    "sybil": SimulationPlan(benign_clients=120, attackers_per_kind=1, attacks=ALL, modes=("sybil",), malformed=0),
    # tests/pipeline_helpers.make_scenario: what every Kafka fault test runs.
    "faults": SimulationPlan(benign_clients=60, attackers_per_kind=2, queries_per_client=200, malformed=15),
}


def trace(folder: Path, name: str, plan: SimulationPlan, art: str) -> tuple[Path, Path]:
    """The trace's log and truth files, generated unless an earlier run left them (same plan, same art)."""
    stem = folder / f"{name}-art-{art}"
    log, truth = stem.with_suffix(".jsonl.gz"), stem.with_suffix(".truth.jsonl")
    if not (log.exists() and truth.exists()):
        started = time.monotonic()
        print(f"generating {name} …", file=sys.stderr, flush=True)
        info = write_simulation(msgspec.structs.replace(plan, use_art=art), str(log), str(truth))
        print(
            f"  {info['records']:,} records, {info['clients']} clients ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )
    return log, truth


class Tally(msgspec.Struct):
    """One evaluation's counts: attackers (a multi-key attacker once) and benign clients."""

    detected: int
    attackers: int
    right_kind: int
    first_alerts: list[int]  # queries to each detected attacker's first alert
    flagged: int
    benign: int
    flagged_variants: dict[str, int]

    @classmethod
    def of(cls, report: EvalReport) -> Tally:
        first: dict[str, list[int | None]] = {}
        right: dict[str, bool] = {}
        for o in report.attackers():
            key = o.group or o.client_id
            first.setdefault(key, []).append(o.first_alert_queries)
            right[key] = right.get(key, False) or o.right_kind_queries is not None
        alerts = [min(q for q in qs if q is not None) for qs in first.values() if any(q is not None for q in qs)]
        benign = report.benign()
        variants: dict[str, int] = {}
        for o in benign:
            if o.first_alert_queries is not None:
                variants[o.variant] = variants.get(o.variant, 0) + 1
        return cls(len(alerts), len(first), sum(right.values()), alerts, sum(variants.values()), len(benign), variants)


def summary_row(name: str, workers: int, tally: Tally, events_per_s: float) -> str:
    median = f"{np.median(tally.first_alerts):.0f}" if tally.first_alerts else "-"
    which = ", ".join(f"{n} {v}" for v, n in sorted(tally.flagged_variants.items()))
    return (
        f"{name:<16}{workers:>3}{f'{tally.detected}/{tally.attackers}':>10}{tally.right_kind:>7}"
        f"{median:>8}{f'{tally.flagged}/{tally.benign}':>10}{events_per_s:>10,.0f}  {which}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, help="folder to keep the generated traces in (default: temporary)")
    parser.add_argument("--only", default=",".join(REFERENCE), help="comma-separated trace names")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts to evaluate, e.g. 1,3")
    parser.add_argument("--art", choices=("no", "auto", "yes"), default="no", help="ART for HSJ / Boundary")
    parser.add_argument("--details", action="store_true", help="print each evaluation's full report too")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in REFERENCE]
    if unknown:
        parser.error(f"unknown trace(s) {unknown}; choose from {', '.join(REFERENCE)}")
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.traces or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[str] = []
        tallies: dict[int, list[Tally]] = {w: [] for w in workers}
        for name in names:
            log, truth = trace(folder, name, REFERENCE[name], args.art)
            for count in workers:
                print(f"evaluating {name} with {count} worker(s) …", file=sys.stderr, flush=True)
                report = evaluate(str(log), str(truth), workers=count)
                tally = Tally.of(report)
                tallies[count].append(tally)
                rows.append(summary_row(name, count, tally, report.events_per_s))
                if args.details:
                    print(f"\n== {name}, {count} worker(s)\n{format_report(report)}", file=sys.stderr)
    header = f"{'trace':<16}{'wk':>3}{'detected':>10}{'right':>7}{'median':>8}{'benign':>10}{'events/s':>10}  flagged"
    print(f"\n{header}\n{'-' * len(header)}")
    print("\n".join(rows))
    for count, done in tallies.items():
        caught, attackers = sum(t.detected for t in done), sum(t.attackers for t in done)
        flagged, benign = sum(t.flagged for t in done), sum(t.benign for t in done)
        print(f"{'total':<16}{count:>3}{f'{caught}/{attackers}':>10}{'':>7}{'':>8}{f'{flagged}/{benign}':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
