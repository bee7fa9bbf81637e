"""Sources of raw query-log messages: a Kafka consumer group, or JSON lines from a file or stdin.

A source yields micro-batches of :class:`RawMessage` and is told, through :meth:`Source.commit`, when
a batch's results are durably stored; only then does a Kafka source commit the batch's offsets.
"""

from __future__ import annotations

import gzip
import logging
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, cast

import msgspec
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import ConsumerGroupMetadata, MemberState, OffsetAndMetadata

from ingest.records import SourcePosition
from ingest.transactions import KafkaTransactions

log = logging.getLogger(__name__)

PartitionCallback = Callable[[list[int]], None]

_ASSIGNORS: dict[str, Any] = {
    "cooperative-sticky": CooperativeStickyAssignor,
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
}


class AssignmentLost(Exception):
    """The consumer's group membership changed while a batch was processed: its partitions may belong
    to another worker by now, which restores their state from the checkpoints committed so far. So the
    batch must commit nothing, neither its checkpoint (it would overwrite the new owner's newer state)
    nor its offsets; the application rewinds to the committed state and offsets instead."""


class RawMessage(msgspec.Struct, gc=False):
    value: bytes
    position: SourcePosition
    key: bytes | None = None


class Source(Protocol):
    """Where raw messages come from. One direction: batches out, commits back."""

    name: str

    def batches(self) -> Iterator[list[RawMessage]]:
        """Yield micro-batches until the input ends (file) or :meth:`stop` is called."""
        ...

    def commit(self, batch: list[RawMessage]) -> None:
        """Mark every message of ``batch`` as done; called after its results are stored."""
        ...

    def confirm_assignment(self) -> None:
        """Raise :class:`AssignmentLost` when the partitions of the batch last handed out may have
        gone to another consumer since it was polled. Called before the batch's checkpoint."""
        ...

    def rewind(self) -> None:
        """Go back to the last committed position, reporting the partitions revoked and assigned
        again (so their state is restored as committed); after an aborted transaction."""
        ...

    def partition_count(self) -> int:
        """How many partitions the input is split into (a file: 1): a consumer-group member reads
        about its partitions' share of the records, which are keyed by client."""
        ...

    def stop(self) -> None:
        """Ask :meth:`batches` to end after the current batch (safe from a signal handler)."""
        ...

    @property
    def stopped(self) -> bool: ...

    def close(self) -> None: ...


