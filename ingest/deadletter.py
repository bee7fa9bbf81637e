"""Dead-letter sinks: where records that break the contract go, with the reason, instead of vanishing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import msgspec

from ingest.records import DeadLetter, dead_letter_document

_encoder = msgspec.json.Encoder()


class DeadLetterSink(Protocol):
    def write(self, letters: list[DeadLetter]) -> None: ...

    def flush(self) -> None:
        """Make everything written durable; called before the batch's offsets are committed."""
        ...

    def close(self) -> None: ...


class FileDeadLetterSink:
    """Appends one JSON document per dead letter to a file (created on first use)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def write(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        if self._file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._file.write(b"".join(_encoder.encode(dead_letter_document(x)) + b"\n" for x in letters))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


class KafkaDeadLetterSink:
    """Produces dead letters to ``<topic>.dlq``, keyed like the original, reason in a header too."""

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def write(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            self.producer.send(
                self.topic,
                key=letter.key,
                value=_encoder.encode(dead_letter_document(letter)),
                headers=[("probewatch-dlq-reason", letter.reason.encode("utf-8")[:1000])],
            )

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        self.flush()
