"""The `probewatch` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from probewatch.config import Config, ConfigError, load_config, redacted, secret_values
from storage import StorageError

log = logging.getLogger("probewatch")

EXAMPLES = """\
examples:
  probewatch run --input examples/sample-logs.jsonl.gz       # embedded ClickHouse (chDB), no servers
  zcat logs.jsonl.gz | probewatch run --input -              # JSON lines on stdin
  probewatch run --source kafka --config probewatch.toml     # a Kafka consumer-group worker
  PROBEWATCH__STORAGE__BACKEND=clickhouse probewatch run ... # any setting from the environment

configuration: a TOML file (--config, or $PROBEWATCH_CONFIG) and PROBEWATCH__<SECTION>__<KEY>
environment variables; see `probewatch config --defaults` for every setting and its default.
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $PROBEWATCH_CONFIG)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probewatch",
        description="Catch model extraction, boundary probing and adversarial inputs in ML inference query logs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="score query logs from Kafka, a file or stdin; store scores and raise alerts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Consume query-log records (JSON, one per message or line), keep per-session state per
            (model, client, session), score each session for extraction, boundary probing, adversarial
            inputs and volume, store the scores in ClickHouse and raise alerts.

            With --input the source is a file (plain or .gz) or '-' for stdin, and the run ends with a
            summary. Stdin from a pipe is scored as lines arrive (a batch waits at most file.linger_ms
            for more). Without it the source is `source` from the configuration (kafka: runs until
            SIGTERM/SIGINT, which finish the current batch, checkpoint and leave the group)."""
        ),
        epilog=EXAMPLES,
    )
    _add_common(run)
    run.add_argument("--input", metavar="PATH|-", help="read JSON lines from this file (.gz ok) or '-' for stdin")
    run.add_argument("--source", choices=["file", "kafka"], help="override `source` from the configuration")
    run.add_argument("--alerts-out", metavar="PATH", help="also append alerts as JSON lines to PATH")
    run.add_argument("--dlq-out", metavar="PATH", help="dead-letter file for a file run (default <input>.dlq.jsonl)")
    run.add_argument("--data-dir", metavar="DIR", help="chDB data directory (storage.chdb.path)")
    run.add_argument("--quiet", action="store_true", help="no progress line and no console alerts")
    run.add_argument("--top", type=int, default=10, metavar="N", help="suspicious sessions listed in the summary")
    run.set_defaults(handler=cmd_run)

    cfg = sub.add_parser("config", help="print the effective configuration (secrets redacted) and exit")
    _add_common(cfg)
    cfg.add_argument("--defaults", action="store_true", help="print the built-in defaults as TOML-like text")
    cfg.set_defaults(handler=cmd_config)

    alerts = sub.add_parser("alerts", help="alert receivers: send a test alert through each one")
    alerts_sub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION")
    alerts_sub.required = True
    alerts_test = alerts_sub.add_parser(
        "test",
        help="send a test alert through every configured receiver and report each (exit 1 if any failed)",
    )
    _add_common(alerts_test)
    alerts_test.add_argument("--receiver", action="append", metavar="NAME", help="only this one (repeatable)")
    alerts_test.add_argument("--severity", choices=["info", "warning", "high", "critical"], default="warning")
    alerts_test.add_argument("--resolve", action="store_true", help="resolve the test alert afterwards")
    alerts_test.set_defaults(handler=cmd_alerts_test)

    sim = sub.add_parser(
        "simulate",
        help="write realistic query-log traffic (benign clients and attackers) as JSON lines",
        description="Generate query-log records against a real model, with a ground-truth file of who "
        "attacked. The default victim ('gaussian') needs numpy only; the scikit-learn victims (digits, "
        "breast_cancer, wine) need `pip install 'probewatch[simulate]'`, which also brings IBM's "
        "adversarial-robustness-toolbox (HopSkipJump and Boundary Attack then run through ART; everything "
        "else uses the built-in numpy implementations, and the truth file says which).",
    )
    sim.add_argument("--out", required=True, metavar="PATH", help="output JSON lines (.gz to compress)")
    sim.add_argument("--truth", metavar="PATH", help="write client ground truth (JSON lines) here")
    sim.add_argument("--victim", default="gaussian", help="gaussian (numpy only), digits, breast_cancer, wine")
    sim.add_argument("--benign-clients", type=int, default=40)
    sim.add_argument("--attackers", type=int, default=4, help="attackers per attack variant")
    sim.add_argument(
        "--attacks",
        default="random,hopskipjump",
        help="comma-separated attack variants, or 'all': random, knockoff, copycat (extraction); "
        "hopskipjump, boundary, simba, square (boundary probing); transfer (adversarial inputs)",
    )
    sim.add_argument("--modes", default="", help="extra attackers: comma-separated slow, interleaved, sybil")
    sim.add_argument("--outputs", choices=["probs", "label"], default="probs", help="label: label-only outputs")
    sim.add_argument("--no-vectors", action="store_true", help="omit input.vector from the records")
    sim.add_argument("--art", choices=["auto", "yes", "no"], default="auto", help="ART for HSJ / Boundary")
    sim.add_argument("--queries", type=int, default=400, help="queries per client (about)")
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--malformed", type=int, default=20, help="malformed records mixed in (for the DLQ)")
    sim.set_defaults(handler=cmd_simulate)

    ev = sub.add_parser(
        "eval",
        help="measure the detectors on a labelled log (detection, false positives, queries to detection)",
        description="Run the detectors (SessionDetector + the production AlertPolicy, no storage) over a query "
        "log and compare with the ground truth written by `probewatch simulate --truth`. Detection settings "
        "come from the configuration, as for `probewatch run`; the flags override them.",
    )
    ev.add_argument("--input", required=True, metavar="LOGS", help="JSON lines (.gz ok)")
    ev.add_argument("--truth", required=True, metavar="LABELS", help="ground-truth JSON lines")
    ev.add_argument("--threshold", type=float, help="alert threshold (default: detection.alert_threshold)")
    ev.add_argument(
        "--min-queries", type=int, help="queries in a session before it may alert (default: detection.min_queries)"
    )
    ev.add_argument("--budget", type=float, default=1e-3, help="false-alarm budget per evaluation and kind")
    ev.add_argument("--batch", type=int, default=2000, help="records per micro-batch")
    ev.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        help="split the log as a consumer group of N workers would (by the Kafka partition of each client id, "
        "one detector per worker) to see what scaling out costs in detection (default: 1)",
    )
    ev.add_argument(
        "--baselines",
        choices=["shared", "per-worker"],
        default="shared",
        help="with --workers: population baselines and source groups shared through a population log, as "
        "`probewatch run` does on Kafka (default), or each worker's own",
    )
    ev.add_argument("--json", action="store_true", help="print the full report as JSON")
    _add_common(ev)
    ev.set_defaults(handler=cmd_eval)

    from dashboards.cli import add_dashboards_parser  # push / export / check (dashboards/cli.py)

    add_dashboards_parser(sub, _add_common)
    return parser


class _SecretsHidden(logging.Formatter):
    """A log line with each of ``secrets`` replaced by ***."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets  # longest first: a secret containing another is hidden whole

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


