"""ingest — get query-log records in: consume (Kafka, file, stdin), decode and validate against the
record contract, and dead-letter whatever breaks it, with the reason."""

from ingest.deadletter import DeadLetterSink, FileDeadLetterSink, KafkaDeadLetterSink
from ingest.records import DeadLetter, QueryRecord, RecordDecoder, SourcePosition
from ingest.sources import FileSource, KafkaSource, RawMessage, Source

__all__ = [
    "DeadLetter",
    "DeadLetterSink",
    "FileDeadLetterSink",
    "FileSource",
    "KafkaDeadLetterSink",
    "KafkaSource",
    "QueryRecord",
    "RawMessage",
    "RecordDecoder",
    "Source",
    "SourcePosition",
]