class FileSource:
    """JSON lines from a file (plain or gzip) or stdin ('-'). Line numbers are the offsets.

    A batch is full at ``batch_max_records`` lines or ``batch_max_bytes`` of them. A file is read in
    full batches. Stdin from a pipe or a terminal is live: a batch is handed on once it is full or
    ``linger_s`` after its first line arrived, so that a stream piped in
    (``tail -F app.log | probewatch run --input -``) is scored as it comes, not once enough of it has."""

    def __init__(
        self,
        path: str,
        batch_max_records: int = 20_000,
        max_line_bytes: int | None = None,
        linger_s: float = 0.2,
        batch_max_bytes: int = 64 << 20,
    ) -> None:
        self.path = path
        self.name = "stdin" if path == "-" else path
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        # Lines longer than this are not held in memory: only their first max_line_bytes + 1 bytes are
        # passed on (so the decoder's size limit dead-letters them) and the rest is skipped.
        self.max_line_bytes = max_line_bytes
        self.linger_s = linger_s
        self._stopped = False
        self.total_bytes: int | None = None if path == "-" else Path(path).stat().st_size
        self._raw: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self.path == "-":
            return sys.stdin.buffer
        raw = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._raw = raw
        if raw.read(2) == b"\x1f\x8b":
            raw.seek(0)
            return cast(IO[bytes], gzip.GzipFile(fileobj=raw))
        raw.seek(0)
        return raw

    @property
    def bytes_read(self) -> int:
        """Compressed bytes consumed so far, for progress against ``total_bytes``."""
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def batches(self) -> Iterator[list[RawMessage]]:
        stream = self._open()
        if self.path == "-" and not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            yield from self._live_batches(stream.fileno())
            return
        batch = _BatchBuilder(self.name, self.batch_max_records, self.batch_max_bytes)
        try:
            for line_no, line in enumerate(self._lines(stream), start=1):
                full = batch.add(line_no, line.rstrip(b"\r\n"))
                if full:
                    yield full
                    if self._stopped:
                        return
            if batch.lines:
                yield batch.take()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            # A truncated .gz is common (a log still being written): keep what was read, say so.
            log.error("input %s ended with a read error after the last full line: %s", self.name, exc)
            if batch.lines:
                yield batch.take()

    def _live_batches(self, fd: int) -> Iterator[list[RawMessage]]:
        """Batches of a pipe or terminal as lines arrive: read with ``select`` and raw reads (Python's
        buffered reader blocks until its buffer is full or the input ends)."""
        lines = _LineSplitter(self.name, self.max_line_bytes)
        batch = _BatchBuilder(self.name, self.batch_max_records, self.batch_max_bytes)
        line_no = 0
        ended = False
        while not ended and not self._stopped:
            # Waiting with nothing read: wake now and then to see a stop request.
            wait = max(0.0, batch.started + self.linger_s - time.monotonic()) if batch.lines else 0.5
            try:
                readable, _, _ = select.select([fd], [], [], wait)
                chunk = os.read(fd, 1 << 20) if readable else None
            except OSError as exc:
                log.error("input %s ended with a read error after the last full line: %s", self.name, exc)
                break
            if chunk is None:  # quiet for the batch's linger time
                if batch.lines:
                    yield batch.take()
                continue
            ended = not chunk
            # A stop request is seen after this read's lines: what was read from a pipe cannot be
            # read again, so it is handed on, not dropped.
            for line in lines.feed(chunk) if chunk else lines.finish():
                line_no += 1
                full = batch.add(line_no, line)
                if full:
                    yield full
        if batch.lines:
            yield batch.take()

    def _lines(self, stream: IO[bytes]) -> Iterator[bytes]:
        limit = self.max_line_bytes
        if limit is None:
            yield from stream
            return
        while True:
            line = stream.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                size = len(line)
                while True:  # skip the rest of the over-long line, 1 MiB at a time
                    rest = stream.readline(1 << 20)
                    size += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                log.warning("input %s: a line of %d bytes is over the %d-byte limit", self.name, size, limit)
            yield line

    def commit(self, batch: list[RawMessage]) -> None:
        # A file has no consumer offsets; results are already durable when this is called.
        return None

    def confirm_assignment(self) -> None:
        # A file has one reader: its records never move to another.
        return None

    def rewind(self) -> None:
        raise NotImplementedError("a file is read once: file runs are never transactional")

    def partition_count(self) -> int:
        return 1

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()


class _BatchBuilder:
    """A file's or pipe's lines into batches of at most ``max_records`` lines and about ``max_bytes``
    (a batch is full once it holds that many: memory stays bounded whatever the lines' size). Blank
    lines are skipped; the line numbers are the offsets."""

    def __init__(self, name: str, max_records: int, max_bytes: int) -> None:
        self.name = name
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.lines: list[RawMessage] = []
        self.bytes = 0
        self.started = 0.0  # monotonic time of the batch's first line

    def add(self, line_no: int, line: bytes) -> list[RawMessage] | None:
        """Add a line; the batch, when this line filled it."""
        if not line.strip():
            return None
        if not self.lines:
            self.started = time.monotonic()
        self.lines.append(RawMessage(value=line, position=SourcePosition(self.name, 0, line_no)))
        self.bytes += len(line)
        return self.take() if len(self.lines) >= self.max_records or self.bytes >= self.max_bytes else None

    def take(self) -> list[RawMessage]:
        out, self.lines, self.bytes = self.lines, [], 0
        return out


