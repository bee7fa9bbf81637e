"""Property tests (hypothesis): bad input never crashes the pipeline and is never lost (issue #6).

Two levels:

* the record decoder alone (``RecordDecoder.decode_batch``): many examples, fast;
* the whole batch path (``Pipeline.process_batch``) on a real embedded ClickHouse (chDB) store in a
  temporary directory and a real ``FileDeadLetterSink``; nothing is mocked. Every record accepted is
  found again in the ``events`` table (``raw_sample_rate = 1``) and every record rejected in the
  dead-letter file, each exactly once, so "records + dead letters == inputs" is checked on what was
  actually stored, not on return values.

Inputs are generated with a known expectation: ``good`` (must be accepted), ``bad`` (must be
dead-lettered with a non-empty reason) or ``any`` (either, but exactly one).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_helpers import HandedBatches

from ingest.deadletter import FileDeadLetterSink
from ingest.records import MAX_EPOCH_S, MIN_EPOCH_S, DeadLetter, QueryRecord, RecordDecoder, SourcePosition
from ingest.sources import FileSource, RawMessage
from probewatch.app import Pipeline
from probewatch.changelog import StoreStateBackend
from probewatch.config import Config, load_config
from storage import Store, open_store

# Models with a configured input dimension (mixed dims in one batch), plus one that learns its own.
DIMS = {"m2": 2, "m8": 8, "m33": 33}
LEARNED_MODEL = "learned"
LIMITS = {"max_record_bytes": 1_000_000, "max_vector_len": 65_536, "max_classes": 10_000, "max_string_len": 512}


def fuzz(examples: int) -> settings:
    """Hypothesis settings: a fixed example budget (the whole module runs in well under a minute), no
    per-example deadline (chDB writes vary), no example database written into the repository, and a
    reproduction blob printed on failure (``@reproduce_failure``)."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ---------------------------------------------------------------------------------------------------
# Strategies

# Strings that have broken SQL builders, format strings, our own key separator and JSON escaping.
NASTY_TEXT = [
    "'; DROP TABLE events; --",
    "x; DROP TABLE session_scores",
    "{client_id:String}",
    "{{}}",
    "%s%s%n",
    "${jndi:ldap://x/a}",
    "\\",
    '"',
    "`",
    "\u2028\u2029",
    "\ufeffbom",
    "𝄞 emoji 🙂 ok",
    "é" * 512,  # at the character limit (1,024 UTF-8 bytes)
    "ünïcödé-кириллица-中文-العربية",
]
NASTY_IDS = [t for t in NASTY_TEXT if t.strip()]

id_text = st.one_of(
    st.sampled_from(NASTY_TEXT),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40),
).filter(lambda s: bool(s.strip()))
free_text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=60))  # any Unicode scalar, controls too
finite = st.floats(allow_nan=False, allow_infinity=False)
f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # every finite float32
unit = st.floats(min_value=0.0, max_value=1.0)

valid_ts = st.one_of(
    st.floats(min_value=MIN_EPOCH_S + 1, max_value=MAX_EPOCH_S - 1),
    st.integers(min_value=int(MIN_EPOCH_S) + 1, max_value=int(MAX_EPOCH_S) - 1),
    st.integers(min_value=int(MIN_EPOCH_S * 1000) + 1000, max_value=int(MAX_EPOCH_S * 1000) - 1000),  # millis
    st.builds(
        lambda dt, minutes: dt.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
        st.datetimes(min_value=datetime(2001, 9, 10), max_value=datetime(2099, 12, 30)),
        st.integers(min_value=-12 * 60, max_value=14 * 60),
    ),
)


