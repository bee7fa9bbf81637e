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

Each is evaluated with one worker, and with --workers 1,3 also as three workers sharing baselines
(the log split by Kafka partition as a consumer group would split it). Columns: attackers detected
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
        plan.use_art = art
        info = write_simulation(plan, str(log), str(truth))
        print(
            f"  {info['records']:,} records, {info['clients']} clients ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )
    return log, truth


def summary_row(name: str, report: EvalReport) -> str:
    attackers = report.attackers()
    groups: dict[str, list[int | None]] = {}
    right: dict[str, bool] = {}
    for o in attackers:
        key = o.group or o.client_id
        groups.setdefault(key, []).append(o.first_alert_queries)
        right[key] = right.get(key, False) or o.right_kind_queries is not None
    detected = [min(q for q in qs if q is not None) for qs in groups.values() if any(q is not None for q in qs)]
    benign = report.benign()
    flagged = [o for o in benign if o.first_alert_queries is not None]
    variants: dict[str, int] = {}
    for o in flagged:
        variants[o.variant] = variants.get(o.variant, 0) + 1
    median = f"{np.median(detected):.0f}" if detected else "-"
    which = ", ".join(f"{n} {v}" for v, n in sorted(variants.items()))
    return (
        f"{name:<16}{report.workers:>3}{f'{len(detected)}/{len(groups)}':>10}{sum(right.values()):>7}"
        f"{median:>8}{f'{len(flagged)}/{len(benign)}':>10}{report.events_per_s:>10,.0f}  {which}"
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
        totals = {w: [0, 0, 0, 0] for w in workers}  # detected, attackers, flagged, benign
        for name in names:
            log, truth = trace(folder, name, REFERENCE[name], args.art)
            for count in workers:
                print(f"evaluating {name} with {count} worker(s) …", file=sys.stderr, flush=True)
                report = evaluate(str(log), str(truth), workers=count)
                rows.append(summary_row(name, report))
                if args.details:
                    print(f"\n== {name}, {count} worker(s)\n{format_report(report)}", file=sys.stderr)
                groups = {o.group or o.client_id for o in report.attackers()}
                caught = {o.group or o.client_id for o in report.attackers() if o.first_alert_queries is not None}
                benign = report.benign()
                t = totals[count]
                t[0] += len(caught)
                t[1] += len(groups)
                t[2] += sum(o.first_alert_queries is not None for o in benign)
                t[3] += len(benign)
    header = f"{'trace':<16}{'wk':>3}{'detected':>10}{'right':>7}{'median':>8}{'benign':>10}{'events/s':>10}  flagged"
    print(f"\n{header}\n{'-' * len(header)}")
    print("\n".join(rows))
    for count, (caught, attackers, flagged, benign) in totals.items():
        print(f"{'total':<16}{count:>3}{f'{caught}/{attackers}':>10}{'':>7}{'':>8}{f'{flagged}/{benign}':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