class _LineSplitter:
    """Cuts raw reads into lines (without their line ends). A line longer than ``max_line_bytes`` is
    passed on as its first max_line_bytes + 1 bytes, so that the decoder's size limit dead-letters
    it, and the rest of it is skipped, not held: as FileSource does for files."""

    def __init__(self, name: str, max_line_bytes: int | None) -> None:
        self.name = name
        self.limit = max_line_bytes
        self._pending = b""  # the start of a line not yet ended
        self._skipped: int | None = None  # bytes of an over-long line so far (None: not in one)

    def feed(self, chunk: bytes) -> list[bytes]:
        parts = chunk.split(b"\n")
        out: list[bytes] = []
        for part in parts[:-1]:  # each ends a line
            if self._skipped is not None:
                self._over_long(self._skipped + len(part) + 1)
                self._skipped = None
            else:
                out.append(self._cut(self._pending + part).rstrip(b"\r"))
            self._pending = b""
        rest = parts[-1]
        if self._skipped is not None:
            self._skipped += len(rest)
        else:
            self._pending += rest
            if self.limit is not None and len(self._pending) > self.limit:
                out.append(self._pending[: self.limit + 1])
                self._skipped, self._pending = len(self._pending), b""
        return out

    def finish(self) -> list[bytes]:
        """The last line, when the input ended without a line end."""
        if self._skipped is not None:
            self._over_long(self._skipped)
            return []
        return [self._pending.rstrip(b"\r")] if self._pending else []

    def _cut(self, line: bytes) -> bytes:
        if self.limit is not None and len(line) > self.limit:
            self._over_long(len(line) + 1)
            return line[: self.limit + 1]
        return line

    def _over_long(self, size: int) -> None:
        log.warning("input %s: a line of %d bytes is over the %d-byte limit", self.name, size, self.limit)


class KafkaUnavailable(Exception):
    """The brokers did not answer, or refused this client, at start-up; the message says why (never
    with a secret: it is built from kafka-python's reasons, which name no password)."""


# What kafka-python's reasons mean for the operator, most specific first (see check_kafka); {detail} is
# the end of kafka-python's line, after its last ": ".
_KAFKA_REFUSALS = (
    ("SaslAuthenticationFailed", "the broker rejected the credentials of {user} ({mechanism})"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the broker's certificate is not trusted: set kafka.ssl_cafile to the CA that signed it",
    ),
    (
        "BAD_CERTIFICATE",
        "the broker refused this client's certificate: set kafka.ssl_certfile and kafka.ssl_keyfile to one it trusts",
    ),
    ("Handshake failed", "the TLS handshake failed: {detail}"),
    (
        "socket disconnected",
        "the broker closed the connection: does kafka.security_protocol ({protocol}) match the listener at that "
        "address, and does it know {user}?",
    ),
    ("ECONNREFUSED", "nothing listens there (connection refused)"),
)


class _KafkaReasons(logging.Handler):
    """kafka-python's own log lines while it connects: the only place where it says why a connection
    failed (the exception it raises only says it could not bootstrap)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())


def check_kafka(config: Any) -> None:
    """Connect to the brokers once, as every Kafka client of a worker will (the same TLS and SASL
    options), and raise :class:`KafkaUnavailable` with the reason when that fails within
    ``config.connect_timeout_s``: a wrong password or an untrusted certificate is then one clear line
    at start-up, not a minute of kafka-python's retries followed by a timeout."""
    reasons = _KafkaReasons()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(reasons)
    propagate, kafka_log.propagate = kafka_log.propagate, False  # its retries' noise: summed up below
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=config.bootstrap_servers.split(","),
            client_id=config.client_id,
            bootstrap_timeout_ms=int(config.connect_timeout_s * 1000),
            **kafka_security_options(config),
        )
    except (KafkaError, OSError, ValueError) as exc:
        why = _refusal(config, reasons.reasons, exc)
        where = f"Kafka at {config.bootstrap_servers}"
        raise KafkaUnavailable(f"cannot reach {where} within {config.connect_timeout_s:g} s: {why}") from None
    finally:
        kafka_log.removeHandler(reasons)
        kafka_log.propagate = propagate
    admin.close()