@st.composite
def good_record(draw: st.DrawFn, model: str | None = None) -> dict[str, Any]:
    model = model or draw(st.sampled_from(sorted(DIMS)))
    record: dict[str, Any] = {"ts": draw(valid_ts), "client_id": draw(id_text), "model_id": model}
    dim = DIMS.get(model, 5)
    if draw(st.booleans()):
        record["input"] = {"vector": draw(st.lists(f32, min_size=dim, max_size=dim))}
    kind = draw(st.sampled_from(["probs", "label", "score", "none"]))
    if kind == "probs":
        record["output"] = {"probs": draw(st.lists(unit, min_size=1, max_size=12))}
        if draw(st.booleans()):
            record["output"]["label"] = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), id_text))
    elif kind == "label":
        record["output"] = {"label": draw(st.one_of(st.integers(0, 1000), id_text)), "confidence": draw(unit)}
    elif kind == "score":
        record["output"] = {"score": draw(finite)}
    optional = {
        "request_id": free_text,
        "session_id": st.one_of(st.just(""), id_text),
        "source_ip": st.one_of(st.ip_addresses().map(str), free_text),
        "user_agent": free_text,
        "latency_ms": finite,
        "status": st.integers(min_value=-(2**70), max_value=2**70),  # clamped to Int32 in storage
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            record[name] = draw(strategy)
    if draw(st.booleans()):
        record["extra_ignored"] = draw(st.recursive(st.none() | finite | free_text, lambda c: st.lists(c, max_size=3)))
    return record


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# Values of the wrong type (or out of contract) for every field of the record.
WRONG: dict[str, list[Any]] = {
    "ts": [True, None, [], {}, "not a time", "2026-01-01T00:00:00", -5, 0, 1e30, 10**30, "1793491201", 5e8],
    "client_id": [1, 1.5, True, None, [], {}, "", "   ", "c" * 513, "a\x1fb", "a\x00b", "tab\there"],
    "model_id": [1, True, None, ["m2"], {}, "", "\u3000", "m" * 513, "m2\x1f", "m\x7f"],
    "request_id": [1, 2.5, False, [], {}, "r" * 513],
    "session_id": [7, True, [], {"a": 1}, "s" * 513, "s\x1f1", "s\n"],
    "source_ip": [1, [], {}, True, "i" * 513],
    "user_agent": [1, [], {}, False, "u" * 513],
    "latency_ms": ["5", True, [], {}],
    "status": ["200", 1.5, True, [], {}],
    "input": ["x", 1, [], True],
    "output": ["x", 1, [0.5], True],
}
WRONG_VECTOR: list[Any] = [
    "abc",
    {},
    [],
    ["x"],
    [True, False],
    [[0.1], [0.2]],
    [None],
    [1e39] * 8,  # beyond float32
    [3.4e38, -1e40],
]
WRONG_OUTPUT: list[dict[str, Any]] = [
    {"probs": []},
    {"probs": "x"},
    {"probs": [0.5, -0.5]},
    {"probs": [1.5]},
    {"probs": [1e39, 0.0]},
    {"probs": [0.1] * 10_001},
    {"probs": [[0.1]]},
    {"confidence": 1.5},
    {"confidence": -0.1},
    {"confidence": "high"},
    {"label": [1]},
    {"label": {"a": 1}},
    {"label": 1.5},
    {"label": True},
    {"label": "L" * 513},
    {"probs": [0.2, 0.8], "label": "L" * 100_000},
    {"score": "1"},
    {"score": []},
]


@st.composite
def bad_record(draw: st.DrawFn) -> bytes:
    """A record that breaks the contract in exactly one, randomly chosen, way."""
    record = draw(good_record())
    how = draw(st.sampled_from(["missing", "wrong", "vector", "output", "dim", "raw", "huge"]))
    if how == "missing":
        record.pop(draw(st.sampled_from(["ts", "client_id", "model_id"])))
    elif how == "wrong":
        field = draw(st.sampled_from(sorted(WRONG)))
        record[field] = draw(st.sampled_from(WRONG[field]))
    elif how == "vector":
        record["input"] = {"vector": draw(st.sampled_from(WRONG_VECTOR))}
    elif how == "output":
        record["output"] = draw(st.sampled_from(WRONG_OUTPUT))
    elif how == "dim":
        model = draw(st.sampled_from(sorted(DIMS)))
        record["model_id"] = model
        size = draw(st.integers(1, 40).filter(lambda n: n != DIMS[model]))
        record["input"] = {"vector": [0.5] * size}
    elif how == "huge":
        # Huge vectors and strings, each over its limit (but under the record-size limit).
        record[draw(st.sampled_from(["client_id", "user_agent"]))] = "h" * 100_000
        if draw(st.booleans()):
            record["input"] = {"vector": [0.25] * (LIMITS["max_vector_len"] + 1)}
    else:
        # Raw text that the JSON serializer would never produce.
        text = json.dumps(record)
        return draw(
            st.sampled_from(
                [
                    text.replace('"ts": ', '"ts": NaN, "x": ', 1),
                    text.replace('"ts": ', '"ts": Infinity, "x": ', 1),
                    text.replace('"ts": ', '"ts": 1e999, "x": ', 1),
                    text[: len(text) // 2],
                    text + "garbage",
                    text.replace('"client_id": "', '"client_id": "\\ud800', 1),  # lone surrogate escape
                    "\ufeff" + text,
                    text.replace("{", "{" + '"extra": ' + nested(10_000) + ", ", 1),
                    text.replace("{", "{" + '"extra": ' + nested(10_000, '{"a":', "}").replace("}", "1}", 1) + ", ", 1),
                    nested(10_000),
                    "null",
                    "[]",
                    '"a string"',
                    "12",
                    "",
                    "   \t ",
                ]
            )
        ).encode("utf-8")
    return encode(record, draw(st.booleans()))


def encode(record: dict[str, Any], ascii_only: bool = False) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only, allow_nan=False).encode("utf-8")


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )


