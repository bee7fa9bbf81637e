"""FileSource: batches bounded in lines and bytes; on stdin from a pipe, batches handed on as lines
arrive (full or after the linger time), with line numbers and over-long lines as for a file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.sources import FileSource, RawMessage, _LineSplitter

LIMIT = 1_000_000


class Pipe:
    """The write end of the pipe that stdin reads from."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        # A test's writer thread closes the pipe to end the input, and the fixture closes it after the
        # test: the reader sees the end of input as soon as the thread's close is done, so the two
        # closes can overlap, and both found the descriptor open (CI saw EBADF at teardown).
        self._closing = threading.Lock()

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:  # once: a closed descriptor's number can be reused by the next open
        with self._closing:
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipe]:
    """Stdin replaced by the read end of a pipe; yields the write end (closed at the end if still open)."""
    read_fd, write_fd = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read_fd, "rb")))
    pipe = Pipe(write_fd)
    yield pipe
    pipe.close()


def next_within(batches: Iterator[list[RawMessage]], seconds: float) -> list[RawMessage] | None:
    """The next batch, or None if none came within ``seconds`` (the source would have kept waiting)."""
    got: list[list[RawMessage] | None] = [None]
    reader = threading.Thread(target=lambda: got.__setitem__(0, next(batches, None)), daemon=True)
    reader.start()
    reader.join(seconds)
    return got[0]


def test_lines_piped_in_are_handed_on_before_the_batch_is_full(stdin_pipe: Pipe) -> None:
    source = FileSource("-", batch_max_records=20_000, linger_s=0.2)
    batches = source.batches()
    stdin_pipe.write(b'{"a": 1}\n\n{"a": 2}\r\n{"a"')
    stdin_pipe.write(b": 3}\n")
    first = next_within(batches, 10)  # the pipe stays open: before, the source waited for 20,000 lines
    assert first is not None, "a live pipe's lines waited for a full batch"
    assert [(m.value, m.position.offset) for m in first] == [(b'{"a": 1}', 1), (b'{"a": 2}', 3), (b'{"a": 3}', 4)]
    started = time.monotonic()
    stdin_pipe.write(b'{"a": 4}\n{"a": 5}')  # the last line has no line end: it ends with the input
    stdin_pipe.close()
    second = next_within(batches, 10)
    assert second is not None and time.monotonic() - started < 10
    assert [(m.value, m.position.offset) for m in second] == [(b'{"a": 4}', 5), (b'{"a": 5}', 6)]
    assert next_within(batches, 10) is None  # the input ended: so do the batches


def test_a_full_batch_is_handed_on_at_once(stdin_pipe: Pipe) -> None:
    source = FileSource("-", batch_max_records=3, linger_s=60.0)
    batches = source.batches()
    stdin_pipe.write(b"1\n2\n3\n4\n")
    first = next_within(batches, 10)  # full: not held for the minute of linger
    assert first is not None and [m.value for m in first] == [b"1", b"2", b"3"]


def test_a_stop_request_ends_a_quiet_pipe(stdin_pipe: Pipe) -> None:
    source = FileSource("-", linger_s=0.2)
    batches = source.batches()
    stdin_pipe.write(b"1\n")
    assert next_within(batches, 10) is not None
    source.stop()  # nothing more arrives, the pipe stays open: the source still ends, within its wake-up
    assert next_within(batches, 10) is None


def test_a_piped_overlong_line_is_not_held(stdin_pipe: Pipe) -> None:
    """As for a file (tests/test_fuzz.py): a 10 MB line is passed on as its first LIMIT + 1 bytes, in
    bounded memory, and the lines after it keep their numbers."""
    huge = b'{"client_id": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    data = b"good 1\n" + huge + b"\n\ngood 2\n"  # built before the memory is traced
    writer = threading.Thread(target=stdin_pipe.write, args=(data,), daemon=True)
    source = FileSource("-", max_line_bytes=LIMIT, linger_s=0.05)
    tracemalloc.start()
    try:
        writer.start()
        batches = source.batches()
        messages: list[RawMessage] = []
        while len(messages) < 3:
            batch = next_within(batches, 30)
            assert batch is not None, f"got {len(messages)} lines"
            messages += batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m.position.offset for m in messages] == [1, 2, 4]
    assert messages[0].value == b"good 1" and messages[2].value == b"good 2"
    assert messages[1].value == huge[: LIMIT + 1]
    assert peak < 6 * 1024 * 1024, f"reading a 10 MB line took {peak} bytes"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_lines_are_the_same_however_the_reads_cut_them(size: int) -> None:
    data = b"short\r\n\n" + b"y" * 12 + b"\nabc\nlast"
    splitter = _LineSplitter("test", max_line_bytes=8)
    lines: list[bytes] = []
    for start in range(0, len(data), size):
        lines += splitter.feed(data[start : start + size])
    lines += splitter.finish()
    assert lines == [b"short", b"", b"y" * 9, b"abc", b"last"]


@pytest.mark.parametrize("piped", [False, True])
def test_a_batch_is_full_at_its_byte_limit(tmp_path: Path, stdin_pipe: Pipe, piped: bool) -> None:
    """Memory stays bounded whatever the lines' size: 10 kB lines, 64 kB a batch."""
    line = b"z" * 10_000
    if piped:
        data = (line + b"\n") * 50

        def write_and_close() -> None:  # the input ends after the last line: the last batch is handed on
            stdin_pipe.write(data)
            stdin_pipe.close()

        threading.Thread(target=write_and_close, daemon=True).start()
        source = FileSource("-", batch_max_bytes=64_000, linger_s=60.0)
    else:
        path = tmp_path / "wide.jsonl"
        path.write_bytes((line + b"\n") * 50)
        source = FileSource(str(path), batch_max_bytes=64_000)
    sizes = [len(batch) for batch in source.batches()]
    assert sizes == [7] * 7 + [1], sizes  # full at the line that reaches 64 kB: 7 lines, 70 kB


def test_probewatch_run_scores_a_live_pipe_as_it_arrives(tmp_path: Path) -> None:
    """`probewatch run --input -` on a pipe that stays open: its dead letters are written (the batch
    was processed) before the input ends."""
    dlq = tmp_path / "dlq.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-m", "probewatch", "run", "--input", "-", "--quiet", "--data-dir", str(tmp_path / "data"),
         "--dlq-out", str(dlq), "--alerts-out", str(tmp_path / "alerts.jsonl")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    assert run.stdin is not None and run.stdout is not None
    try:
        run.stdin.write(b'{"ts": 1800000000, "client_id": "c", "model_id": "m"}\nnot json\n{"client_id": 7}\n')
        run.stdin.flush()
        deadline = time.monotonic() + 120  # the process starts chDB first
        while not (dlq.exists() and len(dlq.read_bytes().splitlines()) == 2):
            assert run.poll() is None, run.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the piped records were not processed while the pipe was open"
            time.sleep(0.2)
        run.stdin.close()
        assert run.wait(timeout=60) == 0, run.stdout.read().decode()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
