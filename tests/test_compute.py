"""A worker's compute settings: numpy's BLAS held to detection.blas_threads threads while it runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from ingest.sources import Source
from probewatch.app import RunSummary
from probewatch.compute import blas_thread_limit
from probewatch.config import ConfigError, load_config
from probewatch.wiring import build_job


def blas_threads() -> int:
    return max(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")


def test_the_limit_holds_blas_inside_the_context_and_zero_leaves_it() -> None:
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    with threadpool_limits(limits=2, user_api="blas"):  # as on any machine with two cores or more
        with blas_thread_limit(1):
            assert blas_threads() == 1
        assert blas_threads() == 2
        with blas_thread_limit(0):
            assert blas_threads() == 2


def test_a_run_holds_blas_to_the_configured_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs.jsonl"
    logs.write_text("")
    seen: list[int] = []
    for threads in (1, 2):
        config = load_config(
            environ={"PROBEWATCH__DETECTION__BLAS_THREADS": str(threads)},
            overrides={"storage": {"chdb": {"path": str(tmp_path / f"db{threads}")}}, "alerting": {"console": False}},
        )
        job = build_job(config, input_path=str(logs), dlq_path=str(tmp_path / "dlq.jsonl"))
        run = job.pipeline.run

        def counting(source: Source, run: Callable[[Source], RunSummary] = run) -> RunSummary:
            seen.append(blas_threads())
            return run(source)

        monkeypatch.setattr(job.pipeline, "run", counting)
        with threadpool_limits(limits=2, user_api="blas"):
            job.run()
    assert seen == [1, 2]


def test_a_negative_thread_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="blas_threads"):
        load_config(environ={"PROBEWATCH__DETECTION__BLAS_THREADS": "-1"})