any_payload = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    json_values().map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"\n", b"\r\n", b" ", b"\x00", b"\xff\xfe\xfd", b"\xed\xa0\x80", b"{}", b"{", b"}"]),
    # Surrogates smuggled in as raw (invalid) UTF-8 bytes.
    good_record().map(lambda r: encode(r).replace(b'"client_id": "', b'"client_id": "\xed\xa0\x80', 1)),
)

labelled = st.one_of(
    good_record().map(lambda r: ("good", encode(r))),
    good_record().map(lambda r: ("good", encode(r, ascii_only=True))),
    good_record(model=LEARNED_MODEL).map(lambda r: ("any", encode(r))),
    bad_record().map(lambda b: ("bad", b)),
    any_payload.map(lambda b: ("any", b)),
)


# ---------------------------------------------------------------------------------------------------
# Decoder alone


def new_decoder() -> RecordDecoder:
    return RecordDecoder(**LIMITS, input_dims=dict(DIMS))


def check_outcome(
    inputs: list[tuple[str, bytes]], records: list[QueryRecord], letters: list[DeadLetter], topic: str
) -> None:
    """Every input is either a record or a dead letter, exactly once, and as expected."""
    accepted = [r.position.offset for r in records]
    rejected = [x.position.offset for x in letters]
    assert len(accepted) + len(rejected) == len(inputs)
    assert sorted(accepted + rejected) == list(range(len(inputs)))
    for letter in letters:
        assert letter.position.topic == topic
        assert letter.reason.strip(), f"empty reason for {letter.payload[:200]!r}"
        assert letter.payload == inputs[letter.position.offset][1]
        expected = inputs[letter.position.offset][0]
        assert expected != "good", f"a valid record was dead-lettered: {letter.reason}\n{letter.payload[:300]!r}"
    for record in records:
        expected = inputs[record.position.offset][0]
        assert expected != "bad", f"an invalid record was accepted: {inputs[record.position.offset][1][:300]!r}"
        check_record(record)


def check_record(record: QueryRecord) -> None:
    assert MIN_EPOCH_S <= record.ts <= MAX_EPOCH_S
    assert record.client_id.strip() and record.model_id.strip()
    if record.vector is not None:
        assert record.vector.ndim == 1 and record.vector.dtype.name == "float32"
        assert bool(np.isfinite(record.vector).all())
        if record.model_id in DIMS:
            assert len(record.vector) == DIMS[record.model_id]
    if record.probs is not None:
        assert record.confidence is not None and 0.0 <= record.confidence <= 1.0 + 1e-6
    for value in (record.latency_ms, record.score, record.confidence, record.margin):
        assert value is None or math.isfinite(value)


