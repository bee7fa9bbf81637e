"""The record contract: what is accepted, normalised, and dead-lettered with which reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ingest.records import DECODE_CHUNK, DeadLetter, QueryRecord, RecordDecoder, SourcePosition, dead_letter_document

POS = SourcePosition("t", 0, 7)


def good(**overrides: object) -> bytes:
    record: dict[str, object] = {
        "ts": "2026-11-01T00:00:01.250Z",
        "client_id": "acct-42",
        "model_id": "fraud-v3",
        "input": {"vector": [0.1, 0.2, 0.3]},
        "output": {"probs": [0.02, 0.91, 0.07]},
    }
    record.update(overrides)
    return json.dumps(record).encode()


def decode(payload: bytes, decoder: RecordDecoder | None = None) -> QueryRecord | DeadLetter:
    return (decoder or RecordDecoder()).decode(payload, POS, b"acct-42")


def test_valid_record_is_normalised() -> None:
    record = decode(good(extra_field={"kept": "out of the way"}))
    assert isinstance(record, QueryRecord)
    assert record.ts == pytest.approx(1793491201.25)
    assert record.vector is not None and record.vector.dtype == np.float32
    assert record.label == "1"
    assert record.confidence == pytest.approx(0.91)
    assert record.margin == pytest.approx(0.91 - 0.07)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1793491201.25, 1793491201.25),
        (1793491201250, 1793491201.25),
        ("2026-11-01T01:00:01.25+01:00", 1793491201.25),
    ],
)
def test_event_time_forms(ts: object, expected: float) -> None:
    record = decode(good(ts=ts))
    assert isinstance(record, QueryRecord)
    assert record.ts == pytest.approx(expected)


def test_label_only_and_score_outputs() -> None:
    label = decode(good(output={"label": 3, "confidence": 0.88}))
    assert isinstance(label, QueryRecord) and label.label == "3" and label.margin is None
    score = decode(good(output={"score": 0.7}, input=None))
    assert isinstance(score, QueryRecord) and score.score == 0.7 and score.vector is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty record"),
        (good(client_id=None), "client_id"),
        (json.dumps({"ts": 1793491201, "model_id": "m"}).encode(), "missing required field `client_id`"),
        (good(ts="yesterday"), "RFC3339"),
        (good(ts="2026-11-01T00:00:01"), "no UTC offset"),
        (good(ts=12), "outside 2001..2100"),
        (good(ts=True), "contract violation"),
        (good(client_id=""), "client_id is empty"),
        (good(output={"probs": [0.5, 1.7]}), "probabilities in [0, 1]"),
        (good(output={"probs": []}), "1..10000 classes"),
        (good(output={"confidence": 1.5}), "confidence must be in [0, 1]"),
        (good(input={"vector": []}), "input.vector is empty"),
        (good(input={"vector": ["a"]}), "contract violation"),
        (good(input={"vector": [1e39]}), "NaN or Inf"),
        (
            b'{"ts": 1793491201, "client_id": "a", "model_id": "m", "input": {"vector": [NaN]}}',
            "not valid JSON",
        ),
        (b'{"ts": 1793491201, "client_id": "a", "model_id": "m", "latency_ms": 1e999}', "out of range"),
        (good(client_id="x" * 600), "longer than 512"),
    ],
)
def test_bad_records_are_dead_lettered_with_reason(payload: bytes, reason: str) -> None:
    letter = decode(payload)
    assert isinstance(letter, DeadLetter), letter
    assert reason in letter.reason
    assert letter.payload == payload and letter.position == POS and letter.key == b"acct-42"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        # Not printable, yet no control character: the regex, not str.isprintable(), decides.
        ({"client_id": "a\u2028b", "session_id": "\ufeffs", "model_id": "m\u00a0"}, None),
        ({"session_id": "s\x7f"}, "session_id contains control characters"),
        ({"model_id": "m\n", "session_id": "s\x00"}, "model_id contains control characters"),  # the first field
        ({"user_agent": "u" * 512}, None),  # at the limit, in a payload longer than it
        ({"user_agent": "é" * 513}, "user_agent is longer than 512 characters"),
        ({"source_ip": "\x00" * 513, "client_id": "\x00"}, "source_ip is longer than"),  # lengths first
    ],
)
def test_string_checks(overrides: dict[str, object], reason: str | None) -> None:
    result = decode(good(**overrides))
    if reason is None:
        assert isinstance(result, QueryRecord), result
    else:
        assert isinstance(result, DeadLetter) and reason in result.reason, result


def test_vector_length_is_fixed_per_model_by_first_record_or_config() -> None:
    decoder = RecordDecoder()
    assert isinstance(decode(good(), decoder), QueryRecord)
    wrong = decode(good(input={"vector": [1.0, 2.0]}), decoder)
    assert isinstance(wrong, DeadLetter) and "takes 3" in wrong.reason
    other_model = decode(good(model_id="other", input={"vector": [1.0, 2.0]}), decoder)
    assert isinstance(other_model, QueryRecord)
    configured = RecordDecoder(input_dims={"fraud-v3": 4})
    assert isinstance(decode(good(), configured), DeadLetter)


def test_size_caps() -> None:
    decoder = RecordDecoder(max_record_bytes=200, max_vector_len=4)
    assert "byte limit" in decode(good(pad="x" * 300), decoder).reason  # type: ignore[union-attr]
    assert "over the 4 limit" in decode(good(input={"vector": [1.0] * 5}), RecordDecoder(max_vector_len=4)).reason  # type: ignore[union-attr]


def test_batch_keeps_every_message_exactly_once() -> None:
    payloads = [
        good(),
        b"junk",
        good(output={"probs": [2.0, 0.1]}),
        good(client_id="b"),
        good(input={"vector": [1e39, 1, 1]}),
    ]
    messages = [(p, SourcePosition("t", 0, i), None) for i, p in enumerate(payloads)]
    records, letters = RecordDecoder().decode_batch(messages)
    assert sorted([r.position.offset for r in records] + [x.position.offset for x in letters]) == list(range(5))
    assert [r.position.offset for r in records] == [0, 3]


def test_a_large_batch_keeps_stream_order_and_learns_dimensions_across_its_chunks() -> None:
    """A poll's batch is decoded in chunks (DECODE_CHUNK): records and dead letters still come out in
    stream order, whichever check rejected them, and a model's input dimension learned in one chunk
    holds in the next."""
    payloads = []
    for i in range(3 * DECODE_CHUNK + 17):
        if i % 7 == 3:
            payloads.append(good(input={"vector": [1e39, 1, 1]}))  # rejected by the vector check, late
        elif i % 11 == 5:
            payloads.append(b"junk")  # rejected by the field check, early
        elif i % 13 == 8:
            payloads.append(good(input={"vector": [0.5, 0.5]}))  # fraud-v3 takes 3 values (learned at 0)
        else:
            payloads.append(good())
    messages = [(p, SourcePosition("t", 0, i), None) for i, p in enumerate(payloads)]
    records, letters = RecordDecoder().decode_batch(messages)
    letter_offsets = [x.position.offset for x in letters]
    expected_letters = [i for i in range(len(payloads)) if i % 7 == 3 or i % 11 == 5 or i % 13 == 8]
    assert letter_offsets == expected_letters
    assert [r.position.offset for r in records] == sorted(set(range(len(payloads))) - set(expected_letters))
    assert {x.reason.split(":")[0] for x in letters} == {
        "input.vector contains NaN or Inf (or values beyond float32)",
        "not valid JSON",
        "input.vector has 2 values; model 'fraud-v3' takes 3",
    }


def test_dead_letter_document_keeps_binary_payloads() -> None:
    letter = decode(b"\xff\xfe binary")
    assert isinstance(letter, DeadLetter)
    doc = dead_letter_document(letter)
    assert "payload_base64" in doc and doc["source"] == {"topic": "t", "partition": 0, "offset": 7}
    assert dead_letter_document(decode(b"{oops"))["payload"] == "{oops"  # type: ignore[arg-type]
