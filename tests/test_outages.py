"""Outages (issue 8): an endpoint that goes down in the middle of a describe run costs waiting,
not error rows; one that stays down stops the run with its address and last error, marking
nothing failed; a rerun retries transient error rows (and, with --retry-errors, permanent
ones), and every reader sees one row per key.

The endpoints: `ScriptedFakeEndpoint` (a SCRIPTED FAKE, since a real server cannot be made to
answer 503 for exactly 30 s) and a REAL vLLM OpenAI-compatible server, killed and restarted
on the same port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

import schemas
from pipelines import store
from tests.conftest import CLI, ROOT, run_cli
from tests.servers import (START_TIMEOUT_S, ScriptedFakeEndpoint, free_port, http_error, sleep_then, start_on_port,
                           stop_group)

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
WIDE = {"COLUMNS": "300"}                     # summary rows on one line each
VIEWS = 5                                     # the default views: 15 sample items give 75 rows


def _describe_args(sample_data: Path, workdir: Path, base_url: str, model: str, *extra: str) -> list[str]:
    return ["describe", "--input", sample_data, "--workdir", workdir, "--engine", "openai", "--model", model,
            "--base-url", base_url, "--no-progress", *extra]


def _start_describe(args: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **WIDE, **(env or {})})


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _rows(workdir: Path, all_attempts: bool = False) -> list[dict]:
    return store.read_folder(workdir / "descriptions", schemas.DESCRIPTIONS, all_attempts=all_attempts).to_pylist()


def _assert_each_key_once_without_errors(workdir: Path, items: int) -> None:
    rows = _rows(workdir)
    keys = Counter((r["item_id"], r["view"]) for r in rows)
    assert len(keys) == items * VIEWS and max(keys.values()) == 1
    assert [r for r in rows if r["error_kind"]] == []


@pytest.mark.slow
def test_a_30_s_outage_in_the_middle_of_a_run_costs_no_error_rows(sample_data, tmp_path):
    with ScriptedFakeEndpoint(default=sleep_then(0.1)) as fake:
        run = _start_describe(_describe_args(sample_data, tmp_path / "w", fake.base_url, fake.model, "--executor",
                                             "local", "--concurrency", "2", "--outage-timeout", "120"),
                              tmp_path / "run.log")
        _wait_for(lambda: fake.attempts() >= 10, 120, "the first requests")
        fake.go_down(30.0)
        assert run.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
        down = fake.answered_down
    _assert_each_key_once_without_errors(tmp_path / "w", 15)
    # the breaker held the work: a few requests opened it, then one probe at a time (1, 2, 4, 8,
    # 10, 10 s apart) went out; without it every request would have run through its retries
    assert 5 <= down <= 20
    assert "answers again after" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_an_outage_longer_than_the_timeout_stops_the_run_and_marks_nothing_failed(sample_data, tmp_path):
    workdir = tmp_path / "w"
    with ScriptedFakeEndpoint(default=sleep_then(0.1)) as fake:
        run = _start_describe(_describe_args(sample_data, workdir, fake.base_url, fake.model, "--concurrency", "2",
                                             "--outage-timeout", "10", "--rows-per-file", "4"),
                              tmp_path / "run.log", env=LOOPBACK_RAY)
        _wait_for(lambda: fake.attempts() >= 10, 240, "the first requests")
        fake.go_down(3600.0)
        assert run.wait(timeout=300) == 1
        log = (tmp_path / "run.log").read_text()
        last_line = log.strip().splitlines()[-1]
        assert f"endpoint {fake.base_url} failed every request for" in last_line, log[-3000:]
        assert "(--outage-timeout 10 s); last error: http_503" in last_line
        written = _rows(workdir)
        assert 0 < len(written) < 15 * VIEWS and not any(r["error_kind"] for r in written)
        # the endpoint is back: a plain rerun does the rest, each key once
        fake.go_down(0.0)
        sent_before = fake.attempts()
        again = run_cli(*_describe_args(sample_data, workdir, fake.base_url, fake.model, "--executor", "local"),
                        timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert fake.attempts() - sent_before == 15 * VIEWS - len(written)
    _assert_each_key_once_without_errors(workdir, 15)


def test_a_rerun_retries_transient_error_rows_and_retry_errors_the_permanent_ones(sample_data, tmp_path):
    workdir = tmp_path / "w"
    flaky, broken = "Describe the flaky part of this {media}.", "Describe the broken part of this {media}."
    views = ["--views", "detailed,flaky,broken", "--view", f"flaky={flaky}", "--view", f"broken={broken}"]
    scripts = {flaky.replace("{media}", "image"): [http_error(500)] * 3,      # 3 transient failures
               broken.replace("{media}", "image"): [http_error(400)] * 12}    # every image: permanent
    with ScriptedFakeEndpoint(scripts) as fake:
        args = _describe_args(sample_data, workdir, fake.base_url, fake.model, *views, "--executor", "local",
                              "--max-retries", "0", "--max-error-rate", "1")
        first = run_cli(*args, timeout=300, env=WIDE)
        assert first.returncode == 0, first.stderr[-3000:]
        assert ("15: transient 3 (http_500: 3): a plain rerun retries them; permanent 12 (http_400: 12): kept; "
                "--retry-errors redoes them") in first.stderr
        sent = fake.attempts()
        second = run_cli(*args, timeout=300, env=WIDE)
        assert second.returncode == 0, second.stderr[-3000:]
        assert fake.attempts() - sent == 3                   # only the transient ones went out again
        assert "3 (3 of them retried: their last attempt failed)" in second.stderr
        rows = {(r["item_id"], r["view"]): r for r in _rows(workdir)}
        assert len(rows) == 15 * 3                           # one row per key that counts ...
        assert Counter((r["error_kind"], r["attempt"]) for r in rows.values()) == {
            (None, 1): 30, ("http_400", 1): 12, (None, 2): 3}
        assert len(_rows(workdir, all_attempts=True)) == 45 + 3    # ... though both attempts stay on disk
        third = run_cli(*args, "--retry-errors", timeout=300, env=WIDE)   # the script is used up: all answer
        assert third.returncode == 0, third.stderr[-3000:]
    rows = _rows(workdir)
    assert len(rows) == 45 and not any(r["error_kind"] for r in rows)
    assert sorted(r["attempt"] for r in rows if r["view"] == "broken" and r["media_type"] == "image") == [2] * 12
    # train, evaluate and index read through one function: one description per key
    from pipelines.train import read_workdir
    _, _, descriptions = read_workdir(workdir)
    assert len(descriptions) == len({(d["item_id"], d["view"], d["fingerprint"]) for d in descriptions}) == 45


@pytest.mark.slow
def test_a_real_vllm_server_killed_and_restarted_on_its_port(sample_data, tiny_qwen, tmp_path):
    """The run holds its work while the server is gone and finishes once it is back; a plain
    rerun would pick up any row that still failed (the issue allows either)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "PYTHONUNBUFFERED": "1"}
    port, workdir = free_port(), tmp_path / "w"
    server = start_on_port(str(tiny_qwen), port, tmp_path / "server.log", env, [], START_TIMEOUT_S, 8)
    run = None
    try:
        args = _describe_args(sample_data, workdir, server.base_url, server.model, "--executor", "local",
                              "--concurrency", "2", "--max-tokens", "48", "--ignore-eos", "--rows-per-file", "4",
                              "--outage-timeout", "600")
        run = _start_describe(args, tmp_path / "run.log")
        _wait_for(lambda: len(store.parquet_files(workdir / "descriptions")) >= 2 or run.poll() is not None,
                  300, "the first rows")
        assert run.poll() is None, "the run ended before the server could be killed: give it more work"
        os.killpg(server.process.pid, signal.SIGKILL)      # the server and its engine core, at once
        server.process.wait(timeout=30)
        time.sleep(2)
        server = start_on_port(str(tiny_qwen), port, tmp_path / "server.log", env, [], START_TIMEOUT_S, 8)
        code = run.wait(timeout=600)
        log = (tmp_path / "run.log").read_text()
        assert code == 0, log[-3000:]
        assert "answers again after" in log
        if any(r["error_kind"] for r in _rows(workdir)):
            again = run_cli(*args, timeout=600)
            assert again.returncode == 0, again.stderr[-3000:]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        stop_group(server.process)
    _assert_each_key_once_without_errors(workdir, 15)