@fuzz(100)
@given(st.lists(labelled, min_size=1, max_size=12))
def test_decoder_accounts_for_every_input(inputs: list[tuple[str, bytes]]) -> None:
    decoder = new_decoder()
    messages = [(payload, SourcePosition("fuzz", 0, i), b"k") for i, (_, payload) in enumerate(inputs)]
    records, letters = decoder.decode_batch(messages)
    check_outcome(inputs, records, letters, "fuzz")


@fuzz(300)
@given(st.binary(max_size=2_000))
def test_decoder_survives_random_bytes(payload: bytes) -> None:
    result = new_decoder().decode(payload, SourcePosition("bytes", 0, 0))
    if isinstance(result, DeadLetter):
        assert result.reason.strip() and result.payload == payload


@fuzz(60)
@given(st.lists(st.sampled_from([*DIMS, "fresh-a", "fresh-b"]), min_size=1, max_size=30), st.data())
def test_mixed_models_keep_their_dimensions(models: list[str], data: st.DataObject) -> None:
    """Mixed models with different dimensions in one batch: each record is judged against its own
    model's dimension, and a model that learns its dimension learns it from its first valid vector."""
    decoder = RecordDecoder(input_dims=dict(DIMS))
    messages = []
    sizes = []
    for i, model in enumerate(models):
        size = data.draw(st.integers(1, 40)) if model.startswith("fresh") else DIMS[model]
        valid = data.draw(st.booleans())
        vector = [0.5] * size if valid else [1e39] * size  # beyond float32: dead-lettered
        sizes.append((model, size, valid))
        messages.append(
            (
                encode({"ts": 1.8e9, "client_id": "c", "model_id": model, "input": {"vector": vector}}),
                SourcePosition("dims", 0, i),
                None,
            )
        )
    records, letters = decoder.decode_batch(messages)
    assert len(records) + len(letters) == len(models)
    learned: dict[str, int] = dict(DIMS)
    for model, size, valid in sizes:
        if valid:
            learned.setdefault(model, size)
    accepted = {r.position.offset for r in records}
    for i, (model, size, valid) in enumerate(sizes):
        assert (i in accepted) == (valid and learned[model] == size), (i, model, size, valid, learned)