def _refusal(config: Any, reasons: list[str], exc: Exception) -> str:
    user = f"user {config.sasl.username!r}" if config.security_protocol.startswith("SASL") else "this client"
    for marker, meaning in _KAFKA_REFUSALS:
        said = next((reason for reason in reversed(reasons) if marker in reason), None)
        if said is not None:
            return meaning.format(
                user=user,
                mechanism=config.sasl.mechanism,
                protocol=config.security_protocol,
                detail=said.rpartition(": ")[2],
            )
    return reasons[-1] if reasons else f"{type(exc).__name__}: {exc}"


def kafka_security_options(config: Any) -> dict[str, Any]:
    """kafka-python keyword arguments for TLS / SASL from a KafkaConfig (shared by consumer and producers)."""
    options: dict[str, Any] = {"security_protocol": config.security_protocol}
    if config.security_protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(config, key):
                options[key] = getattr(config, key)
    if config.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = config.sasl.mechanism
        options["sasl_plain_username"] = config.sasl.username
        options["sasl_plain_password"] = config.sasl.password
    return options


class KafkaSource:
    """A kafka-python consumer in a consumer group; offsets are committed only by :meth:`commit`.

    Partition assignment changes are reported through ``on_assigned`` / ``on_revoked`` so that the
    application can restore or drop per-partition state. They are called on the polling thread after
    ``poll()`` returns and before any polled record is handed out, not from kafka-python's rebalance
    listener: kafka-python (3.x) runs that listener on its IO loop, where a restore that reads a large
    changelog would hold up heartbeats past the session timeout and have the worker thrown out of the
    group (a rebalance storm). The listener only takes note. Since every batch is stored and
    committed before the next poll, a revocation never strands uncommitted results (nor an open
    transaction).

    With ``transactions`` (exactly-once), :meth:`commit` adds the offsets to the open transaction
    instead of committing them, and only committed input is read.
    """

    def __init__(
        self,
        config: Any,
        on_assigned: PartitionCallback | None = None,
        on_revoked: PartitionCallback | None = None,
        transactions: KafkaTransactions | None = None,
    ) -> None:
        self.config = config
        self.name = f"kafka:{config.topic}"
        self._stopped = False
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._transactions = transactions
        self._owned: set[int] = set()  # partitions whose state the application holds
        # What kafka-python's rebalance listener said since the last poll (written on its IO thread).
        self._told_lock = threading.Lock()
        self._told_assigned: set[int] = set()
        self._told_revoked: set[int] = set()
        # The group membership the last batch was polled under (see confirm_assignment).
        self._polled_under = ConsumerGroupMetadata(group_id=config.group_id)
        self._consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers.split(","),
            group_id=config.group_id,
            client_id=config.client_id,
            enable_auto_commit=False,
            auto_offset_reset=config.auto_offset_reset,
            max_poll_records=config.batch_max_records,
            max_partition_fetch_bytes=config.max_partition_fetch_bytes,
            partition_assignment_strategy=[_ASSIGNORS[config.assignment_strategy]],
            max_poll_interval_ms=config.max_poll_interval_ms,
            session_timeout_ms=config.session_timeout_ms,
            isolation_level="read_uncommitted" if transactions is None else "read_committed",
            **kafka_security_options(config),
        )
        self._consumer.subscribe([config.topic], listener=_RebalanceListener(self))

    def batches(self) -> Iterator[list[RawMessage]]:
        delay = 0.5
        while not self._stopped:
            try:
                polled = self._consumer.poll(
                    timeout_ms=self.config.poll_timeout_ms, max_records=self.config.batch_max_records
                )
            except KafkaError as exc:
                # The broker is restarting or unreachable: wait and poll again; the consumer
                # reconnects by itself and resumes from its position.
                log.warning("polling Kafka failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            # The membership these records are processed under (see confirm_assignment), read before
            # the restores below, which take a while.
            membership = self._consumer.group_metadata()
            settled = _is_member(membership)
            try:
                self._reconcile_assignment(settled)
            except Exception as exc:
                # A restore failed (the changelog or storage is unreachable, say): hand out nothing,
                # put the polled records back, and try again. Never process a partition unrestored.
                log.error("restoring partition state failed (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                self._unpoll(polled)
                time.sleep(1.0)
                continue
            if polled and not settled:
                # The consumer fell out of the group, or began to rejoin it, on kafka-python's IO thread
                # since this poll fetched: these records are handed out again after the rejoin.
                self._unpoll(polled)
                polled = {}
            self._polled_under = membership
            owned = self._owned
            batch = [
                RawMessage(
                    value=msg.value if msg.value is not None else b"",
                    key=msg.key,
                    position=SourcePosition(msg.topic, msg.partition, msg.offset),
                )
                for tp, messages in polled.items()
                if tp.partition in owned  # a partition revoked during this poll is no longer ours
                for msg in messages
            ]
            yield batch  # empty batches too: the application uses them to advance idle time

    def _announce(self, assigned: list[int], revoked: list[int]) -> None:
        """Tell the application which partitions it gained or lost (state restore / drop). A partition
        counts as owned once its restore has returned, and as gone once its drop has: a callback that
        raises (kafka-python turns a listener's exception into a KafkaError from poll, which
        :meth:`batches` retries) is announced again by the next poll's reconciliation."""
        if revoked:
            if self._on_revoked:
                self._on_revoked(revoked)
            self._owned -= set(revoked)
        if assigned:
            if self._on_assigned:
                self._on_assigned(assigned)
            self._owned |= set(assigned)

    def _reconcile_assignment(self, settled: bool) -> None:
        """Announce what the last poll changed: partitions revoked (dropped, even when assigned again
        in the same poll: another worker may have moved them on meanwhile), then partitions gained
        (restored). Called after every poll, before the polled records are processed, so no record of
        a partition is processed before its state is restored. It also catches changes that came
        without a listener call: in CI, kafka-python's cooperative rebalancing once gave a worker a
        dead worker's partition without calling on_partitions_assigned.

        While a rejoin is under way (not ``settled``) nothing is restored: kafka-python keeps an eager
        member's revoked partitions in its assignment until the join completes, and the group may hand
        them to another worker. They are restored at the poll where the group settles."""
        with self._told_lock:
            told_assigned, self._told_assigned = self._told_assigned, set()
            told_revoked, self._told_revoked = self._told_revoked, set()
        current = {tp.partition for tp in self._consumer.assignment()}
        lost = sorted((self._owned - current) | (self._owned & told_revoked))
        gained = sorted(current - (self._owned - set(lost)))
        if not settled:
            self.take_note(told_assigned, ())  # explained when they are restored
            gained = []
        unexplained = (set(gained) - told_assigned) | (set(lost) - told_revoked)
        if unexplained:
            log.warning("partition assignment changed without a rebalance callback: gained %s, lost %s", gained, lost)
        try:
            self._announce([], lost)
            self._announce(gained, [])
        except BaseException:
            # What was not dropped is dropped at the next poll; what was not restored is not owned
            # (see _announce), so it is restored then.
            self.take_note(told_assigned, told_revoked & self._owned)
            raise

    def take_note(self, assigned: Iterable[int], revoked: Iterable[int]) -> None:
        """Record what the rebalance listener was told (on kafka-python's IO thread)."""
        with self._told_lock:
            self._told_assigned.update(assigned)
            self._told_revoked.update(revoked)

    def _unpoll(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Seek every partition of a poll's result back to its first record, so the next poll returns
        those records again."""
        assigned = self._consumer.assignment()
        for tp, messages in polled.items():
            if messages and tp in assigned:
                self._consumer.seek(tp, messages[0].offset)

    def commit(self, batch: list[RawMessage]) -> None:
        latest: dict[tuple[str, int], int] = {}
        for message in batch:  # plain tuples: one TopicPartition per record cost more than the commit
            position = message.position
            key = (position.topic, position.partition)
            if position.offset > latest.get(key, -1):
                latest[key] = position.offset
        if not latest:
            return
        offsets = {TopicPartition(*key): OffsetAndMetadata(off + 1, "", -1) for key, off in latest.items()}
        if self._transactions is not None:
            # Errors go to the transaction, which aborts: the offsets count only if it commits. They go
            # with the membership the batch was polled under, not the current one, so the broker refuses
            # them if the group has rebalanced since (KIP-447); it accepts unfenced offsets from a
            # consumer that is no longer a member at all (generation -1).
            self._transactions.send_offsets(offsets, self._polled_under)
            return
        try:
            self._consumer.commit(offsets)
        except KafkaError as exc:
            # Safe to go on: the next successful commit covers these offsets too, and if the partitions
            # moved meanwhile (a rebalance), their new owner replays from the last committed offset onto
            # the checkpointed state, which skips what was already applied.
            log.warning(
                "offset commit failed (%s: %s); the records will be replayed, not lost", type(exc).__name__, exc
            )

    def confirm_assignment(self) -> None:
        """kafka-python keeps the group membership on its IO thread: while a batch is processed, its
        heartbeat can learn that the member was thrown out (a session that expired across a broker
        restart, a stall past max_poll_interval_ms), and a rejoin begun in an earlier poll can complete.
        Either way the batch's partitions may be another worker's by now."""
        polled_under, current = self._polled_under, self._consumer.group_metadata()
        if not _is_member(current) or current.generation_id != polled_under.generation_id:
            raise AssignmentLost(
                f"not the group member the batch was polled by (generation {polled_under.generation_id}, "
                f"{polled_under.state} then; {current.generation_id}, {current.state} now)"
            )

    def rewind(self) -> None:
        assigned = sorted(self._consumer.assignment())
        partitions = [tp.partition for tp in assigned]
        if not partitions:
            return
        log.info("rewinding partitions %s to their committed offsets", partitions)
        self._announce([], partitions)
        for tp in assigned:
            committed = self._consumer.committed(tp)
            if committed is not None:
                self._consumer.seek(tp, committed)
            elif self.config.auto_offset_reset == "earliest":
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek_to_end(tp)
        if _is_member(self._consumer.group_metadata()):
            self._announce(partitions, [])
        # Otherwise (out of the group, or rejoining) the poll where the group settles restores what
        # is still this worker's.

    def partition_count(self) -> int:
        # From the consumer's metadata cache, which the group's assignment filled already.
        return max(1, len(self._consumer.partitions_for_topic(self.config.topic)))

    def lag(self) -> dict[int, int]:
        """Messages behind the log end, per assigned partition (for metrics)."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        ends = self._consumer.end_offsets(assigned)
        return {tp.partition: max(0, ends[tp] - self._consumer.position(tp)) for tp in assigned}

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def close(self) -> None:
        # Leaves the group at once so the partitions move to the other workers without waiting
        # for the session timeout.
        self._consumer.close(autocommit=False)


def _is_member(membership: ConsumerGroupMetadata) -> bool:
    """Whether the consumer holds a settled place in its group (a generation, no rejoin under way)."""
    return bool(membership.generation_id >= 0 and membership.state == MemberState.STABLE)


class _RebalanceListener(ConsumerRebalanceListener):
    """Takes note only: it runs on kafka-python's IO loop, where slow work would hold up heartbeats.
    The source announces the changes after the poll (see KafkaSource._reconcile_assignment)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        partitions = sorted(tp.partition for tp in revoked)
        log.info("partitions revoked: %s", partitions)
        self.source.take_note([], partitions)

    def on_partitions_assigned(self, assigned: Any) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        log.info("partitions assigned: %s", partitions)
        self.source.take_note(partitions, [])

    def on_partitions_lost(self, lost: Any) -> None:
        # kafka-python logs why (a session expired, a stall past max_poll_interval_ms) below the level
        # probewatch shows its logs at; this is the line an operator finds.
        partitions = sorted(tp.partition for tp in lost)
        log.warning("partitions lost: %s (this worker was out of the group; their new owners restore them)", partitions)
        self.source.take_note([], partitions)