def _setup_logging(config: Config, override: str | None) -> None:
    level = override or config.logging.level
    fmt = (
        '{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}'
        if config.logging.json
        else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    # Libraries log what they are given (urllib3, at DEBUG, the request line with a webhook's token):
    # every line is searched for the configuration's secrets.
    secrets = secret_values(config)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_SecretsHidden(fmt, secrets))
    # kafka-python logs every reconnect at WARNING/ERROR; ours says what matters.
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(level), logging.WARNING) + 10)


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    config = load_config(args.config, overrides=overrides)
    _setup_logging(config, args.log_level)
    return config


def cmd_config(args: argparse.Namespace) -> int:
    import msgspec

    config = Config() if args.defaults else _load(args)
    print(msgspec.json.format(msgspec.json.encode(redacted(config)), indent=2).decode())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from probewatch.simulate import ATTACK_VARIANTS, MissingExtra, SimulationPlan, write_simulation

    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    names = [a for a in args.attacks.split(",") if a]
    attacks = tuple(ATTACK_VARIANTS) if args.attacks == "all" else tuple(names)
    plan = SimulationPlan(
        benign_clients=args.benign_clients,
        attackers_per_kind=args.attackers,
        queries_per_client=args.queries,
        malformed=args.malformed,
        seed=args.seed,
        victim=args.victim,
        attacks=attacks,
        modes=tuple(m for m in args.modes.split(",") if m),
        outputs=args.outputs,
        include_vectors=not args.no_vectors,
        use_art=args.art,
    )
    try:
        stats = write_simulation(plan, args.out, args.truth)
    except (MissingExtra, ValueError) as exc:
        print(f"probewatch: {exc}", file=sys.stderr)
        return 2
    impl = ", ".join(f"{k}={v}" for k, v in stats["implementations"].items())
    print(
        f"wrote {stats['records']} records from {stats['clients']} clients to {args.out} "
        f"(victim {stats['victim']}; attacks: {impl})",
        file=sys.stderr,
    )
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    import msgspec

    from probewatch.compute import blas_thread_limit
    from probewatch.evaluate import evaluate, format_report

    detection = _load(args).detection
    with blas_thread_limit(detection.blas_threads):  # as `probewatch run` holds it (see Job.run)
        report = evaluate(
            args.input,
            args.truth,
            batch_records=args.batch,
            detector_options={
                "alert_threshold": detection.alert_threshold if args.threshold is None else args.threshold,
                "min_queries": detection.min_queries if args.min_queries is None else args.min_queries,
                "false_alarm_budget": args.budget,
                "group_v4_prefix": detection.group_v4_prefix,
                "group_v6_prefix": detection.group_v6_prefix,
            },
            workers=args.workers,
            shared_baselines=args.baselines == "shared",
        )
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
    else:
        print(format_report(report))
    return 0