def test_ten_megabyte_record_is_rejected_without_being_parsed() -> None:
    decoder = new_decoder()
    # Not JSON at all: if it were parsed, the reason would be "not valid JSON".
    payload = b"[" * (10 * 1024 * 1024)
    tracemalloc.start()
    try:
        result = decoder.decode(payload, SourcePosition("big", 0, 0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, DeadLetter)
    assert "over the 1000000-byte limit" in result.reason
    assert result.payload is payload  # kept as is for the DLQ, not copied
    assert peak < 256 * 1024, f"rejecting a 10 MB record allocated {peak} bytes"


def test_file_source_does_not_hold_an_overlong_line(tmp_path: Path) -> None:
    """A 10 MB line in a file is skipped in bounded memory and still dead-lettered (its first bytes)."""
    good = encode({"ts": 1.8e9, "client_id": "c", "model_id": "m2"})
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb") as out:
        out.write(good + b"\n" + b'{"client_id": "' + b"x" * (10 * 1024 * 1024) + b'"}\n\n' + good + b"\n")
    source = FileSource(str(path), max_line_bytes=LIMITS["max_record_bytes"])
    tracemalloc.start()
    try:
        messages = [m for batch in source.batches() for m in batch]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert [m.position.offset for m in messages] == [1, 2, 4]
    assert len(messages[1].value) == LIMITS["max_record_bytes"] + 1
    assert peak < 6 * 1024 * 1024, f"reading a 10 MB line took {peak} bytes"  # the line alone is 10 MiB
    records, letters = new_decoder().decode_batch([(m.value, m.position, None) for m in messages])
    assert [r.position.offset for r in records] == [1, 4]
    assert [x.position.offset for x in letters] == [2] and "byte limit" in letters[0].reason


# ---------------------------------------------------------------------------------------------------
# The whole batch path on a real chDB store


class Harness:
    def __init__(self, root: Path) -> None:
        self.config: Config = load_config(
            environ={},
            overrides={
                "limits": LIMITS,
                "detection": {"input_dims": DIMS, "min_queries": 5},
                "storage": {
                    "backend": "chdb",
                    "database": "fuzz",
                    "chdb": {"path": str(root / "chdb")},
                    "raw_sample_rate": 1.0,
                    "store_inputs": True,
                },
                "alerting": {"console": False},
            },
        )
        self.store: Store = open_store(self.config.storage)
        self.store.migrate()
        self.dlq_path = root / "dlq.jsonl"
        self.pipelines = {
            # A file run (no state checkpoints) and a Kafka-style run that checkpoints every batch.
            checkpointed: Pipeline(
                self.config,
                self.store,
                FileDeadLetterSink(str(self.dlq_path)),
                [],
                state=StoreStateBackend(self.store) if checkpointed else None,
            )
            for checkpointed in (False, True)
        }
        self.dlq_read = 0
        self.next_offset = {False: 0, True: 0}

    def new_dead_letters(self) -> list[dict[str, Any]]:
        """Dead-letter documents appended to the DLQ file since the last call."""
        with open(self.dlq_path, "rb") as dlq:
            dlq.seek(self.dlq_read)
            data = dlq.read()
        self.dlq_read += len(data)
        assert not data or data.endswith(b"\n")
        return [msgspec.json.decode(line) for line in data.splitlines()]

    def run(self, inputs: list[tuple[str, bytes]], checkpointed: bool) -> None:
        # A fresh topic name per batch tells its rows apart; offsets keep growing per pipeline, as
        # Kafka offsets do (a Kafka-style pipeline skips offsets below its checkpoint as replayed).
        topic = f"fuzz-{uuid.uuid4().hex[:12]}"
        base = self.next_offset[checkpointed]
        self.next_offset[checkpointed] += len(inputs)
        batch = [
            RawMessage(value=payload, position=SourcePosition(topic, 0, base + i), key=b"k")
            for i, (_, payload) in enumerate(inputs)
        ]
        pipeline = self.pipelines[checkpointed]
        before = pipeline.summary.records_read
        source = HandedBatches()
        pipeline.process_batch(batch, source)
        assert source.committed == len(inputs)
        assert pipeline.summary.records_read - before == len(inputs)
        assert pipeline.summary.skipped_replayed == 0

        letters = self.new_dead_letters() if self.dlq_path.exists() else []
        assert all(doc["source"]["topic"] == topic for doc in letters)
        rejected = [doc["source"]["offset"] - base for doc in letters]
        rows = self.store.query(
            "SELECT source_offset, client_id, model_id FROM fuzz.events FINAL WHERE source_topic = {t:String}",
            {"t": topic},
        )
        accepted = [row[0] - base for row in rows]
        # Every input exactly once: stored as an event, or in the dead-letter file.
        assert sorted(accepted + rejected) == list(range(len(inputs))), (accepted, rejected)
        for doc in letters:
            expected, payload = inputs[doc["source"]["offset"] - base]
            assert doc["reason"].strip()
            assert expected != "good", f"valid record dead-lettered: {doc['reason']}\n{payload[:300]!r}"
            stored = doc["payload"].encode("utf-8") if "payload" in doc else base64.b64decode(doc["payload_base64"])
            assert stored == payload
        for offset, client_id, model_id in rows:
            expected, payload = inputs[offset - base]
            assert expected != "bad", f"invalid record stored: {payload[:300]!r}"
            if expected == "good":
                original = json.loads(payload)
                assert (client_id, model_id) == (original["client_id"], original["model_id"])
        stats = self.store.query(
            "SELECT records, dead_lettered FROM fuzz.pipeline_batches FINAL WHERE startsWith(batch_id, {b:String})",
            {"b": f"{topic}:"},
        )
        assert stats == [(len(inputs), len(letters))]

    def close(self) -> None:
        for pipeline in self.pipelines.values():
            pipeline.dead_letters.close()
        self.store.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.close()


@fuzz(30)
@given(st.lists(labelled, min_size=1, max_size=20), st.booleans())
def test_pipeline_stores_or_dead_letters_every_input(
    harness: Harness, inputs: list[tuple[str, bytes]], checkpointed: bool
) -> None:
    harness.run(inputs, checkpointed)


@fuzz(10)
@given(st.lists(st.binary(min_size=0, max_size=500), min_size=1, max_size=30), st.booleans())
def test_pipeline_survives_random_bytes(harness: Harness, payloads: list[bytes], checkpointed: bool) -> None:
    harness.run([("any", p) for p in payloads], checkpointed)


@fuzz(4)
@given(st.integers(min_value=200, max_value=600), st.booleans())
def test_pipeline_sessions_with_many_queries(harness: Harness, n: int, checkpointed: bool) -> None:
    """Enough queries per session to be scored (and maybe alert), mixed models, odd identifiers."""
    inputs = []
    for i in range(n):
        model = ["m2", "m8", "m33"][i % 3]
        record = {
            "ts": 1.8e9 + i,
            "client_id": NASTY_IDS[i % len(NASTY_IDS)],
            "model_id": model,
            "session_id": NASTY_IDS[(i * 7) % len(NASTY_IDS)],
            "source_ip": f"10.0.{i % 4}.{i % 7}",
            "input": {"vector": [((i * 31 + j) % 17) / 17.0 for j in range(DIMS[model])]},
            "output": {"probs": [0.25, 0.75] if i % 2 else [0.5, 0.5]},
        }
        inputs.append(("good", encode(record)))
    harness.run(inputs, checkpointed)


def test_pipeline_rejects_ten_megabyte_record(harness: Harness) -> None:
    good = encode({"ts": 1.8e9, "client_id": "c", "model_id": "m2", "input": {"vector": [0.1, 0.2]}})
    big = b'{"ts": 1800000000, "client_id": "' + b"x" * (10 * 1024 * 1024) + b'", "model_id": "m2"}'
    harness.run([("good", good), ("bad", big), ("good", good)], checkpointed=False)


# ---------------------------------------------------------------------------------------------------
# Dead-letter file round trip


@fuzz(80)
@given(st.lists(st.tuples(st.binary(max_size=300) | st.text(max_size=100).map(str.encode), free_text), max_size=10))
def test_random_bytes_round_trip_through_the_dlq_file(tmp_path_factory: pytest.TempPathFactory, items: Any) -> None:
    path = tmp_path_factory.mktemp("dlq") / "dlq.jsonl"
    letters = [
        DeadLetter(reason=reason or "r", payload=payload, position=SourcePosition("t", 3, i), key=None)
        for i, (payload, reason) in enumerate(items)
    ]
    sink = FileDeadLetterSink(str(path))
    sink.write(letters)
    sink.close()
    lines = path.read_bytes().splitlines() if path.exists() else []
    assert len(lines) == len(letters)
    for letter, line in zip(letters, lines, strict=True):
        doc = msgspec.json.decode(line)
        if "payload" in doc:
            assert doc["payload"].encode("utf-8") == letter.payload
        else:
            assert base64.b64decode(doc["payload_base64"], validate=True) == letter.payload
            with pytest.raises(UnicodeDecodeError):
                letter.payload.decode("utf-8")
        assert doc["reason"] == letter.reason
        assert doc["source"] == {"topic": "t", "partition": 3, "offset": letter.position.offset}


def test_nothing_here_depends_on_the_wall_clock() -> None:
    # The generated timestamps lie inside the decoder's accepted window whatever today's date is.
    assert datetime(2001, 9, 10, tzinfo=UTC).timestamp() > MIN_EPOCH_S
    assert datetime(2099, 12, 31, tzinfo=UTC).timestamp() < MAX_EPOCH_S