def cmd_alerts_test(args: argparse.Namespace) -> int:
    """Send one test alert (labelled as a test) through each configured receiver; report each."""
    import time

    import msgspec

    from alerting.alert import severity_rank
    from alerting.dispatch import deliver_now, test_alert
    from probewatch.wiring import build_alert_sinks

    config = _load(args)
    receivers = [r for r in build_alert_sinks(config) if not args.receiver or r.name in args.receiver]
    if not receivers:
        print("probewatch: no alert receivers configured (see [alerting.receivers.<name>])", file=sys.stderr)
        return 1
    failed = 0
    for receiver in receivers:
        floor = getattr(receiver, "min_severity", "info")
        severity = args.severity if severity_rank(args.severity) >= severity_rank(floor) else floor
        alert = test_alert(severity)
        started = time.monotonic()
        try:
            deliver_now(receiver, [alert])
            if args.resolve:
                # Alertmanager holds a resolve until min_firing_s; send it now, a test needs no page.
                if hasattr(receiver, "min_firing_s"):
                    receiver.min_firing_s = 0.0
                resolved = msgspec.structs.replace(alert, status="resolved", alert_id=alert.alert_id + "-r", seq=1)
                deliver_now(receiver, [resolved])
        except Exception as exc:
            failed += 1
            print(f"  FAIL  {receiver.name:<20} {type(receiver).__name__}: {exc}")
        else:
            took = time.monotonic() - started
            print(f"  ok    {receiver.name:<20} {type(receiver).__name__} ({severity}, {took:.2f} s)")
        finally:
            receiver.close()
    print(f"{len(receivers) - failed} of {len(receivers)} receivers took the test alert")
    return 1 if failed else 0


class StartupInterrupted(Exception):
    """SIGTERM arrived before the processing loop (which handles it gracefully) had started."""


def _terminate_during_startup(signum: int, frame: FrameType | None) -> None:
    raise StartupInterrupted


def cmd_run(args: argparse.Namespace) -> int:
    # Until the loop installs its own handler, SIGTERM (an orchestrator scaling down or rolling a
    # deployment) ends start-up cleanly: nothing has been consumed yet, so nothing can be lost.
    signal.signal(signal.SIGTERM, _terminate_during_startup)
    from ingest.sources import KafkaUnavailable
    from ingest.transactions import ProducerFenced
    from probewatch.wiring import build_and_run

    overrides: dict[str, Any] = {}
    if args.source or args.input:
        overrides["source"] = "file" if args.input else args.source
    if args.data_dir:
        overrides.setdefault("storage", {}).setdefault("chdb", {})["path"] = args.data_dir
    if args.alerts_out:
        overrides.setdefault("alerting", {})["jsonl_path"] = args.alerts_out
    if args.quiet:
        overrides.setdefault("alerting", {})["console"] = False
    config = _load(args, overrides)
    if config.source == "file" and not args.input:
        raise ConfigError("source is 'file': give --input PATH (or '-' for stdin), or use --source kafka")
    show_progress = not args.quiet and sys.stderr.isatty()
    try:
        summary = build_and_run(config, input_path=args.input, dlq_path=args.dlq_out, progress=show_progress)
    except ProducerFenced as exc:
        # A zombie under exactly-once (the pipeline logged it): exit without a traceback.
        print(f"probewatch: stopped, the transactional producer was fenced: {exc}", file=sys.stderr)
        return 4
    except KafkaUnavailable as exc:
        print(f"probewatch: {exc}", file=sys.stderr)
        return 3  # as for unreachable storage
    if config.source == "file":
        print_summary(summary, top=args.top)
    return 0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_summary(summary: Any, top: int = 10, out: Callable[[str], None] | None = None) -> None:
    write = out or (lambda line: print(line))
    write("")
    write(
        f"probewatch: {summary.records_read} records read in {summary.elapsed_s:.1f} s "
        f"({summary.events_per_s:,.0f} records/s)"
    )
    write(f"  dead-lettered : {summary.dead_lettered}")
    for reason, count in list(summary.dlq_reasons.items())[:5]:
        write(f"      {count:6d}  {reason}")
    write(f"  scored        : {summary.sessions_scored} session scores, {summary.open_sessions} sessions open")
    write(f"  late records  : {summary.late_records}")
    write(f"  alerts        : {summary.alerts}")
    write(f"  detector state: {summary.state_bytes / 1024:.0f} KiB")
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in summary.stage_seconds.items())
    write(f"  time in       : {stages} (the rest: reading the input, start-up, shutdown)")
    suspicious = [s for s in summary.top_sessions if s.score > 0][:top]
    if suspicious:
        write("")
        write("top suspicious sessions:")
        for s in suspicious:
            write(
                f"  {s.score:4.2f}  {s.top_kind:<17} client={s.client_id} model={s.model_id} "
                f"queries={s.n_queries} since {_when(s.first_seen)}"
            )
            for reason in s.reasons[:3]:
                write(f"          - {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except ConfigError as exc:
        print(f"probewatch: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"probewatch: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"probewatch: {exc}", file=sys.stderr)
        return 3
    except StartupInterrupted:
        print("probewatch: SIGTERM during start-up; stopped before consuming anything", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("probewatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
